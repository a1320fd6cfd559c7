"""Layer-wise pre-loading: blocks' KV moves to the device one layer at a time, ahead of
the layer that needs it.

A background thread hands layer l of every block to the device, layer after layer, while
the engine computes the layers before l. The engine takes layer l with `layer(l, after=x)`,
where `x` is the output of layer l-1: if the layer has not arrived yet, it waits for `x`
first, so the time it then spends waiting is time the device sat idle for the transfer
(the stall). Transfer time minus stall is the time hidden behind compute.

A turn's blocks are saved as views of one layer-major `[L, n, bs, Hkv, D]` array, so
that layer l of a run of them is one contiguous piece of memory: that piece goes to the
device as it is, in one transfer, with no copy on the host (on CPU the device array
uses the very memory); with a host memory kind (`pinned_host` on an accelerator) the
saves are `PinnedRun`s, whose layer arrays go to the device by DMA from where they are
(`pinned_run`). Rows are moved in power-of-two pieces (a few compiled writes put
them in the pool): a run takes the rows after it in its array when they are enough, else
splits into power-of-two pieces. Blocks that are in no run of `MIN_ROWS` (read back one
by one from disk, from a remote store, a run's last few) are copied, one layer at a
time, into one contiguous 64-byte aligned staging buffer.

The aliasing trap: on some backends `device_put` of an aligned numpy buffer keeps using
that very buffer (and elsewhere the copy out of it completes later). Staging buffers are
therefore reused only when nothing but their pool refers to them: JAX holds a reference
to a host buffer for as long as any device array, or computation, may read it.
"""

from __future__ import annotations

import concurrent.futures
import math
import sys
import threading
import time
from dataclasses import dataclass

import jax
import numpy as np

from jattn.model.kv_cache import bucket
from jattn.model.step_plan import ArrivingRows
from jattn.store.disk_entry import ALIGNMENT, aligned_array, aligned_empty, aligned_view
from jattn.store.pinned_run import RunPart

MIN_ROWS = 4  # the fewest rows moved as one piece (`PoolLimits.load_row_buckets`)


@dataclass(frozen=True)
class LoadTiming:
    """Seconds of one layer-wise load: `transfer` (staging and device copies, summed over
    layers), `stall` (the engine waited with nothing left to compute), `hidden`
    (transfer overlapped with compute: `max(transfer - stall, 0)`)."""

    transfer: float
    stall: float

    @property
    def hidden(self) -> float:
        return max(self.transfer - self.stall, 0.0)


class HostBuffers:
    """Aligned host allocations, reused once nothing else refers to them.

    `take(nbytes)` returns a 64-byte aligned uint8 view of `nbytes` in an allocation of
    at most `SLACK` times that which nothing else refers to, else in a new one. Nothing
    refers to an allocation when no view of it is alive: every view (a block held by a
    tier, a staged layer), and JAX for as long as a device array aliases it or a copy out
    of it is in flight, holds a reference to it. Reused memory is memory the kernel need
    not fault in and zero again (a fresh 256 MiB costs about as much as reading it).
    Allocations are kept while all kept add up to at most `capacity_bytes` (in use or
    not) and number at most `MAX_KEPT` (each `take` looks at every kept one), the oldest
    unused ones making room for a new one. Thread-safe.
    """

    SLACK = 1.25
    MAX_KEPT = 256

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._allocations: list[np.ndarray] = []  # oldest first
        self._kept_bytes = 0  # of `_allocations`
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        need = nbytes + ALIGNMENT
        with self._lock:
            unused = self._unused()
            fitting = [a for a in unused if need <= a.nbytes <= need * self.SLACK]
            if fitting:
                return aligned_view(min(fitting, key=lambda a: a.nbytes), nbytes)
            view = aligned_empty(nbytes)
            dropped = set()
            for oldest in unused:
                if (self._kept_bytes + need <= self.capacity_bytes
                        and len(self._allocations) - len(dropped) < self.MAX_KEPT):
                    break
                dropped.add(id(oldest))
                self._kept_bytes -= oldest.nbytes
            if dropped:
                self._allocations = [a for a in self._allocations if id(a) not in dropped]
            if (self._kept_bytes + need <= self.capacity_bytes
                    and len(self._allocations) < self.MAX_KEPT):
                self._allocations.append(view.base)
                self._kept_bytes += view.base.nbytes
            return view

    def _unused(self) -> list[np.ndarray]:
        # Unused when its only references are the list, the loop's variable and
        # getrefcount's argument.
        return [allocation for allocation in self._allocations
                if sys.getrefcount(allocation) == 3]


def empty_run(block_shape: tuple[int, ...], dtype, count: int,
              buffers: HostBuffers | None = None) -> np.ndarray:
    """An uninitialised layer-major `[L, count, bs, Hkv, D]` array for `count` blocks of
    `block_shape` `[L, bs, Hkv, D]`: 64-byte aligned, with room after it for the padding
    rows that make a layer of it one power-of-two piece (for `MIN_ROWS` blocks or more),
    so that a load moves each layer of its blocks as it is. Its memory comes from
    `buffers` when given."""
    layers, *piece = block_shape
    row_bytes = math.prod(piece) * np.dtype(dtype).itemsize
    spare_rows = bucket(count, MIN_ROWS) - count if count >= MIN_ROWS else 0
    shape = (layers, count, *piece)
    if buffers is None:
        return aligned_array(shape, dtype, spare_bytes=spare_rows * row_bytes)
    nbytes = (layers * count + spare_rows) * row_bytes
    return buffers.take(nbytes)[:layers * count * row_bytes].view(dtype).reshape(shape)


def saved_run(blocks: np.ndarray) -> np.ndarray:
    """Saved blocks `[L, n, bs, Hkv, D]` copied into an `empty_run`."""
    run = empty_run((blocks.shape[0], *blocks.shape[2:]), blocks.dtype, blocks.shape[1])
    np.copyto(run, blocks)
    return run


@dataclass(frozen=True)
class _Direct:
    """Arriving blocks `first..first+count-1`, views of one layer-major array from
    `block` on, moved as layer rows `[rows]` of that array (`rows` >= count)."""

    first: int
    count: int
    rows: int
    block: object  # the BlockKV of arriving block `first`


def _pieces(blocks: list) -> tuple[list[_Direct], list[int]]:
    """How `blocks` move: runs of back-to-back views of one layer-major array as
    `_Direct` pieces, and the indices of the blocks left to stage."""
    directs, staged, start = [], [], 0
    for i in range(1, len(blocks) + 1):
        if i < len(blocks) and _follows(blocks[i - 1], blocks[i]):
            continue
        spans = (_run_spans(i - start, blocks[start]) if isinstance(blocks[start].k, RunPart)
                 else _spans(i - start, _rows_from(blocks[start])))
        directs += [_Direct(start + offset, count, rows, blocks[start + offset])
                    for offset, count, rows in spans]
        staged.extend(range(start + sum(count for _, count, _ in spans), i))
        start = i
    return directs, staged


def _spans(count: int, available: int) -> list[tuple[int, int, int]]:
    """A run of `count` blocks with `available` rows in its array from its first on,
    as `(offset, count, rows)` pieces of power-of-two rows (at least `MIN_ROWS`): one
    piece when its bucket fits in the array, else the largest powers of two that fit
    in `count`; the rest (fewer than `MIN_ROWS`) is left out."""
    if count >= MIN_ROWS and bucket(count, MIN_ROWS) <= available:
        return [(0, count, bucket(count, MIN_ROWS))]
    spans, offset, size = [], 0, 1 << (count.bit_length() - 1)
    while size >= MIN_ROWS:
        if count - offset >= size:
            spans.append((offset, size, size))
            offset += size
        size //= 2
    return spans


def _run_spans(count: int, block) -> list[tuple[int, int, int]]:
    """A run of `count` blocks of a `PinnedRun` from `block` on, as `_spans` gives: the
    run's whole layer arrays when it starts at the run's first block and they have at
    least `MIN_ROWS` rows (rows past it are the run's other blocks and padding), else
    nothing (staged)."""
    rows = block.k.run.layers[0][0].shape[0]
    return [(0, count, rows)] if block.k.index == 0 and rows >= MIN_ROWS else []


def _rows_from(block) -> int:
    """How many rows of `[block_size, Hkv, D]` a layer of `block` may be read as, from
    it on, within the allocation its keys and values view (those past its own array
    dropped when written): bounded by the last layer, the end of the allocation. 1 for
    a block that is no view of a larger array."""
    rows = []
    for part in (block.k, block.v):
        base = part.base if isinstance(part, np.ndarray) else None
        if not isinstance(base, np.ndarray) or not part[0].flags.c_contiguous:
            return 1
        end = base.__array_interface__["data"][0] + base.nbytes
        rows.append((end - part[-1].__array_interface__["data"][0]) // part[-1].nbytes)
    return min(rows)


def _follows(a, b) -> bool:
    """Whether block `b` is the block after `a` in the same layer-major arrays, or in
    the same `PinnedRun`."""
    if isinstance(a.k, RunPart) and isinstance(b.k, RunPart):
        return b.k.run is a.k.run and b.k.index == a.k.index + 1
    return _part_follows(a.k, b.k) and _part_follows(a.v, b.v)


def _part_follows(a, b) -> bool:
    """Whether `b` is the block after `a` in the same layer-major array: same allocation
    and strides, contiguous layers, `b`'s layers each right after `a`'s."""
    return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.base is not None
            and b.base is a.base and a.strides == b.strides and a[0].flags.c_contiguous
            and b.__array_interface__["data"][0] - a.__array_interface__["data"][0]
            == a[0].nbytes)


def _layer_rows(part, layer: int, rows: int):
    """`[rows, block_size, Hkv, D]`: layer `layer` of the block `part` and of the
    `rows - 1` after it in their layer-major array (a view, no copy), or in their
    `PinnedRun` (its layer array: `part` is its first block)."""
    if isinstance(part, RunPart):
        return part.run.layers[part.part][layer]
    piece = part[layer]
    return np.lib.stride_tricks.as_strided(piece, (rows, *piece.shape),
                                           (piece.nbytes, *piece.strides), writeable=False)


def _stage(parts: list, layer: int, pool: HostBuffers) -> np.ndarray:
    """Layer `layer` of `parts` (keys or values, `[L, *piece]` each, anything indexable
    by layer) stacked into an aligned buffer of `bucket(len(parts), MIN_ROWS)` rows from
    `pool`; rows past them are left as they were."""
    piece = np.asarray(parts[0][layer])
    rows = bucket(len(parts), MIN_ROWS)
    buffer = pool.take(rows * piece.nbytes).view(piece.dtype).reshape(rows, *piece.shape)
    for row, part in enumerate(parts):
        buffer[row] = part[layer]
    return buffer


class LayerwiseLoad:
    """The KV of `blocks` (`BlockKV`s, `[L, block_size, Hkv, D]` each) moving to `device`
    layer by layer on `executor`. `layer(l)` gives layer l of every block as
    `ArrivingRows` pieces."""

    def __init__(self, blocks, *, executor: concurrent.futures.Executor,
                 staging: HostBuffers | None = None, device=None, on_finish=None):
        if not blocks:
            raise ValueError("a load needs at least one block")
        self.num_layers = blocks[0].k.shape[0]
        self._device = device or jax.devices()[0]
        self._transfer = [0.0] * self.num_layers
        self._stall = 0.0
        self._on_finish = on_finish
        self._staging = staging or HostBuffers(capacity_bytes=0)
        self._taken = 0
        self._layers = [concurrent.futures.Future() for _ in range(self.num_layers)]
        executor.submit(self._run, blocks)

    def _run(self, blocks) -> None:
        for layer, future in enumerate(self._layers):
            start = time.perf_counter()
            try:
                if layer == 0:
                    directs, staged = _pieces(blocks)
                    staged_k = [blocks[i].k for i in staged]
                    staged_v = [blocks[i].v for i in staged]
                host = [(_layer_rows(d.block.k, layer, d.rows),
                         _layer_rows(d.block.v, layer, d.rows)) for d in directs]
                if staged:
                    host.append((_stage(staged_k, layer, self._staging),
                                 _stage(staged_v, layer, self._staging)))
                arrived = jax.block_until_ready(jax.device_put(host, self._device))
            except BaseException as error:  # the engine sees it when it takes the layer
                for pending in self._layers[layer:]:
                    pending.set_exception(error)
                return
            indices = [tuple(range(d.first, d.first + d.count)) for d in directs]
            if staged:
                indices.append(tuple(staged))
            self._transfer[layer] = time.perf_counter() - start
            future.set_result([ArrivingRows(rows, k, v)
                               for rows, (k, v) in zip(indices, arrived)])

    def layer(self, layer: int, *, after=None) -> list[ArrivingRows]:
        """Layer `layer` of every block on the device, in pieces (see `ArrivingRows`).
        `after`: the array the engine's last step produced; waited for first when the
        layer is late, to tell a stall from a wait that overlapped compute."""
        if layer != self._taken:
            raise ValueError(f"layers are taken in order: expected {self._taken}, got {layer}")
        future = self._layers[layer]
        if not future.done():
            if after is not None:
                jax.block_until_ready(after)
            start = time.perf_counter()
            concurrent.futures.wait([future])
            self._stall += time.perf_counter() - start
        pieces = future.result()
        self._taken += 1
        if self._taken == self.num_layers and self._on_finish is not None:
            self._on_finish(self.timing())
        return pieces

    def timing(self) -> LoadTiming:
        return LoadTiming(transfer=sum(self._transfer), stall=self._stall)
