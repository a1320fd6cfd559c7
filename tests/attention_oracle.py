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


def prefill_visibility(t, s, *, causal, q_offset, kv_length):
    """bool `[T, S]`: which keys each query row of a prefill sees."""
    q_pos = q_offset + np.arange(t)[:, None]
    k_pos = np.arange(s)[None, :]
    visible = np.broadcast_to(k_pos < kv_length, (t, s))
    return visible & (k_pos <= q_pos) if causal else visible


def paged(q, k_pages, v_pages, block_tables, lengths, sm_scale):
    """Decode attention by gathering each sequence's tokens in order; float64."""
    block_size = k_pages.shape[1]
    outs, lses = [], []
    for b, length in enumerate(np.asarray(lengths)):
        token = np.arange(length)
        blocks = np.asarray(block_tables)[b, token // block_size]
        k = np.asarray(k_pages, np.float64)[blocks, token % block_size]
        v = np.asarray(v_pages, np.float64)[blocks, token % block_size]
        out, lse = attention(q[b][None], k, v, np.ones((1, length), bool), sm_scale)
        outs.append(out[0])
        lses.append(lse[0])
    return np.stack(outs), np.stack(lses)
