"""Structured output (survey §5.1 frontends): constrained decoding on a maintained grammar engine.

params.py     `StructuredOutputsParams` (vLLM's shape): json schema, json_object, regex, choice, grammar
backend.py    `GrammarBackend` / `GrammarMatcher`, the interface a grammar engine implements, and its registry
llguidance_backend.py   the llguidance engine (the default)
manager.py    `StructuredOutputManager`: the engine core's compiles (off the step loop, cached by the spec's
              hash), one matcher per request, the batch's token bitmask, jump-forward
"""
from kvflow.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
