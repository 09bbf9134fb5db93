"""The llguidance grammar engine (guidance-ai; one of vLLM's structured-output backends, and llama.cpp's).

Why llguidance and not xgrammar here: it needs nothing beside itself (xgrammar pulls triton and
transformers), computes a token mask in tens of microseconds without a precompiled token table, so a new
schema costs about a millisecond rather than the seconds a full precompile takes, and it exposes the
forced tokens (jump-forward) and rollback that kvflow uses. JSON schemas, regexes, Lark grammars and
llama.cpp's GBNF (translated to Lark) all compile to its one grammar format.
"""
from __future__ import annotations

import json

import llguidance as llg
import numpy as np
from llguidance.gbnf_to_lark import gbnf_to_lark

from kvflow.structured.backend import GRAMMAR_BACKENDS, GrammarBackend, GrammarMatcher, bitmask_words
from kvflow.structured.params import StructuredOutputsParams

# JSON layout when the request leaves whitespace open: the separators a model writes by itself, and no
# free whitespace (a small model handed free whitespace can spend its whole budget on newlines).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
COMPACT_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def grammar_text(spec: StructuredOutputsParams) -> str:
    """llguidance's grammar for a spec (not yet checked)."""
    kind = spec.kind
    if kind in ("json", "json_object"):
        schema = spec.json if kind == "json" else {"type": "object"}
        if spec.whitespace_pattern is not None:
            options = {"whitespace_flexible": True, "whitespace_pattern": spec.whitespace_pattern}
        else:
            options = COMPACT_JSON_OPTIONS if spec.disable_any_whitespace else JSON_OPTIONS
        try:
            return llg.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        except (ValueError, TypeError) as e:
            raise ValueError(f"structured_outputs.{kind} is not a valid JSON schema: {e}") from None
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec.regex)
    if kind == "choice":      # a Lark alternation of string literals (JSON string escapes are Lark's)
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    text = spec.grammar
    if "::=" in text:         # GBNF / EBNF, as llama.cpp and vLLM's xgrammar take it
        try:
            text = gbnf_to_lark(text)
        except Exception as e:      # its translator raises plain exceptions on bad input
            raise ValueError(f"structured_outputs.grammar is not a valid GBNF grammar: {e}") from None
    return llg.LLMatcher.grammar_from_lark(text)


def check(spec: StructuredOutputsParams) -> str:
    """The grammar text of `spec`, checked without a tokenizer; ValueError naming the field."""
    text = grammar_text(spec)
    error = llg.LLMatcher.validate_grammar(text)
    if error:
        raise ValueError(f"structured_outputs.{spec.kind} is invalid: {error.strip()}")
    return text


class LLGuidanceMatcher(GrammarMatcher):
    def __init__(self, m: llg.LLMatcher):
        self.m = m

    def accept(self, token_ids: list[int]) -> bool:
        n = self.m.try_consume_tokens(token_ids)
        if n != len(token_ids):
            self.m.rollback(n)
            return False
        return True

    def rollback(self, num_tokens: int) -> None:
        if num_tokens and not self.m.rollback(num_tokens):
            raise RuntimeError(f"grammar matcher cannot roll back {num_tokens} tokens: {self.m.get_error()}")

    def fill_bitmask(self, row: np.ndarray) -> None:
        self.m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def jump_forward(self) -> list[int]:
        return self.m.compute_ff_tokens()

    def is_terminated(self) -> bool:
        return self.m.is_stopped()

    @property
    def error(self) -> str | None:
        return self.m.get_error() if self.m.is_error() else None


@GRAMMAR_BACKENDS.register("llguidance")
class LLGuidanceBackend(GrammarBackend):
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]):
        super().__init__(tokenizer, vocab_size, eos_token_ids)
        # the Rust tokenizer's JSON is what llguidance reads (an HF folder's tokenizer.json, or the one kvflow
        # builds from a GGUF's metadata); n_vocab is the model's logits width, which may exceed the tokenizer's
        eos = [t for t in self.eos_token_ids if t < vocab_size] or None
        self.lltok = llg.LLTokenizer(tokenizer._tok.to_str(), n_vocab=vocab_size,
                                     eos_token=eos[0] if eos and len(eos) == 1 else eos)

    def compile(self, spec: StructuredOutputsParams) -> llg.LLMatcher:
        text = check(spec)
        m = llg.LLMatcher(self.lltok, text, log_level=0)
        if m.is_error():
            raise ValueError(f"structured_outputs.{spec.kind} is invalid: {m.get_error().strip()}")
        row = np.empty(bitmask_words(self.vocab_size), dtype=np.int32)
        m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)      # the first mask: a lexer limit shows here
        if m.is_error():
            raise ValueError(f"structured_outputs.{spec.kind} cannot be used: {m.get_error().strip()}")
        return m

    def matcher(self, compiled: llg.LLMatcher) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(compiled.deep_copy())
