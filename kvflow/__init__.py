"""kvflow: an LLM inference system (paged KV cache, prefix caching, continuous batching).

The public names load lazily, so that the torch-free core (request, scheduler, KV manager, config)
imports without the model stack.
"""
import importlib

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "BeamSearchParams"]
__version__ = "0.1.0"

_HOMES = {"LLM": "kvflow.entrypoints.llm", "SamplingParams": "kvflow.sampling.params",
          "RequestOutput": "kvflow.outputs", "CompletionOutput": "kvflow.outputs", "Logprob": "kvflow.outputs",
          "BeamSearchParams": "kvflow.engine.beam_search"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'kvflow' has no attribute {name!r}")
