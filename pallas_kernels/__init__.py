"""Attention kernels that return the log-sum-exp, and their exact merge.

    flash_attention(q, k, v, ...)          prefill over a contiguous KV cache, one
                                           sequence or a batch; differentiable (out and
                                           LSE) on every backend
    paged_attention(q, k_pages, ...)       decode over a paged KV cache (split-K)
    ragged_paged_attention(q, k_pages, ...) prefill chunks and decodes of many sequences
                                           packed together, over a paged KV cache
    merge_attention(outs, lses)            exact merge of partials by LSE

Each has Pallas kernels for GPU (Triton) and TPU (Mosaic), a tiled XLA path (the fast
path on CPU) and a dense reference; `backend=` picks one (see `pallas_kernels.backend`).
This package knows nothing of models. These functions are its public surface
(`docs/api.md`); the modules behind them are internal.
"""

from pallas_kernels.attention import flash_attention, paged_attention, ragged_paged_attention
from pallas_kernels.backend import BACKENDS
from pallas_kernels.merge import merge_attention

__all__ = ["BACKENDS", "flash_attention", "merge_attention", "paged_attention",
           "ragged_paged_attention"]
