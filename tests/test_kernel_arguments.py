"""Bad arguments raise ValueError naming the argument and the shapes seen."""

import jax.numpy as jnp
import pytest

from pallas_kernels import flash_attention, merge_attention, paged_attention


def f32(*shape):
    return jnp.zeros(shape, jnp.float32)


@pytest.mark.parametrize("q,k,v,pattern", [
    (f32(4, 8), f32(4, 2, 8), f32(4, 2, 8), r"q must have rank 3.*or 4.*\(4, 8\)"),
    (f32(2, 4, 2, 8), f32(4, 2, 8), f32(4, 2, 8), r"k must have rank 3.*the same as q's"),
    (f32(2, 4, 2, 8), f32(3, 4, 2, 8), f32(3, 4, 2, 8), r"same batch size.*\(2, 4, 2, 8\)"),
    (f32(4, 3, 8), f32(4, 2, 8), f32(4, 2, 8), r"multiple of key/value heads \(2\)"),
    (f32(4, 4, 8), f32(4, 2, 16), f32(4, 2, 16), r"same head_dim.*\(4, 4, 8\).*\(4, 2, 16\)"),
    (f32(4, 4, 8), f32(4, 2, 8), f32(5, 2, 8), r"k and v must have the same shape"),
    (jnp.zeros((4, 4, 8), jnp.int32), f32(4, 2, 8), f32(4, 2, 8), r"q must be float32.*int32"),
])
def test_flash_rejects(q, k, v, pattern):
    with pytest.raises(ValueError, match=pattern):
        flash_attention(q, k, v)


def test_batched_lengths_must_be_one_per_sequence():
    q = f32(2, 4, 2, 8)
    with pytest.raises(ValueError, match=r"kv_length must be a scalar or have shape \(2,\).*\(3,\)"):
        flash_attention(q, q, q, kv_length=jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"q_offset must be a scalar or have shape \(2,\)"):
        flash_attention(q, q, q, q_offset=jnp.zeros((2, 1), jnp.int32))


def test_unbatched_offsets_and_lengths_are_scalars():
    q = f32(4, 2, 8)
    with pytest.raises(ValueError, match=r"q_offset must be a scalar for unbatched q.*\(2,\)"):
        flash_attention(q, q, q, q_offset=jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match=r"kv_length must be a scalar for unbatched q"):
        flash_attention(q, q, q, kv_length=jnp.array([4]))


def test_segment_ids_must_be_one_per_token():
    q, k = f32(2, 4, 2, 8), f32(2, 6, 2, 8)
    with pytest.raises(ValueError, match=r"one segment_ids array stands for queries and keys "
                                         r"only when they are the same tokens"):
        flash_attention(q, k, k, segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError,
                       match=r"kv_segment_ids must have shape \(2, 6\).*\(2, 4\)"):
        flash_attention(q, k, k, segment_ids=(jnp.zeros((2, 4), jnp.int32),
                                              jnp.zeros((2, 4), jnp.int32)))
    with pytest.raises(ValueError, match=r"q_segment_ids must be integers, got dtype float32"):
        flash_attention(q, q, q, segment_ids=jnp.zeros((2, 4), jnp.float32))


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match=r"backend must be one of.*'cuda'"):
        flash_attention(f32(2, 2, 8), f32(2, 2, 8), f32(2, 2, 8), backend="cuda")


I32 = jnp.int32


@pytest.mark.parametrize("args,pattern", [
    ((f32(2, 4, 8), f32(6, 4, 2, 8), f32(6, 4, 2, 8), jnp.zeros((3, 2), I32),
      jnp.zeros(2, I32)), r"block_tables must have shape \[batch=2, max_blocks\].*\(3, 2\)"),
    ((f32(2, 4, 8), f32(6, 4, 2, 8), f32(6, 4, 2, 8), jnp.zeros((2, 2), I32),
      jnp.zeros(3, I32)), r"lengths must have shape \[batch=2\].*\(3,\)"),
    ((f32(2, 4, 8), f32(6, 4, 2), f32(6, 4, 2), jnp.zeros((2, 2), I32),
      jnp.zeros(2, I32)), r"k_pages must have rank 4"),
    ((f32(2, 3, 8), f32(6, 4, 2, 8), f32(6, 4, 2, 8), jnp.zeros((2, 2), I32),
      jnp.zeros(2, I32)), r"query heads \(3\).*key/value heads \(2\)"),
    ((f32(2, 4, 8), f32(6, 4, 2, 8), f32(6, 4, 2, 8), jnp.zeros((2, 2), jnp.float32),
      jnp.zeros(2, I32)), r"block_tables must be int32.*float32"),
    ((f32(2, 4, 8), f32(6, 4, 2, 8), f32(6, 4, 2, 4), jnp.zeros((2, 2), I32),
      jnp.zeros(2, I32)), r"k_pages and v_pages must have the same shape"),
])
def test_paged_rejects(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        paged_attention(*args)


def test_merge_rejects_mismatched_lse():
    with pytest.raises(ValueError, match=r"lses must have shape.*\(3, 4\).*\(3, 5\)"):
        merge_attention(f32(3, 4, 8), f32(3, 5))
