"""DistAttention: one sequence's KV cache spread over the devices of a mesh axis.

    paged_attention(q, k_pages, v_pages, block_tables, lengths, *, mesh, axis="kv")
    prefill_attention(q, k_pages, v_pages, block_table, *, q_offset, kv_length, mesh)
    DistributedBlockAllocator(num_devices, blocks_per_device)
"""

from jattn.distributed.allocator import DistributedBlockAllocator
from jattn.distributed.attention import paged_attention, prefill_attention

__all__ = ["DistributedBlockAllocator", "paged_attention", "prefill_attention"]
