"""jattn: LLM serving in JAX that reuses each conversation's KV cache across turns
(AttentionStore) and spreads one sequence's KV cache over a device mesh (DistAttention).

    llm = jattn.LLM()                       # the embedded stories260K
    llm.generate("Once upon a time").text

The attention primitive lives in the sibling package `pallas_kernels`.
"""

from jattn.generation import Generation, StreamedToken
from jattn.llm import LLM
from jattn.store import AttentionStore, StoreConfig

__version__ = "0.1.0"

__all__ = ["LLM", "AttentionStore", "Generation", "StoreConfig", "StreamedToken"]
