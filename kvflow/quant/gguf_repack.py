"""GGUF blocks kept quantized (quantization="gguf"): a .gguf file's Q4_0 / Q4_1 / Q8_0 blocks repacked
into the quantized linear layers of quant/layers.py, installed before the rest of the weights load dense.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from kvflow.quant.formats import Int4Weight, quantize_int8
from kvflow.quant.layers import Int4Linear, Int8Linear, QuantLinear, parent_module, set_logits

# a fused layer of the model -> the GGUF tensors (by Hugging Face name) whose rows it concatenates
_GGUF_SHARDS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "self_attn.o_proj": ("self_attn.o_proj",),
                "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
                "mlp.down_proj": ("mlp.down_proj",)}


def linear_from_gguf(blocks: list, bias: torch.Tensor | None, dtype: torch.dtype) -> QuantLinear:
    """One linear layer from the GGUF blocks of its shards (rows concatenated, e.g. q, k, v).

    All shards Q4_0 / Q4_1: int4 with group 32, codes, scales and mins taken as stored (exact up to the
    kernel's bf16 scale and zero). Otherwise (Q8_0, or a mix): the stored values are decoded in fp32
    (exact) and requantized to int8 per row: for Q8_0 the row's scale is its largest block scale, so
    that block keeps its codes and the others' move by at most half a step."""
    n = sum(b.codes.shape[0] for b in blocks)
    if all(b.kind in ("Q4_0", "Q4_1") for b in blocks) and n % 16 == 0:
        def cat(attr: str) -> torch.Tensor:
            return torch.from_numpy(np.concatenate([getattr(b, attr) for b in blocks]))
        return Int4Linear(Int4Weight(cat("codes"), cat("scale"), cat("min")), bias)
    w = torch.cat([torch.from_numpy(b.dequantize()) for b in blocks])
    return Int8Linear(quantize_int8(w, dtype), bias, dtype)


@torch.no_grad()
def quantize_model_from_gguf(model, get_blocks: Callable[[list[str]], dict]) -> set[str]:
    """Install quantized layers built from GGUF blocks before the rest of the weights load.

    get_blocks(names) returns {Hugging Face name: GGUFBlocks} for those of `names` stored as Q4_0, Q4_1
    or Q8_0. A layer whose shards are not all stored so stays dense (dequantized as before). The logits
    projection comes from output.weight, or from token_embd for a tied model (whose embedding lookup
    still loads dense). Returns the names consumed here, which the dense loader must skip."""
    dtype, device = model.embed_tokens.weight.dtype, model.embed_tokens.weight.device
    consumed: set[str] = set()
    for i, layer in enumerate(model.layers):
        for path, shards in _GGUF_SHARDS.items():
            names = [f"model.layers.{i}.{s}.weight" for s in shards]
            blocks = get_blocks(names)
            if len(blocks) < len(names):
                continue
            parent, attr = parent_module(layer, path)
            setattr(parent, attr, linear_from_gguf([blocks[nm] for nm in names], getattr(parent, attr).bias,
                                                   dtype).to(device))
            consumed.update(names)
    name = "model.embed_tokens.weight" if model.lm_head is None else "lm_head.weight"
    blocks = get_blocks([name])
    if blocks:
        set_logits(model, linear_from_gguf([blocks[name]], None, dtype).to(device))
        if name == "lm_head.weight":
            consumed.add(name)
    return consumed
