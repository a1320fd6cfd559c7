"""Model configuration, read from a Hugging Face `config.json`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from jattn.positions import RopeConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder (Llama 2/3, Mistral, Qwen2)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_proj_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, config: dict) -> "ModelConfig":
        """Builds the config; raises ValueError naming what is unsupported or missing."""
        architectures = config.get("architectures") or []
        architecture = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if architecture is None:
            raise ValueError(
                f"unsupported architecture {architectures or config.get('model_type')!r}; "
                f"supported: {SUPPORTED_ARCHITECTURES}")
        activation = config.get("hidden_act", "silu")
        if activation != "silu":
            raise ValueError(f"unsupported hidden_act {activation!r}; supported: 'silu'")
        if config.get("use_sliding_window") or (
                architecture == "MistralForCausalLM" and config.get("sliding_window")):
            raise ValueError(
                f"sliding-window attention (sliding_window={config.get('sliding_window')}) "
                "is not supported; use a checkpoint with full attention")
        if config.get("mlp_bias"):
            raise ValueError("unsupported mlp_bias=true; Llama-family MLPs have no bias")
        qwen2 = architecture == "Qwen2ForCausalLM"
        try:
            num_heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            eos = config.get("eos_token_id")
            return cls(
                architecture=architecture,
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
                head_dim=int(config.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope=RopeConfig.from_hf(config),
                max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=qwen2 or bool(config.get("attention_bias", False)),
                o_proj_bias=not qwen2 and bool(config.get("attention_bias", False)),
                bos_token_id=config.get("bos_token_id"),
                eos_token_ids=tuple(eos if isinstance(eos, list) else
                                    ([] if eos is None else [eos])),
            )
        except KeyError as missing:
            raise ValueError(f"config.json lacks the key {missing.args[0]!r}") from None

    @classmethod
    def from_dir(cls, path: str) -> "ModelConfig":
        """Reads `path/config.json`."""
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no config.json in model directory {path!r}")
        with open(config_path) as f:
            return cls.from_dict(json.load(f))

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Bytes of keys and values one token occupies over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize
