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


# ----- fuzz: any value that passes its checksum, against the tiers themselves ---------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from jattn.store.disk_files import DiskFiles, block_file  # noqa: E402
from jattn.store.disk_tier import DiskTier  # noqa: E402
from jattn.store.remote_tier import RemoteTier  # noqa: E402
from jattn.store.tier import BlockKV, BlockSpec  # noqa: E402

FINGERPRINT = "e" * 64
SPEC = BlockSpec(2, (4, 2, 8), "float32")  # 2 layers of [4 tokens, 2 heads, 8]
KEY = bytes(range(16))
SHAPES = hnp.array_shapes(min_dims=0, max_dims=5, max_side=5)
DTYPES = st.sampled_from(["float32", "float16", "int8", "float64"])
LAYER_COUNTS = st.one_of(st.integers(-2, 1000), st.booleans(), st.none(), st.text(max_size=3),
                         st.floats(allow_nan=False))


@st.composite
def arrays(draw, layered: bool):
    """Keys and values, mostly of the right shape or near it (a layer too many or few,
    a dimension off, another dtype), sometimes anything."""
    want = SPEC.layer_shape if layered else (SPEC.layers, *SPEC.layer_shape)
    shape = draw(st.one_of(st.just(want), SHAPES,
                           st.just(want).map(lambda s: (s[0] + 1, *s[1:]))))
    dtype = draw(st.one_of(st.just(SPEC.dtype), DTYPES))
    k = draw(hnp.arrays(dtype, shape, elements=st.just(1)))
    v = draw(hnp.arrays(dtype, draw(st.one_of(st.just(shape), SHAPES)),
                        elements=st.just(2)))
    return k, v


def well_formed(k, v, layers=None) -> bool:
    return SPEC.mismatch(k, v, layers) is None


@pytest.fixture(scope="module")
def remote_tier():
    server = RedisServer()
    yield RemoteTier(server.url, fingerprint=FINGERPRINT, spec=SPEC)
    server.stop()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(pair=arrays(layered=False), junk=st.one_of(st.none(), st.binary(max_size=64)))
def test_a_block_file_is_used_only_if_it_is_a_block_of_the_model(tmp_path_factory, pair,
                                                                  junk):
    root = str(tmp_path_factory.mktemp("disk"))
    tier = DiskTier(DiskFiles(root, 1 << 24), fingerprint=FINGERPRINT, spec=SPEC)
    good = BlockKV(np.zeros((2, 4, 2, 8), np.float32), np.zeros((2, 4, 2, 8), np.float32))
    assert tier.put(KEY, good)
    k, v = pair
    data = junk if junk is not None else disk_entry.encode(
        {"k": k, "v": v}, fingerprint=FINGERPRINT, meta={"block_key": KEY.hex()})
    disk_entry.write_atomic(os.path.join(root, block_file(KEY)), data)
    for read in (lambda: tier.get(KEY),  # a lone block; then as a run (header checks)
                 lambda: (tier.get_run([KEY], max_bytes=1 << 30) or [None])[0]):
        block = read()
        if junk is None and well_formed(k, v):
            assert block is not None and np.array_equal(block.k, k) and \
                np.array_equal(block.v, v)
        else:
            assert block is None and tier.stats()["corrupt_entries"] >= 1
            assert tier.put(KEY, good)  # written again for the next read
            disk_entry.write_atomic(os.path.join(root, block_file(KEY)), data)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(pair=arrays(layered=True), layers=LAYER_COUNTS,
       junk=st.one_of(st.none(), st.binary(max_size=64)))
def test_a_redis_value_is_used_only_if_it_is_a_layer_of_a_block_of_the_model(remote_tier,
                                                                            pair, layers, junk):
    good = BlockKV(np.zeros((2, 4, 2, 8), np.float32), np.zeros((2, 4, 2, 8), np.float32))
    remote_tier.delete(KEY)
    assert remote_tier.put(KEY, good)
    k, v = pair
    data = junk if junk is not None else disk_entry.encode(
        {"k": k, "v": v}, fingerprint=FINGERPRINT,
        meta={"block_key": KEY.hex(), "layer": 0, "layers": layers})
    remote_tier._redis.hset(remote_tier.block_name(KEY), "0", data)
    got = remote_tier.read_layer([KEY], 0)[0]
    usable = junk is None and isinstance(layers, int) and not isinstance(layers, bool) \
        and well_formed(k, v, layers)
    if usable:
        assert got is not None and np.array_equal(got[0], k) and got[2] == SPEC.layers
    else:
        assert got is None


# ----- a store key: entries sealed with a keyed MAC --------------------------------------

def key_file(tmp_path, name: str) -> str:
    path = tmp_path / name
    path.write_text(os.urandom(32).hex() + "\n")
    return str(path)


def zeroed_and_unkeyed(data: bytes, fingerprint: str, secret: bytes) -> bytes:
    """`data` (an entry sealed with `secret`) with its arrays zeroed, re-encoded with a
    valid checksum and no MAC: what anyone who can write the files or Redis can make."""
    arrays, meta = disk_entry.decode(data, fingerprint=fingerprint, secret=secret)
    return disk_entry.encode({name: np.zeros_like(a) for name, a in arrays.items()},
                             fingerprint=fingerprint, meta=meta)


def test_a_keyed_store_uses_only_entries_sealed_with_its_key(tmp_path, reference):
    server = RedisServer()
    try:
        def store(key: str) -> StoreConfig:
            return StoreConfig(hbm_bytes=0, host_bytes=0, disk_bytes=1 << 30,
                               disk_path=str(tmp_path / "disk"), remote_url=server.url,
                               key_file=key)

        def hits(llm) -> int:
            stats = llm.store.stats()
            return stats["disk_hits"] + stats["remote_hits"]

        key_a, key_b = key_file(tmp_path, "a.key"), key_file(tmp_path, "b.key")
        writer = LLM(store=store(key_a))
        assert writer.generate(PROMPT, max_tokens=8, ignore_eos=True).token_ids == reference
        writer.store.flush()
        writer.close()
        same_key = LLM(store=store(key_a))  # sealed with the key it has: used
        assert same_key.generate(PROMPT, max_tokens=8, ignore_eos=True).token_ids == reference
        assert hits(same_key) >= 2 and same_key.store.stats()["corrupt_entries"] == 0
        fingerprint, secret = same_key.store.fingerprint, StoreConfig(
            key_file=key_a).store_key()
        same_key.close()

        other_key = LLM(store=store(key_b))  # another replica's key: dropped, recomputed
        assert other_key.generate(PROMPT, max_tokens=8, ignore_eos=True).token_ids == reference
        assert hits(other_key) == 0 and other_key.store.stats()["corrupt_entries"] >= 1
        other_key.close()

        # Sealed with key A again, then forged: zeroed, with a valid checksum, no MAC.
        writer = LLM(store=store(key_a))
        writer.generate(PROMPT, max_tokens=8, ignore_eos=True)
        writer.store.flush()
        writer.close()
        files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "disk") for f in fs
                 if f.endswith(".kv")]
        for path in files:
            disk_entry.write_atomic(path, zeroed_and_unkeyed(open(path, "rb").read(),
                                                             fingerprint, secret))
        client = server.client()
        for name in client.keys("*layers:*"):
            for field, value in client.hgetall(name).items():
                client.hset(name, field, zeroed_and_unkeyed(value, fingerprint, secret))
        assert len(files) >= 3
        forged_reader = LLM(store=store(key_a))
        got = forged_reader.generate(PROMPT, max_tokens=8, ignore_eos=True)
        assert got.token_ids == reference
        assert hits(forged_reader) == 0 and forged_reader.store.stats()["corrupt_entries"] >= 1
        forged_reader.close()
    finally:
        server.stop()


@settings(max_examples=40, deadline=None)
@given(k=hnp.arrays("float32", (2, 3), elements=st.floats(-4, 4, width=32)),
       flip=st.integers(0, 1 << 20), meta=st.dictionaries(st.text(max_size=4), st.integers()))
def test_a_sealed_entry_opens_only_with_its_key_and_unaltered(k, flip, meta):
    secret, other = bytes(range(32)), bytes(range(1, 33))
    data = disk_entry.encode({"k": k}, fingerprint=FINGERPRINT, meta=meta, secret=secret)
    arrays, got_meta = disk_entry.decode(data, fingerprint=FINGERPRINT, secret=secret)
    assert np.array_equal(arrays["k"], k) and got_meta == meta  # a round trip
    for wrong in (other, None):
        with pytest.raises(disk_entry.CorruptEntry):
            disk_entry.decode(data, fingerprint=FINGERPRINT, secret=wrong)
    altered = bytearray(data)  # any one bit of header (padding too) or payload
    altered[len(disk_entry.MAGIC) + 4 + flip % (len(data) - len(disk_entry.MAGIC) - 4)] ^= \
        1 << (flip % 8)
    with pytest.raises(disk_entry.CorruptEntry):
        disk_entry.decode(bytes(altered), fingerprint=FINGERPRINT, secret=secret)
    unkeyed = disk_entry.encode({"k": k}, fingerprint=FINGERPRINT, meta=meta)
    with pytest.raises(disk_entry.CorruptEntry, match="not sealed"):
        disk_entry.decode(unkeyed, fingerprint=FINGERPRINT, secret=secret)
