"""Entries that pass their checksum but are not blocks of the model (a file or a Redis
value rewritten with another shape, layer count or dtype, its checksum recomputed) are
never used: the tokens equal a server without a store, and each is dropped and counted."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jattn import LLM, StoreConfig
from jattn.bench.redis_server import RedisServer
from jattn.store import disk_entry

PROMPT = [5, 6, 7, 8] * 12  # three full blocks of 16 tokens


def forged(data: bytes, fingerprint: str, how: str) -> bytes:
    """`data` (an entry's bytes) re-encoded, checksum and all, with its arrays or its
    layer count changed as `how` says."""
    arrays, meta = disk_entry.decode(data, fingerprint=fingerprint)
    k, v = arrays["k"], arrays["v"]
    if how == "shape":
        k, v = k[..., :-1], v[..., :-1]
    elif how == "dtype":
        k, v = k.astype(np.float16), v.astype(np.float16)
    elif how == "layers":
        if "layers" in meta:  # a Redis value: one layer, saying how many there are
            meta = {**meta, "layers": 999}
        else:
            k, v = k[:-1], v[:-1]
    return disk_entry.encode({"k": np.ascontiguousarray(k), "v": np.ascontiguousarray(v)},
                             fingerprint=fingerprint, meta=meta)


@pytest.fixture(scope="module")
def reference():
    llm = LLM(store=None)
    yield llm.generate(PROMPT, max_tokens=8, ignore_eos=True).token_ids
    llm.close()


def test_forged_block_files_are_dropped_and_recomputed(tmp_path, reference):
    config = StoreConfig(hbm_bytes=0, host_bytes=0, disk_bytes=1 << 30, disk_path=str(tmp_path))
    writer = LLM(store=config)
    assert writer.generate(PROMPT, max_tokens=8, ignore_eos=True).token_ids == reference
    writer.close()
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs
                   if f.endswith(".kv"))
    assert len(files) >= 3
    fingerprint = writer.store.fingerprint
    for path, how in zip(files, ["shape", "layers", "dtype"]):
        disk_entry.write_atomic(path, forged(open(path, "rb").read(), fingerprint, how))
    reader = LLM(store=config)
    got = reader.generate(PROMPT, max_tokens=8, ignore_eos=True)
    assert got.token_ids == reference
    stats = reader.store.stats()  # (a drop deletes the file; it is counted when it does)
    assert 1 <= stats["corrupt_entries"] <= 3 and stats["disk_hits"] == 0
    reader.close()


@pytest.mark.parametrize("how", ["layers", "shape", "dtype"])
def test_forged_redis_values_are_dropped_and_recomputed(reference, how):
    server = RedisServer()
    try:
        config = StoreConfig(hbm_bytes=0, host_bytes=0, remote_url=server.url)
        writer = LLM(store=config)
        assert writer.generate(PROMPT, max_tokens=8, ignore_eos=True).token_ids == reference
        writer.store.flush()
        client = server.client()
        names = sorted(name for name in client.keys("*layers:*"))
        assert len(names) >= 3
        for name in names:
            client.hset(name, "0", forged(client.hget(name, "0"), writer.store.fingerprint,
                                          how))
        writer.close()
        reader = LLM(store=config)
        got = reader.generate(PROMPT, max_tokens=8, ignore_eos=True)
        assert got.token_ids == reference
        stats = reader.store.stats()  # (a drop deletes the value; it is counted when it does)
        assert stats["corrupt_entries"] >= 1 and stats["remote_hits"] == 0
        reader.close()
    finally:
        server.stop()
