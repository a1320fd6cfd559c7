"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) in Flax NNX over a paged KV cache.

Why NNX: parameters live on the modules as plain attributes, so a checkpoint maps onto
the module tree by name (`layers[3].self_attn.q_proj.kernel`), `nnx.eval_shape` gives the
abstract tree to fill from safetensors or orbax without allocating twice, and
`nnx.split` hands jit a pure (graph, state) pair. Linen would need a parallel params dict
kept in step with the modules by hand.

The model is stateless about sequences: a forward pass takes tokens, their positions,
the flat cache slots to write their keys and values to, the pool, and an `attend`
function that decides how queries meet the cache (chunked prefill through
`flash_attention`, batched decode through `paged_attention`). Keys are written to the
pool before RoPE; queries are rotated here; the kernel rotates keys as it reads them.
`sequence_logits` is the cache-free forward pass over whole sequences that training
differentiates.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.model.config import ModelConfig
from jattn.model.kv_cache import KVPool, write_tokens
from jattn.positions import apply_rope

Attend = Callable[[int, jax.Array, jax.Array, jax.Array], jax.Array]
"""`(layer, q [T, Hq, D] rotated, k_pages, v_pages) -> out [T, Hq, D]`."""

SelfAttend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
"""`(q [B, S, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, D]) -> out [B, S, Hq, D]`: causal
self-attention over whole sequences, q and k rotated (training, no cache)."""

_INIT = nnx.initializers.normal(0.02)


class RMSNorm(nnx.Module):
    """`x / rms(x) * weight`, normalised in float32 and scaled in the input dtype."""

    def __init__(self, size: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((size,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


def _linear(inputs: int, outputs: int, bias: bool, dtype, rngs):
    """A projection; float32 models multiply at full float32 precision (no TF32)."""
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    return nnx.Linear(inputs, outputs, use_bias=bias, dtype=dtype, param_dtype=dtype,
                      precision=precision, kernel_init=_INIT, rngs=rngs)


class Attention(nnx.Module):
    """Grouped-query attention projections; the attention itself is `attend`'s."""

    def __init__(self, config: ModelConfig, dtype, rngs):
        hidden, hd = config.hidden_size, config.head_dim
        self.q_proj = _linear(hidden, config.num_heads * hd, config.qkv_bias, dtype, rngs)
        self.k_proj = _linear(hidden, config.num_kv_heads * hd, config.qkv_bias, dtype, rngs)
        self.v_proj = _linear(hidden, config.num_kv_heads * hd, config.qkv_bias, dtype, rngs)
        self.o_proj = _linear(config.num_heads * hd, hidden, config.o_proj_bias, dtype, rngs)
        self.config = config

    def __call__(self, x, positions, slots, layer, k_pages, v_pages, attend: Attend):
        """x `[T, hidden]` -> (out `[T, hidden]`, updated k_pages, v_pages)."""
        c = self.config
        t = x.shape[0]
        q = self.q_proj(x).reshape(t, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(t, c.num_kv_heads, c.head_dim)
        k_pages = write_tokens(k_pages, slots, k)
        v_pages = write_tokens(v_pages, slots, v)
        out = attend(layer, apply_rope(q, positions, c.rope), k_pages, v_pages)
        return self.o_proj(out.reshape(t, c.num_heads * c.head_dim)), k_pages, v_pages

    def over_sequences(self, x, positions, attend: SelfAttend):
        """x `[B, S, hidden]` at positions `[S]` -> `[B, S, hidden]`, with no cache."""
        c = self.config
        b, s = x.shape[:2]
        q = apply_rope(self.q_proj(x).reshape(b, s, c.num_heads, c.head_dim), positions, c.rope)
        k = apply_rope(self.k_proj(x).reshape(b, s, c.num_kv_heads, c.head_dim), positions,
                       c.rope)
        v = self.v_proj(x).reshape(b, s, c.num_kv_heads, c.head_dim)
        return self.o_proj(attend(q, k, v).reshape(b, s, c.num_heads * c.head_dim))


class MLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, config: ModelConfig, dtype, rngs):
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = _linear(hidden, inner, False, dtype, rngs)
        self.up_proj = _linear(hidden, inner, False, dtype, rngs)
        self.down_proj = _linear(inner, hidden, False, dtype, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, rngs)

    def __call__(self, x, positions, slots, layer, k_pages, v_pages, attend: Attend):
        attended, k_pages, v_pages = self.self_attn(
            self.input_layernorm(x), positions, slots, layer, k_pages, v_pages, attend)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), k_pages, v_pages

    def over_sequences(self, x, positions, attend: SelfAttend):
        """x `[B, S, hidden]` -> `[B, S, hidden]`, with no cache."""
        x = x + self.self_attn.over_sequences(self.input_layernorm(x), positions, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nnx.Module):
    """The decoder with its embedding and output head (tied or not).

    Attribute names follow Hugging Face's module names, so checkpoint tensors map onto
    the tree by name (see `jattn.model.weights`).
    """

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                      param_dtype=dtype, embedding_init=_INIT, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, dtype, rngs)
                                for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config.hidden_size, config.vocab_size, False, dtype, rngs)

    def __call__(self, tokens, positions, slots, pool: KVPool, attend: Attend, rows=None):
        """One forward pass over `T` tokens.

        Args:
          tokens: int32 `[T]`.
          positions: int32 `[T]`, each token's position in its sequence.
          slots: int32 `[T]` flat cache slots for the tokens' keys and values (past the
            pool for padding tokens: not written).
          pool: the KV pool; returned updated.
          attend: how the queries of layer l meet that layer's pool.
          rows: int32 `[R]`, the tokens whose logits are wanted; None: all.

        Returns:
          `(logits [R or T, vocab] float32, pool)`.
        """
        x = self.embed(tokens)
        new_k, new_v = [], []
        for layer, block in enumerate(self.layers):
            x, k_pages, v_pages = block(x, positions, slots, layer, pool.k[layer],
                                        pool.v[layer], attend)
            new_k.append(k_pages)
            new_v.append(v_pages)
        return self.logits(x if rows is None else x[rows]), KVPool(tuple(new_k), tuple(new_v))

    def sequence_logits(self, tokens, attend: SelfAttend):
        """Training's forward pass: whole sequences, no cache.

        tokens int32 `[B, S]` (token s at position s) -> logits `[B, S, vocab]` float32.
        `attend` is causal self-attention, e.g. `pallas_kernels.flash_attention` over one
        device or `jattn.distributed.context_parallel_attention` over a mesh.
        """
        x = self.embed(tokens)
        positions = jnp.arange(tokens.shape[1])
        for block in self.layers:
            x = block.over_sequences(x, positions, attend)
        return self.logits(x)

    def embed(self, tokens):
        """int32 `[T]` -> hidden states `[T, hidden]`."""
        return self.embed_tokens(tokens)

    def logits(self, x):
        """Last hidden states `[T, hidden]` -> logits `[T, vocab]` float32."""
        x = self.norm(x)
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(x).astype(jnp.float32)
        return self.lm_head(x).astype(jnp.float32)
