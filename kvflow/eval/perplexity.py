"""Perplexity of the engine's model on a text, through `LLM.generate` with prompt_logprobs=0.

The text's tokens are cut into windows of `max_length` tokens that start every `stride` tokens (the
Hugging Face perplexity recipe, "sliding window"): each token after the first is scored exactly once,
in the first window whose end covers it, with every earlier token of that window as its context. With
stride < max_length the windows overlap, so a scored token sees at least max_length - stride tokens
of context (stride < max_length: at least one). All windows go to the engine in one `generate` call (each asks for max_tokens=1).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from kvflow.sampling.params import SamplingParams


@dataclass
class PerplexityResult:
    ppl: float            # exp(nll)
    nll: float            # mean negative log-likelihood per scored token, in nats
    num_tokens: int       # tokens scored (every token of the text but the first)
    num_windows: int
    max_length: int       # window length, in tokens
    stride: int
    seconds: float


def windows(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored token) of each window over token indices [0, num_tokens). With
    stride < max_length every token but the first is scored once, with at least one token before it."""
    out, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return out


def perplexity(llm, text: str | list[int], max_length: int | None = None, stride: int | None = None,
               num_tokens: int | None = None, use_tqdm: bool = False) -> PerplexityResult:
    """Perplexity of `llm`'s model on `text` (a string, tokenized as a prompt is, or token ids).

    max_length: window length (default: the longest prompt the engine takes, max_model_len - 1);
    stride: tokens between window starts (default max_length // 2); num_tokens: only the text's first
    num_tokens tokens."""
    t0 = time.perf_counter()
    ids = llm.get_tokenizer().encode(text) if isinstance(text, str) else list(text)
    if num_tokens is not None:
        if num_tokens < 2:
            raise ValueError(f"num_tokens must be at least 2, got {num_tokens}")
        ids = ids[:num_tokens]
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s): perplexity needs at least 2")
    limit = llm.engine.max_model_len - 1
    max_length = limit if max_length is None else max_length
    if not isinstance(max_length, int) or not 2 <= max_length <= limit:
        raise ValueError(f"max_length must be an int in [2, {limit}] (max_model_len - 1), got {max_length!r}")
    stride = max(1, max_length // 2) if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride < max_length:
        raise ValueError(f"stride must be an int in [1, max_length - 1 = {max_length - 1}] (a window's first "
                         f"scored token needs one token of context before it), got {stride!r}")
    wins = windows(len(ids), max_length, stride)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": ids[b:e]} for b, e, _ in wins], params, use_tqdm=use_tqdm)
    nll, count = 0.0, 0
    for (begin, end, first), out in zip(wins, outs):
        plp = out.prompt_logprobs
        for j in range(first - begin, end - begin):
            nll -= plp[j][ids[begin + j]].logprob
            count += 1
    mean = nll / count
    return PerplexityResult(math.exp(mean), mean, count, len(wins), max_length, stride, time.perf_counter() - t0)
