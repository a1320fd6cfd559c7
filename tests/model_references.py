"""Paths and reference outputs of the checkpoints in ../shared/models."""

from __future__ import annotations

import json
import os

import numpy as np

from jattn.model.kv_cache import blocks_for

SHARED_MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                             "models")


def model_dir(name: str) -> str:
    return os.path.join(SHARED_MODELS, name)


def reference_cases(name: str) -> list[dict]:
    with open(os.path.join(model_dir(name), "reference_outputs.json")) as f:
        return json.load(f)["cases"]


def full_sequence_logits(llm, ids) -> np.ndarray:
    """Logits `[len(ids), V]` of one prefill over `ids` (teacher forcing), in pool blocks
    of an allocator of its own: for an LLM that keeps nothing in the pool between calls
    (no store) and whose engine is not running a turn."""
    runner = llm.runner
    return np.asarray(runner.prefill(ids, 0, runner.new_allocator().allocate(
        blocks_for(len(ids), runner.block_size)), all_logits=True))
