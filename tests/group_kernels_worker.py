"""One process of a two-process group on loopback, four CPU devices each: DistAttention's
decode and prefill over the eight-device mesh spanning both, each process holding only
its own devices' blocks; a long message over the step channel; and each process's own
pool blocks read and written (`PoolShards`). Both processes draw the same inputs (same
seed); each writes the inputs and its outputs to `OUT_DIR/process-I.npz`.

    python tests/group_kernels_worker.py PROCESS_ID PORT OUT_DIR
"""

import json
import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)

from jattn.distributed import group  # noqa: E402

process_id, port, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
group.initialize(f"127.0.0.1:{port}", 2, process_id)

import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from jattn.distributed import paged_attention, prefill_attention  # noqa: E402
from jattn.distributed.group import StepChannel, to_plain  # noqa: E402
from jattn.distributed.group_store import Probe  # noqa: E402
from jattn.distributed.pool_shards import PoolShards  # noqa: E402
from jattn.model.kv_cache import KVPool  # noqa: E402
from jattn.store.tier import BlockKV  # noqa: E402
from test_dist_attention import scattered_pool  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
rng = np.random.default_rng(7)
block_size, hq, hkv, d = 4, 8, 2, 16
lengths = np.array([137, 1, 0, 64, 5, 90], np.int32)
k, v, tables = (np.asarray(a) for a in scattered_pool(
    rng, lengths, devices=8, per_device=12, block_size=block_size, hkv=hkv, d=d,
    home_only={4}))
q = rng.standard_normal((len(lengths), hq, d)).astype(np.float32)
chunk_q = rng.standard_normal((9, hq, d)).astype(np.float32)
inv_freq = (10000.0 ** -(np.arange(0, d, 2) / d)).astype(np.float32)

mesh = jax.make_mesh((8,), ("kv",), axis_types=(jax.sharding.AxisType.Auto,))
sharded = NamedSharding(mesh, PartitionSpec("kv"))


def pool(pages):
    """The pool as one array over both processes, built from this process's blocks."""
    return jax.make_array_from_callback(pages.shape, sharded, lambda index: pages[index])


k_pool, v_pool = pool(k), pool(v)
assert all(shard.device.process_index == process_id for shard in k_pool.addressable_shards)
out, lse = jax.jit(lambda *a: paged_attention(*a, mesh=mesh, key_rope_inv_freq=inv_freq))(
    q, k_pool, v_pool, tables, lengths)
prefill_out, prefill_lse = prefill_attention(
    chunk_q, k_pool, v_pool, tables[0], q_offset=128, kv_length=137, mesh=mesh,
    key_rope_inv_freq=inv_freq, chunk_blocks=3)

# A message past the channel's first frame, from process 0.
drawn = np.random.default_rng(process_id + 100)  # each process its own: only 0's is sent
message = Probe(tuple(drawn.bytes(16) for _ in range(300)))  # about 10 KB of JSON
channel = StepChannel()
if process_id == 0:
    channel.send(message)
else:
    message = channel.receive([Probe])

# Each process reads and writes only the pool blocks on its own devices.
shards = PoolShards(mesh, k.shape[0], "kv")
ids = [int(i) for i in rng.choice(k.shape[0], 20, replace=False)]
read = shards.read(KVPool((k_pool,), (v_pool,)), ids)()
own_ids = sorted(read)
new_k = rng.standard_normal((20, 1, *k.shape[1:])).astype(np.float32)
new_v = rng.standard_normal((20, 1, *k.shape[1:])).astype(np.float32)
written = shards.write(KVPool((k_pool,), (v_pool,)), ids, {
    block: BlockKV(new_k[i], new_v[i]) for i, block in enumerate(ids)
    if shards.process_of(block) == process_id})
after = {f"after_{part}_{shard.index[0].start}": np.asarray(shard.data)
         for part, pool_part in (("k", written.k[0]), ("v", written.v[0]))
         for shard in pool_part.addressable_shards}

np.savez(os.path.join(out_dir, f"process-{process_id}.npz"), q=q, k=k, v=v, tables=tables,
         lengths=lengths, chunk_q=chunk_q, inv_freq=inv_freq, out=np.asarray(out),
         lse=np.asarray(lse), prefill_out=np.asarray(prefill_out),
         prefill_lse=np.asarray(prefill_lse), message=json.dumps(to_plain(message)),
         message_type=type(message).__name__,
         ids=ids, own_ids=np.asarray(own_ids, np.int64),
         read_k=np.stack([read[b].k for b in own_ids]) if own_ids else np.zeros(0),
         read_v=np.stack([read[b].v for b in own_ids]) if own_ids else np.zeros(0),
         new_k=new_k, new_v=new_v, **after)
jax.distributed.shutdown()
