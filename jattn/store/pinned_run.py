"""A turn's saved blocks kept where the device's link reads them: per layer, one array of
the memory kind `pinned_host` (page-locked host memory that an accelerator's DMA engine
reads directly; or another host memory kind asked for, e.g. `unpinned_host`).

`copy_out` with a memory kind copies a turn's pool blocks out per layer, keys and values
`[R, block_size, Hkv, D]` each (R = `bucket(n, 1)`: the n blocks, then padding rows),
into that memory; the host tier holds each block as a `BlockKV` of two `RunPart`s. A
load of a run's blocks from its first moves layer l as one transfer of the run's own
layer array, with no copy on the host (`layer_load`; a run of fewer than `MIN_ROWS` rows
is staged instead). Anything else that reads a block (the disk and remote tiers'
writes, a load from the middle of a run) indexes it like a numpy
`[L, block_size, Hkv, D]` array: the run copies its layers into numpy once for all of
them.
"""

from __future__ import annotations

import threading

import numpy as np

from jattn.store.tier import BlockKV


class PinnedRun:
    """`count` saved blocks: `layers[part][l]` is layer l of the keys (part 0) or values
    (1) of all of them, a `[R, block_size, Hkv, D]` jax array in a host memory kind
    (pinned host memory by default) whose first `count` rows are the blocks."""

    def __init__(self, k_layers: tuple, v_layers: tuple, count: int):
        self.layers = (tuple(k_layers), tuple(v_layers))
        self.count = count
        self.owners = (RunLayers(self, 0), RunLayers(self, 1))
        self._lock = threading.Lock()
        self._host: list[np.ndarray | None] = [None, None]

    def blocks(self) -> list[BlockKV]:
        """The run's blocks, in order."""
        return [BlockKV(RunPart(self, 0, i), RunPart(self, 1, i)) for i in range(self.count)]

    def host(self, part: int) -> np.ndarray:
        """Keys (0) or values (1) of the whole run as numpy `[L, R, block_size, Hkv, D]`,
        copied out of pinned memory the first time they are asked for."""
        with self._lock:
            if self._host[part] is None:
                self._host[part] = np.stack([np.asarray(layer) for layer in self.layers[part]])
                self._host[part].flags.writeable = False
            return self._host[part]


class RunLayers:
    """What a `RunPart` views: keys or values of a whole `PinnedRun`, all layers and rows
    (`nbytes`); the host tier counts the bytes its held blocks do not view."""

    def __init__(self, run: PinnedRun, part: int):
        self.run = run
        self.part = part
        self.nbytes = sum(layer.nbytes for layer in run.layers[part])


class RunPart:
    """Block `index`'s keys (part 0) or values (1) in `run`, read like a numpy
    `[L, block_size, Hkv, D]` array: `part[l]` is layer l, `np.asarray(part)` all."""

    def __init__(self, run: PinnedRun, part: int, index: int):
        self.run = run
        self.part = part
        self.index = index
        layer = run.layers[part][0]
        self.shape = (len(run.layers[part]), *layer.shape[1:])
        self.dtype = np.dtype(layer.dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.base = run.owners[part]  # what the host tier counts it as a view of

    def __getitem__(self, layer):
        return self.run.host(self.part)[layer, self.index]

    def __array__(self, dtype=None, copy=None):
        array = self.run.host(self.part)[:, self.index]
        return array if dtype is None else array.astype(dtype)

