"""The one interface between the engine and a store of KV blocks (`KVStore`), the typed
values it answers in, and the store of an engine that keeps nothing between turns
(`NoStore`).

Every store implements all of `KVStore`: the single process's `AttentionStore`, the
process group's `jattn.distributed.group_store.GroupStore`, and `NoStore`; the engine
never asks which one it has. What differs is answered in values: a run a store loads
comes back with the KV still to write (`LoadedRun.arriving`, layer by layer with the
turn's first step) or already written (empty); a store without a remote tier returns no
`RemoteRead`; a store whose records no other process extends needs no refresh (None).
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field
from typing import Callable, Protocol

from jattn.store.tier import BlockKV


def resolved(value) -> concurrent.futures.Future:
    """A future already resolved to `value`."""
    future = concurrent.futures.Future()
    future.set_result(value)
    return future


@dataclass(frozen=True)
class LoadedRun:
    """The leading run of a lookup that a store loaded: `block_ids[i]`, the pool block
    of the run's key i, and `tiers[i]`, the tier its KV came from ("host", "disk",
    "remote"); `arriving[i]`, the KV still to be written into `block_ids[i]` (by the
    turn's first step, layer by layer), or empty when the store wrote the run into the
    pool already."""

    block_ids: list[int] = field(default_factory=list)
    tiers: list[str] = field(default_factory=list)
    arriving: list[BlockKV] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.block_ids)


class PoolSide(Protocol):
    """The device pool as a store sees it while loading a run into it."""

    def allocate(self, count: int) -> list[int]:
        """`count` pool blocks (evicting cached ones if short); `PoolExhausted`, taking
        none, if there is no room."""

    def allocate_on_process(self, process: int, count: int) -> list[int]:
        """`allocate`, on the devices of process `process` of a group."""

    def free(self, block_ids: list[int]) -> None:
        """Gives pool blocks back."""


class WarmUpSteps(Protocol):
    """The compilations a store asks of the runner at warm-up."""

    def compile_arrivals(self) -> int:
        """Compiles the steps that take KV arriving layer by layer, now or in the
        background after a warm-up (`jattn.model.runner.ModelRunner.compile_arrivals`);
        returns the shapes compiled now."""

    def compile_saves(self, max_blocks: int) -> int:
        """Compiles the copies of up to `max_blocks` blocks out of the pool."""


SavedBlocks = Callable[[], dict]
"""Waits for a step's copies out of the pool; `{pool block: BlockKV}` of the blocks this
process holds."""


class KVStore(Protocol):
    """What the engine asks of a store of KV blocks and session records."""

    @property
    def lookahead(self) -> int:
        """How many upcoming sessions a `hint` is worth."""

    def held(self, keys: list[bytes]) -> list[str | None]:
        """For each key, the fastest tier holding it, or None. Loads nothing."""

    def missing(self, keys: list[bytes]) -> list[bytes]:
        """The keys a save would file: those it holds nowhere (none, for a store that
        keeps nothing)."""

    def load_run(self, keys: list[bytes], pool: PoolSide) -> LoadedRun:
        """Loads the leading run of `keys` it holds into pool blocks taken from `pool`
        (a run that stops where the pool has no room). On an error, gives back what it
        took and raises."""

    def read_remote(self, keys: list[bytes]):
        """Starts reading, off the caller's thread, the leading run of `keys` that a
        tier shared by replicas holds: a `RemoteRead` whose `ready` resolves once the
        first layer came; None when there is no such tier to read."""

    def remote_run(self, read, pool: PoolSide) -> LoadedRun:
        """The run a `read_remote` brought, in pool blocks from `pool`, arriving."""

    def load_layers(self, blocks: list[BlockKV], *, device=None):
        """Starts moving `blocks` (a run's `arriving`) to `device`, one layer at a
        time: a `jattn.model.step_plan.LayerSource`."""

    def save_blocks(self, keys: list[bytes], block_ids: list[int],
                    saved: SavedBlocks) -> None:
        """Files the pool blocks `block_ids` (whose copies a step started; `saved()`
        waits for them) under `keys`, in the background."""

    def hint(self, keys: list[bytes]) -> concurrent.futures.Future:
        """The keys the next requests read, most imminent first: kept longest, and
        prefetched to the fastest tier."""

    def count_device_hits(self, blocks: int, nbytes: int) -> None:
        """Counts blocks reused from the device pool."""

    def newer_record(self, session_id: str, turns_known: int | None, *,
                     check_remote: bool = True) -> list | None:
        """The session's record entries if the store has more than `turns_known`
        (None: the caller knows nothing of it) — another replica's turns, or a session
        of an earlier run — else None."""

    def refresh_record(self, session_id: str) -> concurrent.futures.Future | None:
        """Starts bringing the session's record up to date with replicas that share the
        store; None when none does (nothing to wait for)."""

    def append_record(self, session_id: str, entry: dict) -> concurrent.futures.Future:
        """Appends a turn's entry to the session's record; the future resolves once it
        is as durable as the store makes it."""

    def drop(self, session_id: str) -> None:
        """Forgets the session's record."""

    def warm_up(self, steps: WarmUpSteps, max_blocks: int) -> int:
        """Compiles what its loads and saves of up to `max_blocks` blocks run; returns
        the shapes compiled."""

    def stats(self) -> dict:
        """Its counters (`jattn.store.store.STATS`)."""

    def flush(self) -> None:
        """Waits for its saves and record appends in flight."""

    def close(self) -> None:
        """Flushes and stops its threads."""


class NoStore:
    """The store of an engine that keeps nothing between turns: it holds no block and no
    record, so every turn recomputes its context (the device pool still shares blocks
    between running turns)."""

    lookahead = 0

    def held(self, keys: list[bytes]) -> list[str | None]:
        return [None] * len(keys)

    def missing(self, keys: list[bytes]) -> list[bytes]:
        return []

    def load_run(self, keys: list[bytes], pool: PoolSide) -> LoadedRun:
        return LoadedRun()

    def read_remote(self, keys: list[bytes]) -> None:
        return None

    def remote_run(self, read, pool: PoolSide) -> LoadedRun:
        return LoadedRun()

    def load_layers(self, blocks: list[BlockKV], *, device=None):
        raise RuntimeError("NoStore loads no block: its runs never arrive")

    def save_blocks(self, keys, block_ids, saved) -> None:
        return None

    def hint(self, keys: list[bytes]) -> concurrent.futures.Future:
        return resolved(0)

    def count_device_hits(self, blocks: int, nbytes: int) -> None:
        return None

    def newer_record(self, session_id: str, turns_known: int | None, *,
                     check_remote: bool = True) -> None:
        return None

    def refresh_record(self, session_id: str) -> None:
        return None

    def append_record(self, session_id: str, entry: dict) -> concurrent.futures.Future:
        return resolved(True)

    def drop(self, session_id: str) -> None:
        return None

    def warm_up(self, steps: WarmUpSteps, max_blocks: int) -> int:
        return 0

    def stats(self) -> dict:
        return {}

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None
