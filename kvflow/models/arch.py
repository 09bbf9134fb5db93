"""`ModelConfig`: what a model is (from a Hugging Face config.json or a GGUF file's metadata): the
architecture the engine builds and sizes its KV cache from. No torch."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from kvflow.models.registry import SUPPORTED_MODEL_TYPES


@dataclass
class ModelConfig:
    """What the model is (from a Hugging Face config.json or a GGUF file's metadata)."""
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool          # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool                 # per-head RMSNorm on q and k before RoPE (Qwen3)
    rope_scaling: dict | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None   # attention window (Mistral); the engine keeps contexts within it

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "ModelConfig":
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r} (architectures "
                             f"{cfg.get('architectures')}); supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        eos = cfg.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        rope_scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None and isinstance(rope_scaling, dict):
            rope_theta = rope_scaling.get("rope_theta")
        if isinstance(rope_scaling, dict) and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = None
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            rope_scaling=rope_scaling,
            eos_token_ids=eos,
            sliding_window=cfg.get("sliding_window") if model_type == "mistral" or cfg.get("use_sliding_window")
            else None,
        )

    @classmethod
    def from_folder(cls, path: str) -> "ModelConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{path} has no config.json: expected a Hugging Face model folder "
                                    "(config.json, *.safetensors, tokenizer.json) or a .gguf file")
        with open(cfg_path) as f:
            return cls.from_hf_dict(json.load(f))

    def kv_bytes_per_token(self, dtype, kv_cache_dtype: str = "auto") -> int:
        """K and V of one token in every layer. int8: one byte per element plus one scale (in `dtype`)
        per kv head, for K and for V. `dtype`: a name ("bfloat16") or a torch dtype."""
        from kvflow.config import DTYPE_SIZES, dtype_name
        itemsize = DTYPE_SIZES[dtype_name(dtype)]
        if kv_cache_dtype == "int8":
            return 2 * self.num_layers * self.num_kv_heads * (self.head_dim + itemsize)
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize
