"""The interface of a grammar engine, its registry, and the compile cache both sides of the engine use.

A `GrammarBackend` turns a `StructuredOutputsParams` into a compiled grammar for one tokenizer (`compile`,
possibly slow: it runs off the step loop) and hands out a `GrammarMatcher` per request (`matcher`, cheap).
A matcher follows the request's output tokens: the token bitmask of what may come next, `accept` for every
token the request appends, `rollback` for tokens taken back, `jump_forward` for the tokens the grammar
forces. A new engine (xgrammar, outlines) is a new file registered here; nothing else changes.

`GrammarCompiler` keeps compiled grammars by the spec's hash, compiles on a worker thread, and turns a
compile that passes its time limit into a ValueError naming the field (the frontend's check) or into a
failed future (the engine core's, which never waits on it inside a step).
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from kvflow.registry import Registry
from kvflow.structured.params import StructuredOutputsParams

GRAMMAR_BACKENDS = Registry("structured_outputs_backend", {"llguidance": "kvflow.structured.llguidance_backend"})
DEFAULT_BACKEND = "llguidance"
COMPILE_TIMEOUT_S = 10.0          # a grammar that takes longer to compile is refused
CACHE_SIZE = 256                  # compiled grammars kept (least recently used dropped)


def bitmask_words(vocab_size: int) -> int:
    """int32 words of one token bitmask row (bit i of word i // 32: token i may come next)."""
    return (vocab_size + 31) // 32


class GrammarMatcher(ABC):
    """One request's position in its grammar."""

    @abstractmethod
    def accept(self, token_ids: list[int]) -> bool:
        """Advance by these tokens; False when the grammar does not allow one of them (nothing advanced)."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Take back the last `num_tokens` accepted tokens."""

    @abstractmethod
    def fill_bitmask(self, row: np.ndarray) -> None:
        """Write the tokens allowed next into `row` (int32, `bitmask_words(vocab)` words)."""

    @abstractmethod
    def jump_forward(self) -> list[int]:
        """The tokens the grammar forces from here (no choice left to the model), possibly none."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """The grammar is complete and has accepted its end (an end-of-sequence token)."""

    @property
    def error(self) -> str | None:
        """Why the matcher can go no further (a grammar engine's limit hit), or None."""
        return None


class GrammarBackend(ABC):
    name = ""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]):
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, list(eos_token_ids)

    @abstractmethod
    def compile(self, spec: StructuredOutputsParams) -> object:
        """The compiled grammar of `spec`; ValueError naming `structured_outputs.<kind>` if it is invalid."""

    @abstractmethod
    def matcher(self, compiled: object) -> GrammarMatcher:
        """A fresh matcher at the grammar's start."""


def make_backend(name: str, tokenizer, vocab_size: int, eos_token_ids: list[int]) -> GrammarBackend:
    return GRAMMAR_BACKENDS.get(name)(tokenizer, vocab_size, eos_token_ids)


class GrammarCompiler:
    """Compiled grammars by spec hash, compiled on one worker thread (the backend is built there too, on
    first use: building a tokenizer's index takes a fraction of a second)."""

    def __init__(self, backend_factory, timeout_s: float = COMPILE_TIMEOUT_S, cache_size: int = CACHE_SIZE):
        self._factory, self._backend = backend_factory, None
        self.timeout_s, self.cache_size = timeout_s, cache_size
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvflow-grammar")
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def backend(self) -> GrammarBackend:
        if self._backend is None:
            self._backend = self._factory()
        return self._backend

    def submit(self, spec: StructuredOutputsParams) -> Future:
        """The compile of `spec`, started or cached. Its result is the compiled grammar (or a ValueError)."""
        key = spec.key()
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                return fut
            fut = self._pool.submit(lambda: self.backend.compile(spec))
            self._cache[key] = fut
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return fut

    def check(self, spec: StructuredOutputsParams) -> object:
        """Compile `spec` (or find it compiled) within the time limit; ValueError naming the field if it is
        invalid or too slow to compile. Blocks the caller up to the limit."""
        fut = self.submit(spec)
        try:
            return fut.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise ValueError(f"structured_outputs.{spec.kind} took more than {self.timeout_s:g} s to compile: "
                             "simplify the schema or grammar") from None

    def timed_out(self, fut: Future, started: float, now: float) -> bool:
        return not fut.done() and now - started > self.timeout_s

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def grammar_compiler(options, load_tokenizer, vocab_size: int, eos_token_ids) -> GrammarCompiler:
    """A compiler for the engine's `StructuredOptions`; `load_tokenizer()` is called on the compile thread,
    the first time a request asks for structured output."""
    def build() -> GrammarBackend:
        tokenizer = load_tokenizer()
        eos = set(eos_token_ids) | set(tokenizer.eos_token_ids)
        return make_backend(options.structured_outputs_backend, tokenizer, vocab_size, sorted(eos))
    return GrammarCompiler(build, timeout_s=options.grammar_compile_timeout_s)
