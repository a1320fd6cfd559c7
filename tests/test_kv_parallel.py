"""`LLM(kv_parallel=8)`: the model over a KV pool spread on 8 simulated devices gives the
greedy tokens of one device, including a context no single device's share can hold,
and multi-turn chat with the AttentionStore."""

import numpy as np
import pytest

from jattn import LLM, StoreConfig
from model_references import reference_cases

PROMPT_IDS = np.random.default_rng(0).integers(3, 512, size=300).tolist()


@pytest.fixture(scope="module")
def one_device():
    return LLM(store=None, num_blocks=64)


def test_greedy_generation_is_unchanged_on_8_devices(one_device):
    spread = LLM(store=None, kv_parallel=8)
    for case in reference_cases("stories260K"):
        prompt = case["prompt"]
        want = one_device.generate(prompt, max_tokens=48, ignore_eos=True).token_ids
        assert spread.generate(prompt, max_tokens=48, ignore_eos=True).token_ids == want


def test_a_context_larger_than_one_devices_share_runs_over_8(one_device):
    spread = LLM(store=None, kv_parallel=8, num_blocks=64)  # 8 blocks = 128 tokens a device
    runner = spread.runner
    allocator = runner.new_allocator()
    assert allocator.blocks_per_device * runner.block_size < len(PROMPT_IDS) + 40
    want = one_device.generate(PROMPT_IDS, max_tokens=40, ignore_eos=True).token_ids
    assert spread.generate(PROMPT_IDS, max_tokens=40, ignore_eos=True).token_ids == want
    blocks = allocator.allocate(22)
    assert len({allocator.device_of(b) for b in blocks}) >= 3
    assert allocator.debts
    allocator.free(blocks)
    assert not allocator.debts


def test_chat_with_the_store_on_8_devices_equals_recompute():
    messages = ["Once upon a time", "The dog ran to the park.", "Lily was happy.",
                "Then it started to rain."]
    alone = LLM(store=None)
    spread = LLM(store=StoreConfig(hbm_bytes=1 << 20, host_bytes=1 << 24), kv_parallel=8,
                 num_blocks=128)
    for turn in messages:
        for session in ("a", "b"):
            want = alone.chat(session, turn, max_tokens=24, ignore_eos=True)
            got = spread.chat(session, turn, max_tokens=24, ignore_eos=True)
            assert got.token_ids == want.token_ids, (session, turn)
    assert got.cached_tokens > 0


def test_kv_parallel_must_fit_the_devices():
    with pytest.raises(ValueError, match=r"kv_parallel must be an integer in \[1, 8\]"):
        LLM(store=None, kv_parallel=9)
