"""LLMEngine: the in-process engine (tokenizer + input validation + EngineCore + output processing)."""
from __future__ import annotations

import dataclasses
import logging
import time

import torch

from kvflow.config import EngineConfig, default_model_path, resolve_dtype
from kvflow.engine.core import EngineCore
from kvflow.engine.model_runner import ModelRunner
from kvflow.engine.output_processor import OutputProcessor, ParentState
from kvflow.memory.kv_cache_manager import KVCacheManager
from kvflow.models.gguf import read_gguf
from kvflow.models.loader import is_gguf, load_model, load_model_config
from kvflow.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvflow.request import Request, RequestStatus
from kvflow.sampling.params import SamplingParams
from kvflow.scheduler.scheduler import Scheduler
from kvflow.tokenizer import Tokenizer

logger = logging.getLogger("kvflow")

DEFAULT_KV_CACHE_BYTES = 1 << 30
MAX_DEFAULT_MODEL_LEN = 8192


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        path = config.model or default_model_path()
        self.model_path = path
        reader = read_gguf(path) if is_gguf(path) else None   # parsed once: config, tokenizer, weights
        self.model_config = mcfg = load_model_config(path, reader)
        self.dtype = resolve_dtype(config.dtype, config.device)
        self.max_model_len = self._max_model_len(config.max_model_len, mcfg)
        self.tokenizer = Tokenizer.from_gguf(reader) if reader is not None else Tokenizer.from_hf_folder(path)
        self.eos_token_ids = set(self.tokenizer.eos_token_ids) | set(mcfg.eos_token_ids)
        torch.manual_seed(config.seed)
        t0 = time.perf_counter()
        model = load_model(path, mcfg, self.dtype, config.device, self.max_model_len, reader)
        bs = config.block_size
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        else:
            budget = config.kv_cache_memory_bytes or DEFAULT_KV_CACHE_BYTES
            # no use for more blocks than max_num_seqs full-length requests can hold
            useful = config.max_num_seqs * -(-self.max_model_len // bs)
            num_blocks = min(budget // (mcfg.kv_bytes_per_token(self.dtype) * bs), useful)
            if num_blocks < 1:
                raise ValueError(f"kv_cache_memory_bytes={budget} is too small for one block of {bs} tokens")
        self.kv = KVCacheManager(num_blocks, bs, config.enable_prefix_caching)
        runner = ModelRunner(model, mcfg, self.dtype, config.device, num_blocks, bs)
        scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len)
        self.core = EngineCore(runner, self.kv, scheduler)
        self.output_processor = OutputProcessor(self.tokenizer)
        logger.info("loaded %s (%s, %s) in %.1fs; KV cache: %d blocks of %d tokens", path, mcfg.model_type,
                    self.dtype, time.perf_counter() - t0, num_blocks, bs)

    @staticmethod
    def _max_model_len(requested: int | None, mcfg) -> int:
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

    # ---- requests ------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
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
        for i, cid in enumerate(child_ids):
            child_params = params
            if params.n > 1 and params.seed is not None:   # distinct but reproducible samples
                child_params = dataclasses.replace(params, seed=params.seed + i)
            generator = None           # a seeded request samples from its own stream, on the engine's device
            if child_params.seed is not None:
                generator = torch.Generator(device=self.config.device).manual_seed(child_params.seed)
            self.core.add_request(Request(cid, list(prompt_token_ids), child_params, stop_ids, max_tokens,
                                          arrival_time=arrival, generator=generator))

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt_token_ids must be integers in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(ids)} tokens, but max_model_len is {self.max_model_len}: "
                             "it must be shorter, to leave room for at least one output token")
        need = min(len(ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        blocks = -(-need // self.kv.block_size)
        if blocks > self.kv.num_blocks:
            raise ValueError(f"request needs up to {need} tokens of KV cache ({blocks} blocks) but the cache "
                             f"holds {self.kv.num_blocks} blocks: raise kv_cache_memory_bytes or lower max_tokens")

    def abort_request(self, request_id: str) -> None:
        self.core.abort_requests(self.output_processor.abort(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished()

    def step(self) -> list[RequestOutput]:
        outputs = self.core.step()
        results, to_abort = self.output_processor.process(outputs, time.monotonic())
        if to_abort:
            self.core.abort_requests(to_abort, RequestStatus.FINISHED_STOPPED)
        return results

    def reset_prefix_cache(self) -> None:
        self.kv.pool.reset_prefix_cache()

    def check_blocks(self) -> None:
        self.core.check_blocks()
