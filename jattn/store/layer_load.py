"""Layer-wise pre-loading: blocks' KV moves to the device one layer at a time, ahead of
the layer that needs it.

A background thread stages layer l of every block into one contiguous, 64-byte aligned
`[rows, block_size, Hkv, D]` buffer and hands it to the device, layer after layer, while
the engine computes the layers before l. The engine takes layer l with `layer(l, after=x)`,
where `x` is the output of layer l-1: if the layer has not arrived yet, it waits for `x`
first, so the time it then spends waiting is time the device sat idle for the transfer
(the stall). Transfer time minus stall is the time hidden behind compute.

The aliasing trap: on some backends `device_put` of an aligned numpy buffer keeps using
that very buffer. Every layer therefore gets a fresh staging buffer that nothing else
holds or writes; it is freed when the device array that may alias it is.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass

import jax
import numpy as np

from jattn.store.disk_entry import aligned_empty


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


def _stage(arrays: list[np.ndarray], rows: int) -> np.ndarray:
    """`arrays` (each `[block_size, Hkv, D]`) stacked into a fresh aligned buffer of
    `rows` rows; padding rows are zero."""
    first = arrays[0]
    buffer = aligned_empty(rows * first.nbytes).view(first.dtype).reshape(rows, *first.shape)
    np.stack(arrays, out=buffer[:len(arrays)])
    buffer[len(arrays):] = 0
    return buffer


class LayerwiseLoad:
    """The KV of `blocks` (`BlockKV`s, `[L, block_size, Hkv, D]` each) moving to `device`
    layer by layer on `executor`. `layer(l)` gives `(k, v)`, `[rows, block_size, Hkv, D]`
    device arrays, rows past `len(blocks)` zero."""

    def __init__(self, blocks, *, rows: int, executor: concurrent.futures.Executor,
                 device=None, on_finish=None):
        if not blocks or rows < len(blocks):
            raise ValueError(f"need 1 <= len(blocks) <= rows, got {len(blocks)} and {rows}")
        self.num_layers = blocks[0].k.shape[0]
        self._device = device or jax.devices()[0]
        self._transfer = [0.0] * self.num_layers
        self._stall = 0.0
        self._on_finish = on_finish
        self._taken = 0
        self._layers = [concurrent.futures.Future() for _ in range(self.num_layers)]
        executor.submit(self._run, blocks, rows)

    def _run(self, blocks, rows: int) -> None:
        for layer, future in enumerate(self._layers):
            start = time.perf_counter()
            try:
                k = _stage([b.k[layer] for b in blocks], rows)
                v = _stage([b.v[layer] for b in blocks], rows)
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
