"""Load a model from a Hugging Face folder (config.json + safetensors shards) or a GGUF file.

is_gguf and load_model_config import no torch (the config is resolved without the model stack); the
model class comes from the registry (models/registry.py), the attention backend from
kvflow/attention/backend.py.
"""
from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from kvflow.models.arch import ModelConfig
from kvflow.models.registry import model_class

if TYPE_CHECKING:
    import torch
    from torch import nn


def is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def load_model_config(path: str, gguf_reader=None) -> ModelConfig:
    if gguf_reader is not None:
        from kvflow.models.gguf import gguf_hf_config
        return ModelConfig.from_hf_dict(gguf_hf_config(gguf_reader))
    if is_gguf(path):
        from kvflow.models.gguf import read_gguf
        return load_model_config(path, read_gguf(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist (expected a Hugging Face folder or a .gguf file)")
    return ModelConfig.from_folder(path)


def _safetensors_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights (only safetensors checkpoints are loaded)")
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read weights file {file}: {e} (truncated or corrupted?)") from e


@contextmanager
def _default_dtype(dtype: torch.dtype):
    import torch
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(path: str, cfg: ModelConfig, dtype: torch.dtype, device: str, max_position: int,
               gguf_reader=None, quantization: str | None = None, attention_backend: str | None = None) -> nn.Module:
    """Build the model without initialising it (meta device), then fill it from the checkpoint
    (a Hugging Face folder, or the GGUF file `gguf_reader` has open).

    quantization (kvflow/quant): "int8" / "int4" quantize the linear layers once loaded (quant/layers.py);
    "gguf" installs them from the file's Q4_0 / Q4_1 / Q8_0 blocks first (quant/gguf_repack.py), and the
    rest loads dense. attention_backend: a registered backend's name; None = the device's default."""
    import torch

    from kvflow.attention.backend import get_attention_backend
    from kvflow.layers.rotary import RotaryEmbedding
    backend = get_attention_backend(attention_backend, device)
    with torch.device("meta"), _default_dtype(dtype):
        model = model_class(cfg.model_type)(cfg, max_position, backend)
    # to_empty's empty_like on meta tensors imports torch's symbolic shapes (sympy, ~0.6 s): allocate directly
    model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    for m in model.modules():                 # buffers are not in checkpoints: rebuild them for real
        if isinstance(m, RotaryEmbedding):
            m.build(device)
    kept: set[str] = set()
    if quantization == "gguf":
        from kvflow.models.gguf import gguf_blocks
        from kvflow.quant.gguf_repack import quantize_model_from_gguf
        kept = quantize_model_from_gguf(model, lambda names: dict(gguf_blocks(gguf_reader, names)))
    if gguf_reader is not None:
        from kvflow.models.gguf import gguf_weights
        weights = gguf_weights(gguf_reader, torch.float32, skip=kept)
    else:
        weights = _safetensors_weights(path)
    with torch.no_grad():
        model.load_weights(weights)
    if quantization in ("int8", "int4"):
        from kvflow.quant.layers import quantize_model
        quantize_model(model, quantization)
    return model.eval()
