"""Frontend: the user-facing half of an engine, shared by the in-process LLMEngine and the server's
AsyncLLM. It knows the model's metadata and tokenizer, validates requests, fans a request with
n > 1 out into n engine-core requests, and turns EngineCoreOutputs back into RequestOutputs.
It never touches the weights or the KV cache: those live in the EngineCore, which may be in
another process.
"""
from __future__ import annotations

import dataclasses
import time

from kvflow.config import EngineConfig, ModelConfig, default_model_path, resolve_dtype
from kvflow.engine.core import EngineCoreOutput
from kvflow.engine.output_processor import OutputProcessor, ParentState
from kvflow.models.gguf import read_gguf
from kvflow.models.loader import is_gguf, load_model_config
from kvflow.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvflow.request import Request
from kvflow.sampling.params import SamplingParams
from kvflow.tokenizer import Tokenizer

DEFAULT_KV_CACHE_BYTES = 1 << 30
MAX_DEFAULT_MODEL_LEN = 8192


def max_model_len(requested: int | None, mcfg: ModelConfig) -> int:
    """The model's context length, capped at 8192 by default. Sliding-window attention is not
    implemented, so a context is kept within the window, where full attention is exact."""
    limit = mcfg.max_position_embeddings
    if mcfg.sliding_window is not None and mcfg.sliding_window < limit:
        limit = mcfg.sliding_window
        if requested is not None and requested > limit:
            raise ValueError(f"max_model_len {requested} exceeds the model's sliding window {limit} "
                             "(sliding-window attention is not implemented)")
    if requested is None:
        return min(limit, MAX_DEFAULT_MODEL_LEN)
    if requested > limit:
        raise ValueError(f"max_model_len {requested} exceeds the model's context length {limit}")
    return requested


def num_kv_blocks(config: EngineConfig, mcfg: ModelConfig, dtype, model_len: int) -> int:
    """How many KV blocks the cache holds: the configured count, or as many as the memory budget
    allows (but no more than max_num_seqs full-length requests could use)."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    bs = config.block_size
    budget = config.kv_cache_memory_bytes or DEFAULT_KV_CACHE_BYTES
    useful = config.max_num_seqs * -(-model_len // bs)
    n = min(budget // (mcfg.kv_bytes_per_token(dtype, config.kv_cache_dtype) * bs), useful)
    if n < 1:
        raise ValueError(f"kv_cache_memory_bytes={budget} is too small for one block of {bs} tokens")
    return n


class Frontend:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_path = path = config.model or default_model_path()
        self.reader = read_gguf(path) if is_gguf(path) else None   # parsed once: config, tokenizer, weights
        self.model_config = mcfg = load_model_config(path, self.reader)
        self.dtype = resolve_dtype(config.dtype, config.device)
        self.max_model_len = max_model_len(config.max_model_len, mcfg)
        self.num_kv_blocks = num_kv_blocks(config, mcfg, self.dtype, self.max_model_len)
        self.tokenizer = Tokenizer.from_gguf(self.reader) if self.reader is not None else Tokenizer.from_hf_folder(path)
        self.eos_token_ids = set(self.tokenizer.eos_token_ids) | set(mcfg.eos_token_ids)
        self.output_processor = OutputProcessor(self.tokenizer)

    def make_requests(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                      params: SamplingParams) -> list[Request]:
        """Validate a request and register it; returns the engine-core requests (one per sample)."""
        if request_id in self.output_processor.parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self._check_prompt(prompt_token_ids, params)
        arrival = time.monotonic()
        parent = ParentState(request_id, prompt, list(prompt_token_ids), RequestMetrics(arrival),
                             [CompletionOutput(i, "", []) for i in range(params.n)])
        child_ids = [request_id] if params.n == 1 else [f"{i}_{request_id}" for i in range(params.n)]
        self.output_processor.add(parent, child_ids, params)
        max_tokens = self.max_model_len - len(prompt_token_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        stop_ids = params.all_stop_token_ids(self.eos_token_ids)
        reqs = []
        for i, cid in enumerate(child_ids):
            child_params = params
            if params.n > 1 and params.seed is not None:   # distinct but reproducible samples
                child_params = dataclasses.replace(params, seed=params.seed + i)
            if i > 0 and params.prompt_logprobs is not None:   # the parent takes them from the first sample
                child_params = dataclasses.replace(child_params, prompt_logprobs=None)
            reqs.append(Request(cid, list(prompt_token_ids), child_params, stop_ids, max_tokens, arrival_time=arrival,
                                fork_of=child_ids[0] if i else None))   # samples share sample 0's prompt blocks
        return reqs

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt_token_ids must be integers in [0, {vocab})")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias has token id {max(params.logit_bias)}, outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(ids)} tokens, but max_model_len is {self.max_model_len}: "
                             "it must be shorter, to leave room for at least one output token")
        need = min(len(ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        blocks = -(-need // self.config.block_size)
        if blocks > self.num_kv_blocks:
            raise ValueError(f"request needs up to {need} tokens of KV cache ({blocks} blocks) but the cache "
                             f"holds {self.num_kv_blocks} blocks: raise kv_cache_memory_bytes or lower max_tokens")

    def abort(self, request_id: str) -> list[str]:
        """Forget a request; returns its unfinished engine-core request ids (the core must abort them)."""
        return self.output_processor.abort(request_id)

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        return self.output_processor.process(outputs, time.monotonic())
