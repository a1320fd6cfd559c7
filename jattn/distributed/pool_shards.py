"""A process's own blocks of a KV pool sharded over a mesh that may span processes.

Device d of the mesh's one axis holds block ids `[d * n, (d + 1) * n)` (`n` blocks per
device, as `DistributedBlockAllocator` hands them out). `read` and `write` take a list
of global block ids and touch, on each device, only the ids it holds: one jitted
`shard_map` program with no collective, so no byte crosses devices or processes. Every
process of a group runs the same program (the leader announces it); each gives and
takes the blocks on its own devices only.
"""

from __future__ import annotations

import collections
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jattn.model.kv_cache import KVPool, bucket, powers_of_two
from jattn.store.tier import BlockKV


def _read_local(pool: KVPool, local_ids):
    """On one device: its pool share `[n, bs, Hkv, D]` per layer and `local_ids [1, m]`
    -> `k, v [1, L, m, bs, Hkv, D]`."""
    ids = local_ids[0]
    return (jnp.stack([p[ids] for p in pool.k])[None],
            jnp.stack([p[ids] for p in pool.v])[None])


def _write_local(pool: KVPool, local_ids, k, v) -> KVPool:
    """On one device: writes `k, v [1, L, m, bs, Hkv, D]` into its pool share at
    `local_ids [1, m]` (ids past the share: padding, dropped)."""
    ids = local_ids[0]
    return KVPool(
        tuple(p.at[ids].set(k[0, layer].astype(p.dtype), mode="drop")
              for layer, p in enumerate(pool.k)),
        tuple(p.at[ids].set(v[0, layer].astype(p.dtype), mode="drop")
              for layer, p in enumerate(pool.v)))


class PoolShards:
    """Where the `num_blocks` blocks of a pool sharded over `mesh`'s axis `axis` live,
    and the reads and writes of each process's own."""

    def __init__(self, mesh, num_blocks: int, axis: str):
        self.devices = list(mesh.devices.flat)
        self.blocks_per_device = num_blocks // len(self.devices)
        self._sharding = NamedSharding(mesh, P(axis))
        self._read = jax.jit(jax.shard_map(
            _read_local, mesh=mesh, in_specs=(P(axis), P(axis)),
            out_specs=(P(axis), P(axis)), check_vma=False))
        self._write = jax.jit(jax.shard_map(
            _write_local, mesh=mesh, in_specs=(P(axis),) * 4, out_specs=P(axis),
            check_vma=False), donate_argnums=0)

    def process_of(self, block: int) -> int:
        """The process whose device holds pool block `block`."""
        return self.devices[block // self.blocks_per_device].process_index

    def positions_of(self, process: int) -> list[int]:
        """The mesh positions (the allocator's device numbers) of `process`'s devices."""
        return [d for d, device in enumerate(self.devices) if device.process_index == process]

    def _local_ids(self, ids: list[int], fill: int) -> tuple[np.ndarray, dict]:
        """`ids` as each device's local ids `[D, m]` (padded with `fill`, m a power of
        two) and where each id went: `{id: (position, row)}`."""
        rows: list[list[int]] = [[] for _ in self.devices]
        where = {}
        for block in ids:
            position, local = divmod(block, self.blocks_per_device)
            where[block] = (position, len(rows[position]))
            rows[position].append(local)
        width = bucket(max(map(len, rows)), minimum=1)
        table = np.full((len(self.devices), width), fill, np.int32)
        for position, local in enumerate(rows):
            table[position, :len(local)] = local
        return table, where

    def _global(self, table: np.ndarray):
        return jax.make_array_from_callback(table.shape, self._sharding,
                                            lambda index: table[index])

    def read(self, pool: KVPool, ids: list[int], memory_kind: str | None = None
             ) -> Callable[[], dict[int, BlockKV]]:
        """Starts copying pool blocks `ids` out of the devices that hold them, each on
        its own (the next step may donate the pool), into host memory of `memory_kind`
        (e.g. "pinned_host"; None: a plain copy when they are read). Returns a function
        that waits and gives this process's blocks among `ids`, by id, as numpy
        `[L, bs, Hkv, D]`: views of one layer-major `[L, m, bs, Hkv, D]` array per device
        (its m blocks in the order of `ids`), so that a load copies a layer of a
        device's blocks as one piece."""
        table, where = self._local_ids(ids, fill=0)
        k, v = self._read(pool, self._global(table))
        if memory_kind is not None:
            k, v = jax.device_put((k, v), self._sharding.with_memory_kind(memory_kind))
        counts = collections.Counter(position for position, _ in where.values())

        def blocks() -> dict[int, BlockKV]:
            mine = {}
            for k_shard, v_shard in zip(k.addressable_shards, v.addressable_shards):
                position = k_shard.index[0].start
                if position in counts:  # only devices that hold some of `ids`
                    mine[position] = tuple(
                        np.ascontiguousarray(np.asarray(shard.data)[0, :, :counts[position]])
                        for shard in (k_shard, v_shard))
            return {block: BlockKV(mine[position][0][:, row], mine[position][1][:, row])
                    for block, (position, row) in where.items() if position in mine}

        return blocks

    def write(self, pool: KVPool, ids: list[int], blocks: dict[int, BlockKV]) -> KVPool:
        """Writes into pool blocks `ids` this process's share of them, `blocks[id]`
        (every id of `ids` on this process's devices; the others' processes write
        theirs). Donates `pool`; returns the new one."""
        table, where = self._local_ids(ids, fill=self.blocks_per_device)
        pages = pool.k[0]
        shape = (len(self.devices), len(pool.k), table.shape[1], *pages.shape[1:])

        def rows_of(part: str, index) -> np.ndarray:
            """Device `index`'s rows `[1, L, m, bs, Hkv, D]` (only this process's
            devices are asked for)."""
            position = index[0].start
            rows = np.zeros((1, *shape[1:]), pages.dtype)
            for block, (at, row) in where.items():
                if at == position:
                    rows[0, :, row] = getattr(blocks[block], part)
            return rows

        k, v = (jax.make_array_from_callback(shape, self._sharding,
                                             functools.partial(rows_of, part))
                for part in ("k", "v"))
        return self._write(pool, self._global(table), k, v)

    def compiled_text(self, pool: KVPool, width: int) -> tuple[str, str]:
        """The compiled `read` and `write` programs for `width` blocks per device, as
        HLO text (to check what crosses devices)."""
        table = self._global(np.zeros((len(self.devices), width), np.int32))
        pages = pool.k[0]
        rows = jax.ShapeDtypeStruct((len(self.devices), len(pool.k), width, *pages.shape[1:]),
                                    pages.dtype, sharding=self._sharding)
        return (self._read.lower(pool, table).compile().as_text(),
                self._write.lower(pool, table, rows, rows).compile().as_text())

    def compile_reads(self, pool: KVPool, max_blocks: int,
                      memory_kind: str | None = None) -> int:
        """Compiles `read` (into `memory_kind`) for every width up to `max_blocks`
        blocks on one device. Returns the shapes compiled."""
        widths = powers_of_two(1, bucket(max_blocks, minimum=1))
        for width in widths:
            k, v = self._read(pool, self._global(np.zeros((len(self.devices), width), np.int32)))
            if memory_kind is not None:
                k, v = jax.device_put((k, v), self._sharding.with_memory_kind(memory_kind))
            jax.block_until_ready((k, v))
        return len(widths)

    def compile_writes(self, pool: KVPool, max_blocks: int) -> tuple[KVPool, int]:
        """Compiles `write` for every width up to `max_blocks` blocks on one device,
        writing nothing. Returns the pool and the shapes compiled."""
        widths = powers_of_two(1, bucket(max_blocks, minimum=1))
        pages = pool.k[0]
        for width in widths:
            padding = np.full((len(self.devices), width), self.blocks_per_device, np.int32)
            zeros = np.zeros((len(self.devices), len(pool.k), width, *pages.shape[1:]),
                             pages.dtype)
            pool = self._write(pool, self._global(padding), self._global(zeros),
                               self._global(zeros))
        return jax.block_until_ready(pool), len(widths)
