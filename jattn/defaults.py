"""The defaults every entry point shares (`LLM`, `ModelRunner`, `StoreConfig`,
`ServeConfig`, `EngineLimits`): each is written here once."""

BLOCK_SIZE = 16
"""Tokens per KV block (of the device pool and of every store tier)."""

PREFILL_CHUNK = 512
"""The most tokens one model step packs: decodes and prompt chunks together."""

MAX_RUNNING = 32
"""The most turns one model step runs (the block tables' height; the engine's batch)."""

KV_MEMORY_SHARE = 0.5
"""The share of a device's memory left by the weights that the KV pool takes by default,
at most; on a host platform without memory statistics, an eighth of the machine's
memory."""

SINK_TOKENS = 4
"""First tokens a truncated conversation always keeps."""

LOOKAHEAD = 8
"""How many upcoming sessions of the queue count as about to run."""

HBM_SHARE = 0.5
"""The share of the device pool that the device tier may keep cached between turns when
no budget is given."""

STEP_TIMEOUT_S = 60.0
"""In a process group, the longest one step may take before the leader gives the group
up (a process died or hangs), in seconds."""
