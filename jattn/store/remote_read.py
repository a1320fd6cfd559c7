"""A run of blocks read from the remote tier layer by layer, ahead of the engine.

`RemoteRead` asks Redis for layer 0 of every block of the run (one pipelined round trip),
then layer 1, and so on, on a thread of its own. `ready` resolves once layer 0 has
arrived, to the number of leading blocks Redis holds: a turn waits for that off the
engine's thread (so a Redis that hangs before the load holds up only that turn), then
begins, and its layer-wise load (`layer_load.LayerwiseLoad`) takes layer l of each block
through `blocks()` as it arrives, while the engine computes the layers before l. Network
time so overlaps both the host-to-device copies and the compute, and the load's stall and
hidden time include it.

Redis may evict a block (or fail) after its layer 0 was read: the read then raises
`RemoteBlockLost` for that layer and every later one, the load passes it to the engine,
and the engine starts the turn again, recomputing instead (`turns.ChatEngine`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable

import numpy as np

from jattn.store.remote_tier import stacked
from jattn.store.tier import BlockKV

log = logging.getLogger("jattn.store")


class RemoteBlockLost(Exception):
    """A block of a remote read was gone (evicted, corrupt, or Redis failed) when one of
    its later layers was read."""


class RemoteRead:
    """Blocks `keys` read layer by layer from `tier` (a `RemoteTier`) on `executor`.
    `on_arrival(keys, blocks, seconds)` runs on that thread once every layer arrived, with
    the whole blocks (`BlockKV`s) and the seconds the reads took."""

    def __init__(self, tier, keys: list[bytes], *, executor: concurrent.futures.Executor,
                 on_arrival: Callable[[list[bytes], list[BlockKV], float], None],
                 on_lost: Callable[[], None], wait_s: float = 30.0):
        self.keys = list(keys)
        self.ready: concurrent.futures.Future = concurrent.futures.Future()
        self.num_layers = 0
        self._tier = tier
        self._on_arrival = on_arrival
        self._on_lost = on_lost
        self._wait_s = wait_s
        self._layers: list[concurrent.futures.Future] = []
        executor.submit(self._run)

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            arrived = self._read_layers()
        except BaseException as error:  # a bug, not a fault of Redis (those read as None)
            log.exception("a read from the remote tier failed")
            self._lose(RemoteBlockLost(f"the read failed: {error!r}"))
            return
        if arrived:
            layers = [future.result() for future in self._layers]
            blocks = [stacked([layer[i] for layer in layers]) for i in range(len(self.keys))]
            self._on_arrival(self.keys, blocks, time.perf_counter() - start)

    def _read_layers(self) -> bool:
        """Reads every layer; True if all arrived for at least one block."""
        first = self._tier.read_layer(self.keys, 0)
        held = next((i for i, got in enumerate(first) if got is None), len(first))
        self.keys = self.keys[:held]
        if held:
            self.num_layers = first[0][2]
            self._layers = [concurrent.futures.Future() for _ in range(self.num_layers)]
            self._layers[0].set_result([(k, v) for k, v, _ in first[:held]])
        self.ready.set_result(held)
        for layer in range(1, self.num_layers):
            got = self._tier.read_layer(self.keys, layer)
            if any(item is None for item in got):
                missing = sum(item is None for item in got)
                self._lose(RemoteBlockLost(f"{missing} of {len(got)} blocks lost their layer "
                                           f"{layer} in the remote tier during a load"))
                return False
            self._layers[layer].set_result([(k, v) for k, v, _ in got])
        return held > 0

    def _lose(self, lost: RemoteBlockLost) -> None:
        """Every layer not yet arrived raises `lost`."""
        if not self.ready.done():
            self.keys = []
            self.ready.set_result(0)
        for pending in self._layers:
            if not pending.done():
                pending.set_exception(lost)
        self._on_lost()

    def layer(self, layer: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Layer `layer` of every block, `(k, v)` `[block_size, Hkv, D]` each, waiting for
        it; raises `RemoteBlockLost` if a block was lost (or nothing came in `wait_s`)."""
        try:
            return self._layers[layer].result(timeout=self._wait_s)
        except concurrent.futures.TimeoutError:
            raise RemoteBlockLost(f"layer {layer} did not arrive from the remote tier "
                                  f"within {self._wait_s:.0f} s") from None

    def blocks(self) -> list[BlockKV]:
        """The run's blocks (after `ready`), each layer taken from the read as it arrives:
        `BlockKV`s whose k and v are `[L, block_size, Hkv, D]`-shaped sources indexed by
        layer."""
        shape = (self.num_layers, *self._layers[0].result()[0][0].shape)
        return [BlockKV(_LayerSource(self, i, 0, shape), _LayerSource(self, i, 1, shape))
                for i in range(len(self.keys))]


class _LayerSource:
    """One block's keys (`part` 0) or values (1) in a `RemoteRead`: `source[l]` is layer
    l, `[block_size, Hkv, D]`, once it has arrived."""

    def __init__(self, read: RemoteRead, index: int, part: int, shape: tuple[int, ...]):
        self._read = read
        self._index = index
        self._part = part
        self.shape = shape
        self.dtype = read.layer(0)[0][0].dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __getitem__(self, layer: int) -> np.ndarray:
        return self._read.layer(layer)[self._index][self._part]


def is_remote(block: BlockKV) -> bool:
    """Whether `block`'s layers come from a `RemoteRead`."""
    return isinstance(block.k, _LayerSource)
