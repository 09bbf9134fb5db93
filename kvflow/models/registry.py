"""Which models kvflow runs: Hugging Face `model_type` -> model class, GGUF `general.architecture` ->
Hugging Face model_type. Imports no torch: the config and the GGUF reader check names against it, and the
model class is imported only when a model is built (`model_class`).

A new model family is its module (a class with the constructor and methods of models/llama.py's
LlamaForCausalLM) plus its entries here.
"""
from __future__ import annotations

import importlib

# model_type (config.json) -> (module, class)
MODELS: dict[str, tuple[str, str]] = {
    "llama": ("kvflow.models.llama", "LlamaForCausalLM"),
    "mistral": ("kvflow.models.llama", "LlamaForCausalLM"),
    "qwen2": ("kvflow.models.llama", "LlamaForCausalLM"),      # q/k/v bias
    "qwen3": ("kvflow.models.llama", "LlamaForCausalLM"),      # q/k RMSNorm
}

# GGUF general.architecture -> (model_type, the Hugging Face architecture its config.json names).
# llama.cpp writes Mistral as "llama".
GGUF_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(MODELS)
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(GGUF_ARCHITECTURES)     # GGUF general.architecture values


def model_class(model_type: str) -> type:
    """The class that implements `model_type` (its module imported now)."""
    if model_type not in MODELS:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    module, name = MODELS[model_type]
    return getattr(importlib.import_module(module), name)
