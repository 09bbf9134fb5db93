"""`StructuredOutputsParams`: what a request's output must match, with vLLM's field names.

Exactly one kind per request: `json` (a JSON schema, as a dict or its text), `json_object` (any JSON
object), `regex`, `choice` (one of a list of strings) or `grammar` (a context-free grammar: GBNF / EBNF
with `::=`, as llama.cpp and vLLM take it, or Lark). Validation here is syntactic and needs no grammar
engine (every error is a ValueError naming the field); the grammar engine's own check runs in
`kvflow.structured.backend.validate`. No torch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 1 << 20          # a schema or grammar above 1 MiB of text is refused


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None           # a JSON schema
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None                # GBNF / EBNF (`::=`) or Lark
    json_object: bool | None = None          # any JSON object
    disable_any_whitespace: bool = False     # JSON: compact output, no whitespace between tokens
    whitespace_pattern: str | None = None    # JSON: the regex of whitespace allowed between tokens

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs must set exactly one of json, json_object, regex, choice, grammar; "
                             f"got {', '.join(given) if given else 'none'}")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (an object), got {type(self.json).__name__}")
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}")
        for name in ("regex", "grammar", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, "
                                 f"got {self.choice!r}")
            self.choice = list(self.choice)
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError(f"structured_outputs.disable_any_whitespace must be a bool, "
                             f"got {self.disable_any_whitespace!r}")
        if len(self.canonical()) > MAX_SPEC_CHARS:
            raise ValueError(f"structured_outputs.{self.kind} is longer than {MAX_SPEC_CHARS} characters")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def canonical(self) -> str:
        """The spec as canonical JSON text: equal specs give equal text."""
        return json.dumps({k: v for k, v in (
            ("kind", self.kind), ("value", getattr(self, self.kind)),
            ("disable_any_whitespace", self.disable_any_whitespace),
            ("whitespace_pattern", self.whitespace_pattern)) if v is not None}, sort_keys=True, separators=(",", ":"))

    def key(self) -> str:
        """The compile cache's key: a hash of the canonical spec."""
        return hashlib.sha256(self.canonical().encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict, field: str = "structured_outputs") -> "StructuredOutputsParams":
        """From a request body's object; unknown fields are refused by name."""
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"{field} must be an object, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{field} has unknown fields: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)
