"""Layer-wise pre-loading: blocks' KV moves to the device one layer at a time, ahead of
the layer that needs it.

A background thread stages layer l of every block into one contiguous, 64-byte aligned
`[rows, block_size, Hkv, D]` buffer and hands it to the device, layer after layer, while
the engine computes the layers before l. The engine takes layer l with `layer(l, after=x)`,
where `x` is the output of layer l-1: if the layer has not arrived yet, it waits for `x`
first, so the time it then spends waiting is time the device sat idle for the transfer
(the stall). Transfer time minus stall is the time hidden behind compute.

The aliasing trap: on some backends `device_put` of an aligned numpy buffer keeps using
that very buffer (and elsewhere the copy out of it completes later). Staging buffers are
therefore reused only when nothing but their pool refers to them: JAX holds a reference
to a host buffer for as long as any device array, or computation, may read it.
"""

from __future__ import annotations

import concurrent.futures
import sys
import time
from dataclasses import dataclass

import jax
import numpy as np

from jattn.store.disk_entry import ALIGNMENT, aligned_empty, aligned_view


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


class StagingPool:
    """Aligned host buffers for staging, reused once no one else refers to them.

    `take(nbytes)` returns an aligned uint8 view of exactly `nbytes` into a pooled
    allocation that nothing else refers to — no view of it is alive, so no device array
    aliases it and no copy out of it is in flight (every view, and JAX while it uses a
    host buffer, holds a reference to the allocation) — else into a new allocation,
    pooled while the pool holds fewer than `capacity`. Used from one staging thread.
    """

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._allocations: list[np.ndarray] = []

    def take(self, nbytes: int) -> np.ndarray:
        for allocation in self._allocations:
            # Free when its only references are the pool's list, this loop's variable and
            # getrefcount's argument.
            if allocation.nbytes == nbytes + ALIGNMENT and sys.getrefcount(allocation) == 3:
                return aligned_view(allocation, nbytes)
        view = aligned_empty(nbytes)
        if len(self._allocations) < self.capacity:
            self._allocations.append(view.base)
        return view


def _runs(blocks: list) -> list[tuple[object, int]]:
    """`blocks` (keys or values, `[L, *piece]` each) grouped into runs `(first, count)`:
    neighbours that are back-to-back views of one layer-major `[L, count, *piece]` array
    (a turn's blocks, saved together) share a run, whose every layer is then one
    contiguous piece of memory, copied at once. Found once per load. A block that is not
    a numpy array (anything indexable by layer) is a run of its own."""
    runs, start = [], 0
    for i in range(1, len(blocks) + 1):
        if i == len(blocks) or not _follows(blocks[i - 1], blocks[i]):
            runs.append((blocks[start], i - start))
            start = i
    return runs


def _follows(a, b) -> bool:
    """Whether `b` is the block after `a` in the same layer-major array: same allocation
    and strides, contiguous layers, `b`'s layers each right after `a`'s."""
    return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.base is not None
            and b.base is a.base and a.strides == b.strides and a[0].flags.c_contiguous
            and b.__array_interface__["data"][0] - a.__array_interface__["data"][0]
            == a[0].nbytes)


def _stage(runs: list[tuple[object, int]], layer: int, rows: int,
           pool: StagingPool) -> np.ndarray:
    """Layer `layer` of `runs` (from `_runs`) stacked into an aligned buffer of `rows`
    rows of `[block_size, Hkv, D]` from `pool`, one copy per run; padding rows are zero."""
    pieces = [(np.asarray(first[layer]), count) for first, count in runs]
    piece = pieces[0][0]
    buffer = pool.take(rows * piece.nbytes).view(piece.dtype).reshape(rows, *piece.shape)
    row = 0
    for first, count in pieces:
        if count == 1:
            buffer[row] = first
        else:
            np.copyto(buffer[row:row + count], np.lib.stride_tricks.as_strided(
                first, (count, *first.shape), (first.nbytes, *first.strides),
                writeable=False))
        row += count
    buffer[row:] = 0
    return buffer


class LayerwiseLoad:
    """The KV of `blocks` (`BlockKV`s, `[L, block_size, Hkv, D]` each) moving to `device`
    layer by layer on `executor`. `layer(l)` gives `(k, v)`, `[rows, block_size, Hkv, D]`
    device arrays, rows past `len(blocks)` zero."""

    def __init__(self, blocks, *, rows: int, executor: concurrent.futures.Executor,
                 staging: StagingPool | None = None, device=None, on_finish=None):
        if not blocks or rows < len(blocks):
            raise ValueError(f"need 1 <= len(blocks) <= rows, got {len(blocks)} and {rows}")
        self.num_layers = blocks[0].k.shape[0]
        self._device = device or jax.devices()[0]
        self._transfer = [0.0] * self.num_layers
        self._stall = 0.0
        self._on_finish = on_finish
        self._staging = staging or StagingPool(capacity=0)
        self._taken = 0
        self._layers = [concurrent.futures.Future() for _ in range(self.num_layers)]
        executor.submit(self._run, blocks, rows)

    def _run(self, blocks, rows: int) -> None:
        for layer, future in enumerate(self._layers):
            start = time.perf_counter()
            try:
                if layer == 0:
                    k_runs, v_runs = _runs([b.k for b in blocks]), _runs([b.v for b in blocks])
                k = _stage(k_runs, layer, rows, self._staging)
                v = _stage(v_runs, layer, rows, self._staging)
                pair = jax.device_put((k, v), self._device)
                jax.block_until_ready(pair)
            except BaseException as error:  # the engine sees it when it takes the layer
                for pending in self._layers[layer:]:
                    pending.set_exception(error)
                return
            self._transfer[layer] = time.perf_counter() - start
            future.set_result(pair)

    def layer(self, layer: int, *, after=None):
        """Layer `layer`'s `(k, v)` on the device. `after`: the array the engine's last
        step produced; waited for first when the layer is late, to tell a stall from a
        wait that overlapped compute."""
        if layer != self._taken:
            raise ValueError(f"layers are taken in order: expected {self._taken}, got {layer}")
        future = self._layers[layer]
        if not future.done():
            if after is not None:
                jax.block_until_ready(after)
            start = time.perf_counter()
            concurrent.futures.wait([future])
            self._stall += time.perf_counter() - start
        pair = future.result()
        self._taken += 1
        if self._taken == self.num_layers and self._on_finish is not None:
            self._on_finish(self.timing())
        return pair

    def timing(self) -> LoadTiming:
        return LoadTiming(transfer=sum(self._transfer), stall=self._stall)
