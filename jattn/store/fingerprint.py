"""A model fingerprint: what a stored KV entry must match to be used."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
import numpy as np


def model_fingerprint(config, params, dtype) -> str:
    """SHA-256 over the config, the dtype, and a sample of every parameter (its first
    and last 256 values), so another model or other weights never match."""
    digest = hashlib.sha256()
    digest.update(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
    digest.update(str(dtype).encode())
    for leaf in jax.tree_util.tree_leaves(params):
        flat = np.asarray(leaf).reshape(-1)
        digest.update(np.ascontiguousarray(flat[:256]).tobytes())
        digest.update(np.ascontiguousarray(flat[-256:]).tobytes())
    return digest.hexdigest()
