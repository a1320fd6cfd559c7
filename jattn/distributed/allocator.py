"""Block allocation over the devices of a mesh axis, with a debtor/creditor directory.

Block ids are global: device d owns ids `[d * n, (d + 1) * n)`. A request takes its
blocks on its home device first (by default the device with the most free blocks) and,
when home is full, borrows from the device with the most free blocks, again and again,
recording in `debts` how many blocks each home device owes each creditor. Freeing a
block returns it to the device that owns it and settles the debt.
"""

from __future__ import annotations

import collections

from jattn.block_allocator import BlockNotAllocated, PoolExhausted


class DistributedBlockAllocator:
    """`BlockAllocator`'s interface over `num_devices` devices of `blocks_per_device`;
    host side, not thread-safe."""

    def __init__(self, num_devices: int, blocks_per_device: int):
        if num_devices < 1 or blocks_per_device < 1:
            raise ValueError(f"need >= 1 device and >= 1 block per device, got {num_devices} "
                             f"and {blocks_per_device}")
        self.num_devices = num_devices
        self.blocks_per_device = blocks_per_device
        self.num_blocks = num_devices * blocks_per_device
        self._free = [list(range((d + 1) * blocks_per_device - 1, d * blocks_per_device - 1, -1))
                      for d in range(num_devices)]
        self._free_set = set(range(self.num_blocks))
        self._borrower: dict[int, int] = {}  # lent block -> the home device that took it
        self.debts: collections.Counter = collections.Counter()  # (debtor, creditor) -> blocks

    @property
    def free_blocks(self) -> int:
        return sum(len(f) for f in self._free)

    def free_ids(self) -> set[int]:
        """The ids free now, on every device."""
        return set(self._free_set)

    def free_on(self, device: int) -> int:
        return len(self._free[device])

    def device_of(self, block: int) -> int:
        return block // self.blocks_per_device

    def allocate(self, count: int, home: int | None = None) -> list[int]:
        """Takes `count` blocks, on `home` first, then borrowed; raises `PoolExhausted`
        (taking none) if fewer are free on all devices together."""
        if count > self.free_blocks:
            raise PoolExhausted(
                f"asked for {count} KV blocks, {self.free_blocks} of {self.num_blocks} free "
                f"over {self.num_devices} devices "
                f"({', '.join(str(len(f)) for f in self._free)} per device)")
        if home is None:
            home = max(range(self.num_devices), key=lambda d: len(self._free[d]))
        taken = [self._free[home].pop() for _ in range(min(count, len(self._free[home])))]
        while len(taken) < count:
            creditor = max(range(self.num_devices), key=lambda d: len(self._free[d]))
            block = self._free[creditor].pop()
            self._borrower[block] = home
            self.debts[(home, creditor)] += 1
            taken.append(block)
        self._free_set.difference_update(taken)
        return taken

    def allocate_on(self, devices: list[int], count: int) -> list[int]:
        """Takes `count` blocks on `devices` only, each from the one with the most free
        blocks; raises `PoolExhausted` (taking none) if fewer are free there."""
        free = sum(len(self._free[d]) for d in devices)
        if count > free:
            raise PoolExhausted(f"asked for {count} KV blocks on devices {devices}, {free} "
                                "free there")
        taken = []
        for _ in range(count):
            device = max(devices, key=lambda d: len(self._free[d]))
            taken.append(self._free[device].pop())
        self._free_set.difference_update(taken)
        return taken

    def free(self, blocks) -> None:
        """Returns blocks to their devices; BlockNotAllocated (and nothing freed) for a
        block freed twice or out of range."""
        blocks = list(blocks)
        seen = set()
        for block in blocks:
            if not 0 <= block < self.num_blocks or block in seen or block in self._free_set:
                raise BlockNotAllocated(f"block {block} is not an allocated block of this pool")
            seen.add(block)
        for block in blocks:
            creditor = self.device_of(block)
            if block in self._borrower:
                key = (self._borrower.pop(block), creditor)
                self.debts[key] -= 1
                if not self.debts[key]:
                    del self.debts[key]
            self._free[creditor].append(block)
            self._free_set.add(block)
