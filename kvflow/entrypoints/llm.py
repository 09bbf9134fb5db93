"""The offline API, as vLLM users know it: `LLM(model).generate(prompts, sampling_params)`."""
from __future__ import annotations

import itertools
from collections.abc import Sequence

from kvflow.config import EngineConfig
from kvflow.engine.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams, run_beam_search
from kvflow.engine.llm_engine import LLMEngine
from kvflow.outputs import RequestOutput
from kvflow.sampling.params import SamplingParams

PromptType = str | dict


class LLM:
    """An LLM engine in this process.

    model: a Hugging Face folder or a .gguf file (None: the default SmolLM2-135M-Instruct GGUF).
    dtype: "auto" (bfloat16), "float32" or "bfloat16". Other keyword arguments are the fields of
    EngineConfig's sections (kvflow/config.py): max_model_len, max_num_seqs, max_num_batched_tokens,
    block_size, kv_cache_memory_bytes, num_kv_blocks, enable_prefix_caching, device, seed,
    kv_cache_dtype ("auto" or "int8"), quantization, preemption_mode, kv_store_dir, num_threads, ...
    """

    def __init__(self, model: str | None = None, dtype: str = "auto", **kwargs):
        try:
            config = EngineConfig.from_kwargs(model=model, dtype=dtype, **kwargs)
        except ValueError as e:
            raise ValueError(str(e).replace("unknown engine argument", "unknown LLM argument")) from None
        self.engine = LLMEngine(config)
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Persist the prefix cache to the disk tier (kv_store_dir) and wait for the writes; `with LLM(...)`
        calls it on exit."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix block (blocks in use stay with their requests)."""
        self.engine.reset_prefix_cache()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 user: str | Sequence[str | None] | None = None) -> list[RequestOutput]:
        """Prompts are strings or {"prompt_token_ids": [...]} dicts (or {"prompt": str}); returns one
        RequestOutput per prompt, in input order. `priority`: one integer per prompt (lower runs first under
        scheduling_policy="priority"); `user`: the client of every prompt, or one per prompt (the fair
        policy's unit)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"sampling_params has {len(params_list)} entries for {len(prompts)} prompts")
        priorities = _per_prompt("priority", priority, len(prompts), 0)
        users = _per_prompt("user", [user] * len(prompts) if user is None or isinstance(user, str) else user,
                            len(prompts), None)
        inputs = [self._tokenize(p) for p in prompts]
        ids = []
        try:
            for (text, token_ids), params, prio, who in zip(inputs, params_list, priorities, users):
                rid = str(next(self._counter))
                self.engine.add_request(rid, text, token_ids, params, prio, who)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType],
                    params: BeamSearchParams) -> list[BeamSearchOutput]:
        """Beam search (kvflow/engine/beam_search.py) over strings or {"prompt_token_ids": [...]} dicts; one
        BeamSearchOutput per prompt, in input order, its sequences best first. Every live beam is a request
        of this engine; a beam that branches off another shares its KV blocks (copy-on-write)."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        engine = self.engine
        if engine.has_unfinished_requests():       # the search steps the core itself: no other request's outputs
            raise RuntimeError("beam_search needs the engine to itself: other requests are still running")
        inputs = [self._tokenize(p)[1] for p in prompts]
        check = SamplingParams(max_tokens=params.max_tokens, temperature=0.0)
        eos = engine.input_processor.eos_token_ids
        searches = []
        for ids in inputs:
            engine.input_processor.check(ids, check)
            max_tokens = min(params.max_tokens, engine.max_model_len - len(ids))
            searches.append(BeamSearch(ids, params, eos, max_tokens, lambda: f"beam-{next(self._counter)}"))
        run_beam_search(engine.client, searches)
        tok = engine.tokenizer
        return [s.result(lambda t: tok.decode(t, skip_special_tokens=True)) for s in searches]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} messages) or a list of conversations, rendered
        with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        prompts = []
        for conv in conversations:
            text, ids = tok.encode_chat(conv, add_generation_prompt)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.engine.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)):
                    raise ValueError("prompt_token_ids must be a list of integers")
                return prompt.get("prompt"), list(ids)
            if isinstance(prompt.get("prompt"), str):
                return prompt["prompt"], self.engine.tokenizer.encode(prompt["prompt"])
        raise ValueError(f"a prompt must be a string or a dict with 'prompt_token_ids' or 'prompt', "
                         f"got {type(prompt).__name__}")

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(request_ids) > 1:
            from tqdm import tqdm
            bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in request_ids:
                if rid not in finished:
                    self.engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[rid] for rid in request_ids]


def _per_prompt(name: str, values, n: int, default) -> list:
    if values is None:
        return [default] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} prompts")
    return values
