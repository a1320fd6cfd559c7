"""DistAttention: one sequence's KV spread over the devices of a mesh axis.

    paged_attention(q, k_pages, v_pages, block_tables, lengths, *, mesh, axis="kv")
    prefill_attention(q, k_pages, v_pages, block_table, *, q_offset, kv_length, mesh)
    context_parallel_attention(q, k, v, *, mesh, causal=True)   differentiable (training)
    DistributedBlockAllocator(num_devices, blocks_per_device)
"""

from jattn.distributed.allocator import DistributedBlockAllocator
from jattn.distributed.attention import paged_attention, prefill_attention
from jattn.distributed.context_parallel import context_parallel_attention

__all__ = ["DistributedBlockAllocator", "context_parallel_attention", "paged_attention",
           "prefill_attention"]
