"""The paged KV cache: a block pool per layer, block tables, and the block allocator.

Pool: per layer, keys and values `[num_blocks, block_size, Hkv, D]`, one buffer each, so a
layer's pool is handed to the attention kernel as is and written in place (the jitted
steps donate it). Keys are stored **before RoPE**: the attention kernels rotate each key
to its position as they read it, which costs a sine, a cosine and four multiply-adds per
key element per step, hidden behind the memory traffic of decode. In exchange a cached
key never goes stale: truncating a conversation, or loading its cache from host or disk,
needs no re-encoding pass at all.

A sequence's token i lives in block `block_table[i // block_size]`, slot
`i % block_size`; slot ids below are flat, `block * block_size + slot`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class KVPool(NamedTuple):
    """Per-layer key and value pools, each a tuple of `[num_blocks, block_size, Hkv, D]`."""

    k: tuple
    v: tuple

    @classmethod
    def create(cls, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
               head_dim: int, dtype, sharding=None) -> "KVPool":
        """A pool of zeros; with `sharding` (a `jax.sharding.Sharding`) each device
        makes only its own part."""
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        return cls(tuple(jnp.zeros(shape, dtype, device=sharding) for _ in range(num_layers)),
                   tuple(jnp.zeros(shape, dtype, device=sharding) for _ in range(num_layers)))

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[1]

    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.k + self.v)


def token_slots(block_table, positions, *, block_size: int, num_blocks: int):
    """Flat slot id of each token: `block_table [M]`, `positions [T]` -> int32 `[T]`.

    A negative position (a padding token) maps past the pool, where writes are dropped.
    """
    block = block_table[jnp.clip(positions, 0) // block_size]
    slots = block * block_size + positions % block_size
    return jnp.where(positions >= 0, slots, num_blocks * block_size).astype(jnp.int32)


def write_tokens(pages, slots, values):
    """Writes `values [T, Hkv, D]` into `pages [N, block_size, Hkv, D]` at flat `slots [T]`;
    slots past the pool are dropped. Returns the updated pages."""
    num_blocks, block_size = pages.shape[:2]
    flat = pages.reshape(num_blocks * block_size, *pages.shape[2:])
    flat = flat.at[slots].set(values.astype(pages.dtype), mode="drop")
    return flat.reshape(pages.shape)


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks needed to hold `tokens` tokens."""
    return -(-tokens // block_size)


def default_num_blocks(*, sequences: int, max_context: int, block_size: int,
                       block_bytes: int, budget_bytes: int) -> int:
    """The pool size, in blocks, when none is given: room for `sequences` sequences at
    `max_context` tokens each (every running turn at its longest), cut to what
    `budget_bytes` holds at `block_bytes` per block, but never under one such sequence."""
    per_sequence = blocks_for(max_context, block_size)
    return max(per_sequence, min(sequences * per_sequence, budget_bytes // block_bytes))


def padded_table(blocks: list[int], width: int) -> np.ndarray:
    """int32 `[width]` block table: `blocks` then zeros (never read past the length).
    A numpy array: jitted steps take it as it is (no per-shape conversion op)."""
    if len(blocks) > width:
        raise ValueError(f"{len(blocks)} blocks do not fit a block table of width {width}")
    table = np.zeros(width, np.int32)
    table[:len(blocks)] = blocks
    return table


def powers_of_two(low: int, high: int) -> list[int]:
    """low, 2 low, 4 low, ... up to high: the buckets (`bucket`) from low to high."""
    return [low << i for i in range((high // low).bit_length())]


def bucket(n: int, minimum: int = 16) -> int:
    """The power of two >= max(n, minimum): shapes for jit that recompile rarely."""
    size = minimum
    while size < n:
        size *= 2
    return size
