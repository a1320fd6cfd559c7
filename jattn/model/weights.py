"""Building a model: random weights, Hugging Face safetensors, or an orbax checkpoint.

Safetensors tensors map onto the module tree by name: `model.layers.3.self_attn.q_proj.
weight` is `layers[3].self_attn.q_proj.kernel`, transposed (torch stores `[out, in]`).
Both a single `model.safetensors` and a sharded set with `model.safetensors.index.json`
load, each tensor converted straight into its slot of the abstract tree. Orbax saves and
restores the converted parameters, so a restart skips the conversion.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from tqdm import tqdm

from jattn.model.config import ModelConfig
from jattn.model.llama import LlamaForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def random_model(config: ModelConfig, *, dtype=jnp.float32, seed: int = 0) -> LlamaForCausalLM:
    """A model with random weights (normal, std 0.02), for shapes without a checkpoint."""
    return LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig, dtype=jnp.float32):
    """`(graphdef, abstract state)` of the model, allocating nothing."""
    return nnx.split(nnx.eval_shape(lambda: random_model(config, dtype=dtype)))


def has_safetensors(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in (SINGLE_FILE, INDEX_FILE))


def _tensor_files(path: str) -> dict[str, str]:
    """Tensor name -> file holding it, from the index when sharded."""
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, SINGLE_FILE)
    if not os.path.isfile(single):
        raise FileNotFoundError(
            f"no weights in {path!r}: expected {SINGLE_FILE} or {INDEX_FILE} "
            "(pass random_weights=True to run this shape with random weights)")
    with safe_open(single, "np") as f:
        return {name: single for name in f.keys()}


def _target(name: str, tree: dict):
    """`(parent dict, key, transpose)` for a checkpoint tensor name, or None if unused."""
    parts = name.split(".")
    if parts[0] == "model":
        parts = parts[1:]
    if parts[-1] not in ("weight", "bias"):
        return None
    node = tree
    for part in parts[:-1]:
        key = int(part) if part.isdigit() else part
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    if parts[-1] == "bias":
        return (node, "bias", False) if "bias" in node else None
    for key, transpose in (("kernel", True), ("embedding", False), ("weight", False)):
        if key in node:
            return node, key, transpose
    return None


def _leaf_paths(tree: dict, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaf_paths(value, prefix + (key,))
        else:
            yield prefix + (key,)


def load_safetensors(path: str, config: ModelConfig, *, dtype=jnp.float32,
                     progress: bool = True) -> LlamaForCausalLM:
    """Loads a Hugging Face checkpoint directory into a model.

    Raises ValueError naming a tensor whose shape does not match the config, and one
    naming every parameter the checkpoint lacks.
    """
    graphdef, state = abstract_model(config, dtype)
    tree = nnx.to_pure_dict(state)
    files = _tensor_files(path)
    by_file: dict[str, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    bar = tqdm(total=len(files), desc="loading weights", unit="tensor", disable=not progress)
    for file, names in by_file.items():
        with safe_open(file, "np") as f:
            for name in names:
                bar.update()
                target = _target(name, tree)
                if target is None:
                    continue
                node, key, transpose = target
                array = f.get_tensor(name)
                array = array.T if transpose else array
                want = node[key]
                if tuple(array.shape) != tuple(want.shape):
                    raise ValueError(
                        f"tensor {name!r} has shape {tuple(array.shape)}, the config asks "
                        f"for {tuple(want.shape)}")
                node[key] = jnp.asarray(np.ascontiguousarray(array), dtype)
    bar.close()
    missing = [".".join(map(str, p)) for p in _leaf_paths(tree)
               if isinstance(_get(tree, p), jax.ShapeDtypeStruct)]
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks parameters: {', '.join(missing)}")
    nnx.replace_by_pure_dict(state, tree)
    return nnx.merge(graphdef, state)


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def save_params(model: LlamaForCausalLM, path: str) -> None:
    """Saves the model's parameters with orbax at `path` (a new directory)."""
    import orbax.checkpoint as ocp  # imported only with a params cache (0.5 s)

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(path), nnx.state(model))
    checkpointer.wait_until_finished()


def restore_params(path: str, config: ModelConfig, *, dtype=jnp.float32) -> LlamaForCausalLM:
    """Restores a model saved by `save_params` for `config` and `dtype`."""
    import orbax.checkpoint as ocp  # imported only with a params cache (0.5 s)

    graphdef, abstract = abstract_model(config, dtype)
    state = ocp.StandardCheckpointer().restore(os.path.abspath(path), abstract)
    return nnx.merge(graphdef, state)
