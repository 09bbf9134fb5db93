"""Llama-family decoder: Llama 2/3, Mistral, SmolLM2, Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm).

The forward pass takes a flat batch of tokens from many requests (no padding) and the step's
AttentionMetadata; attention reads each request's context through the paged KV cache, through the
AttentionBackend the model is given (kvflow/attention/backend.py; the loader picks it).
q/k/v and gate/up projections are fused into one matmul each.
"""
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kvflow.attention.backend import AttentionBackend
from kvflow.attention.metadata import AttentionMetadata
from kvflow.models.arch import ModelConfig
from kvflow.kernels import kernel_ops
from kvflow.layers.norm import RMSNorm
from kvflow.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = rotary
        self.attend = backend.forward                  # the bound call, looked up once
        self.k_cache = self.v_cache = torch.empty(0)   # bound by the model runner
        self.k_scale = self.v_scale = None             # int8 KV cache: per (slot, kv head) scales, bound too

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        v = qkv[:, self.q_size + self.kv_size:].view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is None:        # q and k sit side by side in qkv: rotate both in one pass
            qk = qkv[:, :self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim)
            q, k = self.rotary(rope, qk).split([self.num_heads, self.num_kv_heads], dim=1)
        else:
            q = qkv[:, :self.q_size].view(-1, self.num_heads, self.head_dim)
            k = qkv[:, self.q_size:self.q_size + self.kv_size].view(-1, self.num_kv_heads, self.head_dim)
            q, k = self.rotary(rope, self.q_norm(q)), self.rotary(rope, self.k_norm(k))
        o = self.attend(q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.k_scale, self.v_scale)
        return self.o_proj(o.flatten(1))

    __call__ = forward   # skip nn.Module's hook machinery: ~1 us a call, ~10 calls a layer (quant/layers.py)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        ops = kernel_ops(gate_up)
        if ops is not None:
            act = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
            ops.silu_and_mul(act, gate_up)
            return self.down_proj(act)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    __call__ = forward   # skip nn.Module's hook machinery: ~1 us a call, ~10 calls a layer (quant/layers.py)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend):
        super().__init__()
        self.self_attn = Attention(cfg, rotary, backend)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, rope, x, residual, meta):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    __call__ = forward   # skip nn.Module's hook machinery: ~1 us a call, ~10 calls a layer (quant/layers.py)


def expose_submodules(model: nn.Module) -> None:
    """Also put each submodule in its parent's instance __dict__, so that `self.mlp` and the like are found
    there instead of by nn.Module.__getattr__ (~0.5 us; ~300 lookups a decode step). nn.Module.__setattr__
    drops the copy when a submodule is replaced, so a later replacement is still seen."""
    for module in model.modules():
        for name, child in module._modules.items():
            if child is not None:
                module.__dict__[name] = child


class LlamaForCausalLM(nn.Module):
    """The decoder stack and the logits projection; `backend` runs every layer's paged attention."""

    def __init__(self, cfg: ModelConfig, max_position: int, backend: AttentionBackend):
        super().__init__()
        self.cfg, self.attn_backend = cfg, backend
        self.rotary = rotary = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling)
        # nn.Embedding's own init on the meta device (the loader's) imports torch._dynamo (~2 s): only a real one
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=weight if weight.is_meta else nn.init.normal_(weight))
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary, backend) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # called with a layer's index once its KV is written (layer-wise KV transfer, kvflow/disagg/connector.py)
        self.layer_done: Callable[[int], None] | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T]. Returns the final hidden states [T, hidden]."""
        x, residual = self.embed_tokens(input_ids), None
        rope = self.rotary.cos_sin(positions)       # looked up once per step for every layer
        for i, layer in enumerate(self.layers):
            x, residual = layer(rope, x, residual, meta)
            if self.layer_done is not None:
                self.layer_done(i)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:        # tied: the embedding (a quantized model has its own lm_head)
            return F.linear(hidden, self.embed_tokens.weight)
        return self.lm_head(hidden)

    # ---- weights -------------------------------------------------------------------------------------

    _FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load tensors named as in Hugging Face checkpoints; q/k/v and gate/up go into their fused slices."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            parts = name.split(".")
            fused = self._FUSED.get(parts[-2]) if len(parts) >= 2 else None
            if fused is not None:
                target, shard = fused
                pname = ".".join(parts[:-2] + [target, parts[-1]])
                param = params.get(pname)
                if param is None:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
                sizes = self._shard_sizes(target)
                start = sum(sizes[:shard])
                dst = param.data.narrow(0, start, sizes[shard])
                loaded.add((pname, shard))
            else:
                param = params.get(name)
                if param is None:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
                dst = param.data
                loaded.add((name, 0))
            if dst.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(dst.shape)}")
            dst.copy_(tensor)
        expected = {(n, s) for n in params for s in range(self._num_shards(n))}
        missing = sorted(n for n, _ in expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")

    def _shard_sizes(self, target: str) -> list[int]:
        cfg = self.cfg
        if target == "qkv_proj":
            return [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]
        return [cfg.intermediate_size, cfg.intermediate_size]

    @staticmethod
    def _num_shards(pname: str) -> int:
        return 3 if ".qkv_proj." in pname else 2 if ".gate_up_proj." in pname else 1
