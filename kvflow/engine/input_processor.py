"""InputProcessor: checks a request against the model and the KV cache, and turns it into engine-core
requests (one per sample: the samples 1..n-1 of an n > 1 request fork the first one's prompt blocks).
Every problem is a ValueError naming the field."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from kvflow.config import ResolvedConfig
from kvflow.engine.wire import EngineCoreRequest
from kvflow.sampling.params import SamplingParams

if TYPE_CHECKING:
    from kvflow.tokenizer import Tokenizer


def child_request_ids(request_id: str, n: int) -> list[str]:
    return [request_id] if n == 1 else [f"{i}_{request_id}" for i in range(n)]


class InputProcessor:
    def __init__(self, rc: ResolvedConfig, tokenizer: Tokenizer):
        from kvflow.structured.backend import grammar_compiler
        self.rc = rc
        self.eos_token_ids = set(tokenizer.eos_token_ids) | set(rc.arch.eos_token_ids)
        # structured output is compiled here first (cached by the spec's hash), so that a bad or too slow
        # schema is a ValueError before the request is submitted; the core compiles its own copy
        self.grammars = grammar_compiler(rc.config.structured, lambda: tokenizer, rc.arch.vocab_size,
                                         self.eos_token_ids)

    def process(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                arrival_time: float, priority: int = 0, user: str | None = None) -> list[EngineCoreRequest]:
        """`priority`: lower runs first under the priority policy; `user`: the client, for the fair policy."""
        self.check(prompt_token_ids, params)
        self.check_hints(priority, user)
        max_len = self.rc.max_model_len
        max_tokens = max_len - len(prompt_token_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        stop_ids = sorted(params.all_stop_token_ids(self.eos_token_ids))
        child_ids = child_request_ids(request_id, params.n)
        reqs = []
        for i, cid in enumerate(child_ids):
            child_params = params
            if params.n > 1 and params.seed is not None:   # distinct but reproducible samples
                child_params = dataclasses.replace(params, seed=params.seed + i)
            if i > 0 and params.prompt_logprobs is not None:   # the parent takes them from the first sample
                child_params = dataclasses.replace(child_params, prompt_logprobs=None)
            reqs.append(EngineCoreRequest(cid, list(prompt_token_ids), child_params, stop_ids, max_tokens,
                                          arrival_time, fork_from=child_ids[0] if i else None,
                                          priority=priority, client=user))
        return reqs

    def check_hints(self, priority: int, user: str | None) -> None:
        """The scheduling hints: `priority` (honoured only under the priority policy) and `user`."""
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        policy = self.rc.config.scheduler.scheduling_policy
        if priority != 0 and policy != "priority":     # honoured or refused, never silently dropped (as vLLM)
            raise ValueError(f"priority {priority} is only honoured with scheduling_policy='priority' "
                             f"(this engine runs {policy!r})")
        if user is not None and not isinstance(user, str):
            raise ValueError(f"user must be a string, got {type(user).__name__}")

    def check(self, ids: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        vocab = self.rc.arch.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt_token_ids must be integers in [0, {vocab})")
        if params.structured_outputs is not None:
            self.grammars.check(params.structured_outputs)
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias has token id {max(params.logit_bias)}, outside the vocabulary [0, {vocab})")
        max_len = self.rc.max_model_len
        if len(ids) >= max_len:
            raise ValueError(f"prompt is {len(ids)} tokens, but max_model_len is {max_len}: "
                             "it must be shorter, to leave room for at least one output token")
        need = min(len(ids) + (params.max_tokens or max_len), max_len)
        blocks = -(-need // self.rc.config.cache.block_size)
        if blocks > self.rc.num_kv_blocks:
            raise ValueError(f"request needs up to {need} tokens of KV cache ({blocks} blocks) but the cache "
                             f"holds {self.rc.num_kv_blocks} blocks: raise kv_cache_memory_bytes or lower max_tokens")


def open_model(config) -> tuple[ResolvedConfig, object, "Tokenizer"]:
    """Resolve the config against the model, once (a GGUF file is parsed once for its config, tokenizer
    and weights: the parsed reader is returned for the weights), and load the tokenizer."""
    from kvflow.config import default_model_path, resolve
    from kvflow.models.gguf import read_gguf
    from kvflow.models.loader import is_gguf
    from kvflow.tokenizer import Tokenizer
    path = config.model.model or default_model_path()
    reader = read_gguf(path) if is_gguf(path) else None
    rc = resolve(config, reader)
    tokenizer = Tokenizer.from_gguf(reader) if reader is not None else Tokenizer.from_hf_folder(path)
    return rc, reader, tokenizer
