"""kvflow: an LLM inference system (paged KV cache, prefix caching, continuous batching)."""
from kvflow.entrypoints.llm import LLM
from kvflow.outputs import CompletionOutput, Logprob, RequestOutput
from kvflow.sampling.params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
