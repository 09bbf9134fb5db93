"""Load a GGUF checkpoint (llama.cpp's single-file format) as Hugging Face style parts.

read_gguf() opens and validates the file, gguf_hf_config() turns its metadata into a config.json
style dict, gguf_weights() yields dequantized tensors under their Hugging Face names and layout,
gguf_blocks() yields the raw Q4_0 / Q4_1 / Q8_0 blocks of chosen tensors (for quantization="gguf"), and
gguf_tokenizer() rebuilds a `tokenizers.Tokenizer` from the tokenizer.ggml.* metadata.
Which architectures load: models/registry.py. torch is imported only by gguf_weights: reading a file's
config needs none.
"""
from __future__ import annotations

import math
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from kvflow.models.gguf_file import GGUFFile
from kvflow.models.registry import GGUF_ARCHITECTURES, SUPPORTED_ARCHITECTURES

if TYPE_CHECKING:
    import torch


# GGUF tensor name -> Hugging Face name ("{i}" is the layer index).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_SKIPPED_TENSORS = {"rope_freqs.weight"}  # llama3 rope factors: folded into config["rope_scaling"]

# Pre-tokenizer regexes, as in the original Hugging Face tokenizer.json files.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "command-r")
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen")
_GPT2_PRE = ("default", "gpt-2", "gpt2", "olmo", "jais")

_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 2, 3, 4


_READERS: OrderedDict[tuple, GGUFFile] = OrderedDict()   # (real path, size, mtime) -> its reader
_READERS_LOCK = threading.Lock()
MAX_READERS = 4


def read_gguf(path: str) -> GGUFFile:
    """Open and validate a GGUF file; raises FileNotFoundError or ValueError with the reason. The reader is kept
    for the file as it is now (path, size, modification time): one engine reads the file for its config, its
    weights and its tokenizer. Readers only read (a memory map)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _READERS_LOCK:
        if key in _READERS:
            _READERS.move_to_end(key)
            return _READERS[key]
    reader = _open_gguf(path)
    with _READERS_LOCK:
        _READERS[key] = reader
        while len(_READERS) > MAX_READERS:
            _READERS.popitem(last=False)
    return reader


def _open_gguf(path: str) -> GGUFFile:
    try:
        reader = GGUFFile(path)
    except Exception as e:  # bad magic, truncated header, empty file, ...
        raise ValueError(f"{path} is not a valid GGUF file: {e}") from e
    arch = _meta(reader, "general.architecture")
    if arch is None:
        raise ValueError(f"{path} is not a valid GGUF file: no general.architecture in its metadata")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported "
                         f"architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return reader


def _meta(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(x: float) -> float:
    """Metadata floats are float32: 1e-5 reads back as 9.99999974e-06; give the short decimal."""
    return float(str(np.float32(x)))


def _tensor(reader, name: str):
    return next((t for t in reader.tensors if t.name == name), None)


def _dequantize(t) -> np.ndarray:
    """A GGUF tensor as float32 numpy in numpy (row-major) order: GGUF lists dims innermost first.
    Q4_0, Q4_1 and Q8_0 decode here in whole-array numpy, about 10x faster than gguf-py's row-group loop
    and to the same fp32 values (each weight's products are exact in fp32; Q4_1 adds its min as gguf-py
    does; a Q4_0 zero may come out +0 where gguf-py gives -0); other types go through gguf-py."""
    shape = tuple(int(d) for d in reversed(t.shape))
    if t.tensor_type.name in GGUF_KEPT_TYPES:
        return _blocks(t).dequantize().reshape(shape)
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)


def gguf_hf_config(reader) -> dict:
    """A Hugging Face config.json style dict built from the GGUF metadata."""
    arch = _meta(reader, "general.architecture")

    def get(key, default=None):
        return _meta(reader, f"{arch}.{key}", default)

    def need(key):
        if f"{arch}.{key}" not in reader.fields:
            raise ValueError(f"GGUF metadata is missing {arch}.{key}")
        return get(key)

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer list in some files; we need a single value
        if len(set(kv_heads)) != 1:
            raise ValueError(f"per-layer attention.head_count_kv {kv_heads} is not supported")
        kv_heads = kv_heads[0]
    vocab_size = get("vocab_size")
    if vocab_size is None:
        tokens, embedding = reader.fields.get("tokenizer.ggml.tokens"), _tensor(reader, "token_embd.weight")
        if tokens is None and embedding is None:
            raise ValueError(f"GGUF has no {arch}.vocab_size, tokenizer.ggml.tokens or token_embd.weight")
        vocab_size = len(tokens.contents()) if tokens is not None else int(embedding.shape[1])  # [hidden, vocab]
    head_dim = int(get("attention.key_length", hidden // heads))
    rope_theta = _f32(get("rope.freq_base", 10000.0))
    model_type, hf_architecture = GGUF_ARCHITECTURES[arch]
    return {
        "model_type": model_type,
        "architectures": [hf_architecture],
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": _tensor(reader, "output.weight") is None,
        "rope_scaling": _rope_scaling(reader, arch, rope_theta, int(get("rope.dimension_count", head_dim))),
        "bos_token_id": _meta(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _meta(reader, "tokenizer.ggml.eos_token_id"),
        "attention_bias": _tensor(reader, "blk.0.attn_q.bias") is not None,
    }


def _rope_scaling(reader, arch: str, theta: float, rope_dim: int) -> dict | None:
    kind = _meta(reader, f"{arch}.rope.scaling.type")
    factor = _meta(reader, f"{arch}.rope.scaling.factor")
    orig_ctx = _meta(reader, f"{arch}.rope.scaling.original_context_length")
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn" and factor:
        return {"rope_type": "yarn", "factor": _f32(factor), "original_max_position_embeddings": orig_ctx}
    freqs = _tensor(reader, "rope_freqs.weight")
    if freqs is None:
        return None
    return _llama3_scaling(_dequantize(freqs).astype(np.float64).reshape(-1), theta, rope_dim)


def _llama3_scaling(f: np.ndarray, theta: float, rope_dim: int) -> dict | None:
    """Recover llama3 rope_scaling from llama.cpp's per-frequency divisors (rope_freqs.weight).

    The converter stores 1 (high frequencies), `factor` (low ones) and 1/((1-s)/factor + s) in
    between, where s = (old_ctx/wavelen - low)/(high - low) is linear in 1/wavelen. Only that line
    matters, so fixing low_freq_factor = 1 and solving the line for the rest reproduces every divisor.
    """
    factor = float(f.max())
    if factor <= 1.0:
        return None
    inv_wavelen = theta ** (-np.arange(0, rope_dim, 2) / rope_dim) / (2 * math.pi)
    mid = (f > 1.0 + 1e-4) & (f < factor - 1e-4)
    if mid.sum() >= 2:
        s = (1.0 / f[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
        a, b = np.polyfit(inv_wavelen[mid], s, 1)  # s = a * x + b, with a = old/(h-l), b = -l/(h-l)
        low, high, old = 1.0, 1.0 - 1.0 / b, round(-a / b)
    else:  # no transition band to fit: assume the Llama 3.1 defaults
        low, high, old = 1.0, 4.0, 8192
    return {"rope_type": "llama3", "factor": round(factor, 4), "low_freq_factor": low,
            "high_freq_factor": round(high, 4), "original_max_position_embeddings": int(old)}


def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise ValueError(f"unexpected GGUF tensor {name!r}: no Hugging Face name for it")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs -> rotate-half halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_weights(reader, dtype: torch.dtype | None = None,
                 skip: frozenset[str] | set[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, dequantized tensor in HF layout cast to dtype, float32 by default) for
    every tensor whose Hugging Face name is not in `skip` (those kept quantized, see gguf_blocks)."""
    import torch
    dtype = torch.float32 if dtype is None else dtype
    config = gguf_hf_config(reader)
    permuted = config["model_type"] == "llama"  # qwen2/qwen3 GGUFs keep HF's rotate-half layout
    for t in reader.tensors:
        if t.name in _SKIPPED_TENSORS or _hf_name(t.name) in skip:
            continue
        name = _hf_name(t.name)
        arr = _dequantize(t)
        if permuted and (".attn_q." in t.name or ".attn_k." in t.name):
            n_head = config["num_attention_heads" if ".attn_q." in t.name else "num_key_value_heads"]
            arr = _unpermute(arr, n_head)
        yield name, torch.from_numpy(np.array(arr, dtype=np.float32)).to(dtype)  # copy: off the mmap


GGUF_KEPT_TYPES = ("Q4_0", "Q4_1", "Q8_0")


@dataclass
class GGUFBlocks:
    """One GGUF tensor's quantized blocks of 32 weights, decoded but not dequantized, rows in Hugging
    Face order. Q4_0 / Q4_1: w = codes * scale + min with codes 0..15 (Q4_0 stores d (q - 8): scale = d,
    min = -8 d, both exact in fp32); Q8_0: w = codes * scale with int8 codes and no min."""
    kind: str                  # "Q4_0", "Q4_1" or "Q8_0"
    codes: np.ndarray          # [N, K]: uint8 (Q4) or int8 (Q8_0)
    scale: np.ndarray          # [N, K // 32] float32 (the blocks' fp16 d)
    min: np.ndarray | None     # [N, K // 32] float32 for Q4; None for Q8_0

    def dequantize(self) -> np.ndarray:
        n, k = self.codes.shape
        w = self.codes.reshape(n, k // 32, 32).astype(np.float32) * self.scale[..., None]
        return (w if self.min is None else w + self.min[..., None]).reshape(n, k)


def gguf_blocks(reader, names: list[str]) -> Iterator[tuple[str, GGUFBlocks]]:
    """Yield (name, blocks) for those of the Hugging Face tensor `names` stored as Q4_0, Q4_1 or Q8_0.
    llama's q/k rows are un-permuted like the dequantized weights (a row permutation: it moves whole
    rows of codes and of block scales)."""
    wanted = set(names)
    config = gguf_hf_config(reader)
    permuted = config["model_type"] == "llama"
    for t in reader.tensors:
        if t.name in _SKIPPED_TENSORS or t.tensor_type.name not in GGUF_KEPT_TYPES or len(t.shape) != 2:
            continue
        name = _hf_name(t.name)
        if name not in wanted:
            continue
        b = _blocks(t)
        if permuted and (".attn_q." in t.name or ".attn_k." in t.name):
            n_head = config["num_attention_heads" if ".attn_q." in t.name else "num_key_value_heads"]
            b = GGUFBlocks(b.kind, *(None if a is None else np.ascontiguousarray(_unpermute(a, n_head))
                                     for a in (b.codes, b.scale, b.min)))
        yield name, b


def _blocks(t) -> GGUFBlocks:
    """A Q4_0, Q4_1 or Q8_0 tensor's blocks as [rows, K] codes and [rows, K // 32] scales (and mins), rows in
    the file's order; a tensor of more than two dims has its outer dims as rows."""
    kind, k = t.tensor_type.name, int(t.shape[0])                 # GGUF lists dims innermost first
    n = int(np.prod([int(d) for d in t.shape[1:]]))
    raw = np.asarray(t.data).reshape(n, k // 32, -1)
    scale = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        return GGUFBlocks(kind, raw[..., 2:].copy().view(np.int8).reshape(n, k), scale, None)
    qs = raw[..., 4:] if kind == "Q4_1" else raw[..., 2:]  # 16 bytes: element j in the low nibble of byte j,
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(n, k)     # element j + 16 in its high one
    mins = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if kind == "Q4_1" else -8 * scale
    return GGUFBlocks(kind, codes, scale, np.ascontiguousarray(mins))


def gguf_tokenizer(reader) -> tuple[Tokenizer, dict]:
    """Rebuild the tokenizer from tokenizer.ggml.* metadata; it never adds BOS/EOS itself."""
    kind = _meta(reader, "tokenizer.ggml.model")
    tokens = _meta(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ValueError("GGUF file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    types = _meta(reader, "tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if kind == "gpt2":
        tokenizer = _bpe_tokenizer(reader, vocab)
    elif kind == "llama":
        tokenizer = _spm_tokenizer(reader, tokens, vocab)
    else:
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2', 'llama')")
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, ty in enumerate(types) if ty in (_TOKEN_CONTROL, _TOKEN_UNKNOWN)]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, ty in enumerate(types) if ty == _TOKEN_USER_DEFINED]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user)

    bos_id = _meta(reader, "tokenizer.ggml.bos_token_id")
    eos_id = _meta(reader, "tokenizer.ggml.eos_token_id")
    meta = {
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "bos_token": tokens[bos_id] if bos_id is not None and bos_id < len(tokens) else None,
        "eos_token": tokens[eos_id] if eos_id is not None and eos_id < len(tokens) else None,
        "chat_template": _meta(reader, "tokenizer.chat_template"),
        "add_bos_token": bool(_meta(reader, "tokenizer.ggml.add_bos_token", kind == "llama")),
        "add_eos_token": bool(_meta(reader, "tokenizer.ggml.add_eos_token", False)),
        "pad_token_id": _meta(reader, "tokenizer.ggml.padding_token_id"),
    }
    return tokenizer, meta


def _bpe_tokenizer(reader, vocab: dict) -> Tokenizer:
    """Byte-level BPE (GPT-2 style); the pre-tokenizer follows tokenizer.ggml.pre."""
    merges = [tuple(m.split(" ", 1)) for m in _meta(reader, "tokenizer.ggml.merges", [])]
    pre = _meta(reader, "tokenizer.ggml.pre", "default")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3_PRE))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in _DIGITS_THEN_GPT2:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in _LLAMA3_PRE or pre in _QWEN2_PRE:
        regex = _LLAMA3_REGEX if pre in _LLAMA3_PRE else _QWEN2_REGEX
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"), byte_level])
        if pre in _QWEN2_PRE:
            tokenizer.normalizer = normalizers.NFC()
    else:
        if pre not in _GPT2_PRE:
            warnings.warn(f"GGUF pre-tokenizer {pre!r} is not known to kvflow; using the GPT-2 "
                          f"byte-level regex, which may split some text differently from llama.cpp")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_GPT2_REGEX), behavior="isolated"), byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _spm_tokenizer(reader, tokens: list, vocab: dict) -> Tokenizer:
    """SentencePiece BPE as llama.cpp runs it: merge the adjacent pair whose result scores highest.

    Expressed as a BPE model whose merges are every split of every token, ranked by the merged
    token's score; unknown bytes fall back to <0xXX> tokens.
    """
    scores = _meta(reader, "tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    ranked = []
    for tok, i in vocab.items():
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk_id = _meta(reader, "tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and unk_id < len(tokens) else None
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                     byte_fallback=True))
    add_prefix = bool(_meta(reader, "tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("▁")] if add_prefix else []
    tokenizer.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
    return tokenizer
