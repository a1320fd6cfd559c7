"""Paths and reference outputs of the checkpoints in ../shared/models."""

from __future__ import annotations

import json
import os

SHARED_MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                             "models")


def model_dir(name: str) -> str:
    return os.path.join(SHARED_MODELS, name)


def reference_cases(name: str) -> list[dict]:
    with open(os.path.join(model_dir(name), "reference_outputs.json")) as f:
        return json.load(f)["cases"]
