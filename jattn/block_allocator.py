"""Which blocks of a KV pool are free: host-side bookkeeping of pool block ids, shared by
the model's pool (`BlockAllocator`) and the mesh-wide pool of `jattn.distributed`."""

from __future__ import annotations


class PoolExhausted(RuntimeError):
    """The block pool cannot give the blocks asked for."""


class BlockNotAllocated(RuntimeError):
    """A block handed back that the pool has not handed out (freed twice, or not of this
    pool): a bug of the caller, never bad input."""


class BlockAllocator:
    """Hands out block ids of a pool of `num_blocks`; host side, not thread-safe.

    A stack of free ids (the most recently freed is handed out first) and a per-block
    free flag, so `allocate` and `free` cost O(blocks asked for), not O(pool)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._is_free = bytearray(b"\x01") * num_blocks

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def free_ids(self) -> set[int]:
        """The ids free now."""
        return set(self._free)

    def allocate(self, count: int) -> list[int]:
        """Takes `count` blocks; raises `PoolExhausted` (and takes none) if too few are free."""
        if count > len(self._free):
            raise PoolExhausted(
                f"asked for {count} KV blocks, {len(self._free)} of {self.num_blocks} free")
        blocks = [self._free.pop() for _ in range(count)]
        for block in blocks:
            self._is_free[block] = 0
        return blocks

    def free(self, blocks) -> None:
        """Returns blocks to the pool; BlockNotAllocated (and none of `blocks` freed) for
        a block freed twice or out of range."""
        blocks = list(blocks)
        seen = set()
        for block in blocks:
            if not 0 <= block < self.num_blocks or self._is_free[block] or block in seen:
                raise BlockNotAllocated(f"block {block} is not an allocated block of this pool")
            seen.add(block)
        for block in blocks:
            self._is_free[block] = 1
        self._free.extend(reversed(blocks))
