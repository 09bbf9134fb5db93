"""The attention-backend interface, and the registry a model gets its backend from.

An `AttentionBackend` is what a decoder layer calls once per step: write the step's new K/V into the
layer's paged KV cache, then attend, for the decode rows and the prompt chunks that the step's
AttentionMetadata describes. The model never imports a concrete backend: the loader resolves one by
name, or by device, through `get_attention_backend`, and passes it to the model.

A new backend is a new file in this folder whose class is decorated with
`@register_attention_backend("name")`, plus its entry in BACKEND_MODULES below (and in DEFAULT_BACKENDS
to make it a device's default).
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from kvflow.attention.metadata import AttentionMetadata

# backend name -> the module that defines (and registers) it, imported on first use
BACKEND_MODULES = {"torch_sdpa": "kvflow.attention.cpu"}
# device type -> the backend used when none is named
DEFAULT_BACKENDS = {"cpu": "torch_sdpa", "cuda": "torch_sdpa"}
FALLBACK_BACKEND = "torch_sdpa"      # any other device: PyTorch ops run everywhere

_REGISTRY: dict[str, type[AttentionBackend]] = {}


class AttentionBackend(ABC):
    """Paged attention for one layer's step. Stateless across layers: one instance serves the model.

    The cache of a layer is k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim], in the
    compute dtype, or int8 with k_scale, v_scale [num_blocks, block_size, num_kv_heads] (one scale per
    slot and kv head, symmetric absmax / 127); see kvflow/attention/cpu.py for that format."""

    name: str = ""            # set by register_attention_backend

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
        """q [T, Hq, D]; k, v [T, Hkv, D]: this step's new tokens, in the flat batch's order (the
        meta.num_decodes decode rows first, then each of meta.prefills' prompt chunks). Writes k and v
        to their slots (meta.slot_mapping), then returns the attention output [T, Hq, D]: each decode
        row over its context through its block table, each chunk causally over its cached prefix and
        itself."""

    @classmethod
    def supports(cls, device: torch.device) -> bool:
        """Whether this backend runs on `device` (checked when it is chosen)."""
        return True


def register_attention_backend(name: str):
    """Class decorator: make an AttentionBackend subclass available under `name`."""
    def register(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        if not (isinstance(cls, type) and issubclass(cls, AttentionBackend)):
            raise TypeError(f"{cls!r} is not an AttentionBackend")
        if _REGISTRY.get(name, cls) is not cls:
            raise ValueError(f"attention backend {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return register


def attention_backend_names() -> tuple[str, ...]:
    """Every backend that can be asked for by name."""
    return tuple(dict.fromkeys([*BACKEND_MODULES, *_REGISTRY]))


def get_attention_backend(name: str | None = None, device: torch.device | str = "cpu") -> AttentionBackend:
    """A backend instance: the one named, or the device's default (DEFAULT_BACKENDS)."""
    import torch
    device = torch.device(device)
    if name is None:
        name = DEFAULT_BACKENDS.get(device.type, FALLBACK_BACKEND)
    if name not in _REGISTRY and name in BACKEND_MODULES:
        importlib.import_module(BACKEND_MODULES[name])
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(attention_backend_names())}")
    if not cls.supports(device):
        raise ValueError(f"attention backend {name!r} does not run on {device}")
    return cls()
