"""Loading checkpoints: sharded safetensors, orbax round trips, random weights, errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jattn import LLM
from jattn.model.config import ModelConfig
from jattn.model.kv_cache import blocks_for, default_num_blocks
from jattn.model.weights import load_safetensors, restore_params, save_params
from model_references import model_dir, reference_cases

STORIES = model_dir("stories260K")


def _params(llm):
    return jax.tree_util.tree_leaves(llm.runner.params)


def copy_model(tmp_path, name="model", weights=True):
    target = tmp_path / name
    target.mkdir()
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(STORIES, file), target)
    if weights:
        shutil.copy(os.path.join(STORIES, "model.safetensors"), target)
    return target


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    target = copy_model(tmp_path, weights=False)
    tensors = load_file(os.path.join(STORIES, "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for shard, part in enumerate((names[::2], names[1::2])):
        file = f"model-{shard + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(target / file))
        weight_map.update({n: file for n in part})
    (target / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    sharded, single = LLM(str(target)), LLM()
    for a, b in zip(_params(sharded), _params(single)):
        np.testing.assert_array_equal(a, b)
    case = reference_cases("stories260K")[1]
    assert sharded.generate(case["prompt"], max_tokens=64, ignore_eos=True).token_ids == \
        case["greedy_ids"]


def test_orbax_round_trip(tmp_path):
    config = ModelConfig.from_dir(STORIES)
    model = load_safetensors(STORIES, config, progress=False)
    save_params(model, str(tmp_path / "params"))
    restored = restore_params(str(tmp_path / "params"), config)
    for a, b in zip(jax.tree_util.tree_leaves(model), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(a, b)


def test_params_cache_is_written_then_used(tmp_path):
    cache = tmp_path / "converted"
    first = LLM(params_cache=str(cache))
    assert cache.is_dir()
    target = copy_model(tmp_path, weights=False)  # no safetensors: must come from the cache
    second = LLM(str(target), params_cache=str(cache))
    for a, b in zip(_params(first), _params(second)):
        np.testing.assert_array_equal(a, b)


def test_config_without_weights_needs_random_weights(tmp_path):
    target = copy_model(tmp_path, weights=False)
    with pytest.raises(FileNotFoundError, match="no weights in .*random_weights=True"):
        LLM(str(target))
    llm = LLM(str(target), random_weights=True, seed=3)
    generation = llm.generate("Once", max_tokens=5, ignore_eos=True)
    assert len(generation.token_ids) == 5
    assert all(0 <= t < llm.config.vocab_size for t in generation.token_ids)
    other = LLM(str(target), random_weights=True, seed=4)
    assert any(not np.array_equal(a, b) for a, b in zip(_params(llm), _params(other)))


def test_missing_tensor_is_named(tmp_path):
    target = copy_model(tmp_path, weights=False)
    tensors = load_file(os.path.join(STORIES, "model.safetensors"))
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, str(target / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks parameters: layers\.2\.mlp\.up_proj\.kernel"):
        LLM(str(target))


def test_shape_mismatch_is_named(tmp_path):
    target = copy_model(tmp_path, weights=False)
    tensors = load_file(os.path.join(STORIES, "model.safetensors"))
    tensors["model.norm.weight"] = np.ones(65, np.float32)
    save_file(tensors, str(target / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(65,\).*\(64,\)"):
        LLM(str(target))


@pytest.mark.parametrize("edit,pattern", [
    ({"architectures": ["GPT2LMHeadModel"]}, r"unsupported architecture \['GPT2LMHeadModel'\]"),
    ({"hidden_act": "gelu"}, r"unsupported hidden_act 'gelu'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, r"unsupported rope type 'yarn'"),
    ({"num_hidden_layers": None}, r"lacks the key 'num_hidden_layers'"),
])
def test_unsupported_configs_are_named(tmp_path, edit, pattern):
    target = copy_model(tmp_path)
    config = json.loads((target / "config.json").read_text())
    config.update(edit)
    config = {k: v for k, v in config.items() if v is not None}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=pattern):
        LLM(str(target))


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="neither a directory nor a Hugging Face Hub"):
        LLM("no:such model")


def test_shipped_model_configs_parse():
    configs = os.path.join(os.path.dirname(__file__), "..", "configs", "models")
    shapes = {name: ModelConfig.from_dir(os.path.join(configs, name))
              for name in sorted(os.listdir(configs))}
    llama = shapes["llama-3.2-1b"]
    assert (llama.num_layers, llama.num_heads, llama.num_kv_heads, llama.head_dim) == \
        (16, 32, 8, 64)
    assert llama.rope.type == "llama3" and llama.tie_word_embeddings
    assert llama.kv_bytes_per_token(2) == 2 * 16 * 8 * 64 * 2
    qwen = shapes["qwen2.5-0.5b"]
    assert qwen.qkv_bias and not qwen.o_proj_bias and qwen.head_dim == 64


def test_the_default_pool_holds_max_running_turns_at_their_longest():
    llm = LLM(max_running=3, max_context=100, store=None)
    assert llm.runner.pool.num_blocks == 3 * blocks_for(100, 16)
    # a memory budget cuts it, but never under one longest sequence
    sized = dict(sequences=3, max_context=100, block_size=16, block_bytes=1000)
    assert default_num_blocks(**sized, budget_bytes=10_000) == 10
    assert default_num_blocks(**sized, budget_bytes=1_000) == blocks_for(100, 16)
    assert default_num_blocks(**sized, budget_bytes=10**9) == 3 * blocks_for(100, 16)
