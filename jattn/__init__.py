"""jattn: LLM serving in JAX that reuses each conversation's KV cache across turns
(AttentionStore) and spreads one sequence's KV cache over a device mesh (DistAttention).

The attention primitive both stand on lives in the sibling package `pallas_kernels`.
"""

__version__ = "0.1.0"
