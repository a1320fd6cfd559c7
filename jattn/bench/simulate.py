"""The store's placement at a trace's full size, without a model or data.

A Mooncake-format trace runs through the classes that keep and evict blocks in the engine
and the store: `DeviceBlocks` for the device tier, and a `Placement` each for host
memory, disk and the remote tier (a Redis shared by replicas: 0 bytes by default). Each
hash id of a request is one block of KV of the trace's `block_tokens` tokens (a prompt's
last, partial block too); generated tokens add none. Requests run one at a time, each
doing to the tiers what a turn does:

1. **Lookup** (`KVCacheManager.match` over `AttentionStore.get_run` and `read_remote`):
   each block of the prompt, in order, comes from the first tier that holds it (device,
   host, disk, remote), up to the first block that no tier holds; that block and every
   block after it are computed. A device block is referenced for the turn. A host hit is
   a use in host memory and on disk; a disk hit is a use on disk and is copied into host
   memory; a remote hit is a use in the remote tier and is copied into host memory. A
   turn reads one run of blocks from the remote tier, starting at a block that no local
   tier holds.
2. **Hint and prefetch** (`KVCacheManager.hint`, `AttentionStore.hint`): the request
   leaves the queue, which always holds the trace's next requests. With `scheduler`, the
   blocks of the next `lookahead` requests, most imminent first, are hinted to the device,
   host and disk tiers (Redis takes no hints), and those that host memory lacks are read
   into it from disk or the remote tier, most imminent first, until one does not fit
   beside the hinted blocks before it; the prefetch takes no time (it ends before the
   next request begins). With `lru` nothing is hinted or prefetched.
3. **Completion** (`KVCacheManager.publish`): the blocks that did not come from the
   device are published to the device tier, those that did are released, and the device
   tier is trimmed to `hbm_bytes // block bytes` cached blocks; then each computed block
   that was new to the device tier and that no tier holds is saved: written through to
   host memory, disk and the remote tier, each evicting under its own budget.

Not modelled: requests running at the same time; the device pool beyond the device
tier's budget (room for one request's blocks is taken for granted); directories and
session records in the disk budget; Redis's sampled LRU (taken as exact LRU over reads
and writes); a turn beginning again after its remote read.

TTFT is modelled per request from a model shape's KV bytes per token and the machine's
rates: `recompute_s = computed tokens / prefill_tokens_per_s`, `load_s = sum over tiers of
reused bytes / that tier's bandwidth`, and, loads overlapping compute layer by layer,
`ttft_s = max(recompute_s, load_s)`; without a store every prompt token is computed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from jattn.bench.trace import TraceRequest
from jattn.store.device import DeviceBlocks
from jattn.store.placement import Placement

TIERS = ("hbm", "host", "disk", "remote")


@dataclass(frozen=True)
class Machine:
    """Budgets (bytes), load bandwidths to the device (bytes/s) and the prefill rate
    (tokens/s) of the machine modelled."""

    hbm_bytes: int
    host_bytes: int
    disk_bytes: int
    remote_bytes: int = 0
    hbm_bytes_per_s: float = 1.0e12
    host_bytes_per_s: float = 25.0e9
    disk_bytes_per_s: float = 5.0e9
    remote_bytes_per_s: float = 1.25e9
    prefill_tokens_per_s: float = 10_000.0

    def bandwidth(self, tier: str) -> float:
        return getattr(self, f"{tier}_bytes_per_s")


class _BlockIds:
    """Pool block ids for `DeviceBlocks`, a new one per block: the pool's size is not
    modelled, so a freed id needs no bookkeeping."""

    def __init__(self):
        self._ids = itertools.count()

    def allocate(self) -> int:
        return next(self._ids)

    def free(self, ids) -> None:
        pass


class _Tiers:
    """The device tier and the store's tiers, for blocks of `block_bytes` each."""

    def __init__(self, machine: Machine, block_bytes: int):
        self.block_bytes = block_bytes
        self.device = DeviceBlocks(_BlockIds(),
                                   capacity_blocks=machine.hbm_bytes // block_bytes)
        self.host = Placement(machine.host_bytes)
        self.disk = Placement(machine.disk_bytes)
        self.remote = Placement(machine.remote_bytes)
        self.stored = (self.host, self.disk, self.remote)  # the store's, fastest first
        self.prefetched = 0

    def put(self, tier: Placement, key) -> bool:
        """`BlockTier.put` of one block: a held key is a use; else room is made in
        eviction order. Returns whether the tier holds `key` afterwards."""
        if key in tier:
            tier.touch(key)
            return True
        nbytes = self.block_bytes
        fits = nbytes <= tier.capacity and tier.make_room(
            key, lambda: tier.used + nbytes <= tier.capacity, lambda victim: None)
        if fits:
            tier.admit(key, nbytes)
        return fits

    def look_up(self, keys: list) -> list[str]:
        """The tiers that the leading run of `keys` held by some tier comes from, in
        order, with the uses and copies that a turn's lookup makes (step 1)."""
        sources = []
        for key in keys:
            if key in self.device:
                self.device.acquire(key)
                found = "hbm"
            elif sources[-1:] == ["remote"] and key in self.remote:
                found = self._read_remote(key)
            else:
                found = self._read_local(key)
                if found is None and "remote" not in sources and key in self.remote:
                    found = self._read_remote(key)
            if found is None:
                break
            sources.append(found)
        return sources

    def _read_local(self, key) -> str | None:
        """`AttentionStore.get_run` of one key: "host", "disk" or None."""
        if key in self.host:
            self.host.touch(key)
            self.disk.touch(key)
            return "host"
        if key in self.disk:
            self.disk.touch(key)
            self.put(self.host, key)
            return "disk"
        return None

    def _read_remote(self, key) -> str:
        """A block read from the remote tier, which then goes into host memory."""
        self.remote.touch(key)
        self.put(self.host, key)
        return "remote"

    def hint(self, upcoming: list) -> None:
        """The scheduler's window, most imminent first, to the device, host and disk
        tiers, and the store's prefetch of it into host memory (step 2)."""
        self.device.hint(upcoming)
        self.host.hint(upcoming)
        self.disk.hint(upcoming)
        room = self.host.capacity
        for key in dict.fromkeys(upcoming):
            if key in self.host:
                room -= self.block_bytes
                continue
            if key in self.disk:
                self.disk.touch(key)
            elif key in self.remote:
                self.remote.touch(key)
            else:
                continue
            if self.block_bytes > room:
                break
            if self.put(self.host, key):
                self.prefetched += 1
                room -= self.block_bytes

    def finish(self, keys: list, sources: list) -> None:
        """Completes a request of blocks `keys` whose leading ones came from `sources`
        (`look_up`) and the rest were computed: publishes, releases, trims and saves
        (step 3)."""
        computed = []
        for key, source in itertools.zip_longest(keys, sources):
            if source != "hbm":
                _, new = self.device.publish(key, self.device.allocator.allocate())
                if new and source is None:
                    computed.append(key)
        for key, source in zip(keys, sources):
            if source == "hbm":
                self.device.release(key)
        self.device.trim()
        saves = [key for key in computed if not any(key in tier for tier in self.stored)]
        for key in saves:
            for tier in self.stored:
                self.put(tier, key)


def simulate(requests: list[TraceRequest], machine: Machine, *, kv_bytes_per_token: int,
             policy: str, lookahead: int = 16) -> dict:
    """Runs the trace through the tiers; returns hit fractions of prefix blocks per tier
    ("miss": computed), the blocks prefetched into host memory, and modelled TTFT
    percentiles with the store and without."""
    if policy not in ("lru", "scheduler"):
        raise ValueError(f"policy must be 'lru' or 'scheduler', got {policy!r}")
    keys = [list(request.hash_ids) for request in requests]
    block_tokens = requests[0].block_tokens if requests else 1
    tiers = _Tiers(machine, block_tokens * kv_bytes_per_token)

    def window(start: int) -> list:
        if policy == "lru":
            return []
        return [key for ids in keys[start:start + lookahead] for key in ids]

    hits = dict.fromkeys(TIERS, 0)
    total = 0
    ttft, ttft_without = [], []
    tiers.hint(window(0))
    for index, request in enumerate(requests):
        sources = tiers.look_up(keys[index])
        load_s, reused_tokens = 0.0, 0
        for position, source in enumerate(sources):
            hits[source] += 1
            tokens = min(request.block_tokens,
                         max(request.input_length - position * request.block_tokens, 0))
            reused_tokens += tokens
            load_s += tokens * kv_bytes_per_token / machine.bandwidth(source)
        total += len(keys[index])
        tiers.hint(window(index + 1))
        tiers.finish(keys[index], sources)
        computed = request.input_length - reused_tokens
        ttft.append(max(computed / machine.prefill_tokens_per_s, load_s))
        ttft_without.append(request.input_length / machine.prefill_tokens_per_s)
    rates = {name: count / max(total, 1) for name, count in hits.items()}
    rates["miss"] = 1 - sum(rates.values())
    return {"policy": policy, "lookahead": lookahead, "requests": len(requests),
            "blocks": total, "hit_rate": rates, "prefetched_blocks": tiers.prefetched,
            "ttft_p50_s": float(np.quantile(ttft, 0.5)),
            "ttft_p90_s": float(np.quantile(ttft, 0.9)),
            "ttft_p99_s": float(np.quantile(ttft, 0.99)),
            "ttft_without_store_p50_s": float(np.quantile(ttft_without, 0.5)),
            "ttft_mean_ratio": float(np.mean(ttft) / np.mean(ttft_without))}
