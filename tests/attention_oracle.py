"""Float64 numpy attention: the independent answer the kernels are tested against."""

from __future__ import annotations

import numpy as np


def attention(q, k, v, visible, sm_scale):
    """q `[T, Hq, D]`, k/v `[S, Hkv, D]`, visible bool `[T, S]` -> (out, lse) float64.

    Hidden keys are dropped before any arithmetic, so NaN in them cannot matter. A row
    that sees no key gets out = 0, lse = -inf.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    t, hq, d = q.shape
    group = hq // k.shape[1]
    out = np.zeros((t, hq, d))
    lse = np.full((t, hq), -np.inf)
    for row in range(t):
        keys = np.flatnonzero(visible[row])
        if keys.size == 0:
            continue
        for head in range(hq):
            scores = k[keys, head // group] @ q[row, head] * sm_scale
            top = scores.max()
            weights = np.exp(scores - top)
            out[row, head] = weights @ v[keys, head // group] / weights.sum()
            lse[row, head] = top + np.log(weights.sum())
    return out, lse


def attention_vjp(q, k, v, visible, sm_scale, d_out, d_lse):
    """The cotangents `(dq, dk, dv)` float64 of `attention`'s (out, lse) for `d_out
    [T, Hq, D]` and `d_lse [T, Hq]`, worked out row by row from the softmax's closed
    form: with p the row's probabilities and o its output, dv += p ⊗ do,
    ds = p (v·do - o·do + dlse), dq = scale ds·k, dk += scale ds ⊗ q. Hidden keys get
    zero."""
    q, k, v, d_out, d_lse = (np.asarray(x, np.float64) for x in (q, k, v, d_out, d_lse))
    t, hq, d = q.shape
    group = hq // k.shape[1]
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for row in range(t):
        keys = np.flatnonzero(visible[row])
        if keys.size == 0:
            continue
        for head in range(hq):
            kh, vh = k[keys, head // group], v[keys, head // group]
            scores = kh @ q[row, head] * sm_scale
            p = np.exp(scores - scores.max())
            p /= p.sum()
            out = p @ vh
            ds = p * (vh @ d_out[row, head] - out @ d_out[row, head] + d_lse[row, head])
            dv[keys, head // group] += np.outer(p, d_out[row, head])
            dq[row, head] = sm_scale * ds @ kh
            dk[keys, head // group] += sm_scale * np.outer(ds, q[row, head])
    return dq, dk, dv


def prefill_visibility(t, s, *, causal, q_offset, kv_length):
    """bool `[T, S]`: which keys each query row of a prefill sees."""
    q_pos = q_offset + np.arange(t)[:, None]
    k_pos = np.arange(s)[None, :]
    visible = np.broadcast_to(k_pos < kv_length, (t, s))
    return visible & (k_pos <= q_pos) if causal else visible


def paged(q, k_pages, v_pages, block_tables, lengths, sm_scale, inv_freq=None):
    """Decode attention by gathering each sequence's tokens in order; float64. With
    `inv_freq`, token i's key is rotated to position i first."""
    outs, lses = [], []
    for b, length in enumerate(np.asarray(lengths)):
        k = paged_keys(k_pages, block_tables, length, b)
        v = paged_keys(v_pages, block_tables, length, b)
        if inv_freq is not None:
            k = rotate(k, np.arange(length), inv_freq)
        out, lse = attention(q[b][None], k, v, np.ones((1, length), bool), sm_scale)
        outs.append(out[0])
        lses.append(lse[0])
    return np.stack(outs), np.stack(lses)


def rotate(x, positions, inv_freq):
    """Half-split RoPE in float64: x `[N, H, D]` at `positions [N]`, inv_freq `[D/2]`."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    theta = np.asarray(positions, np.float64)[:, None, None] * np.asarray(inv_freq, np.float64)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(theta) - x2 * np.sin(theta),
                           x2 * np.cos(theta) + x1 * np.sin(theta)], axis=-1)


def paged_keys(k_pages, block_tables, length, b):
    """Sequence b's keys in token order `[length, Hkv, D]` gathered through its table."""
    block_size = k_pages.shape[1]
    token = np.arange(length)
    return np.asarray(k_pages, np.float64)[np.asarray(block_tables)[b, token // block_size],
                                           token % block_size]
