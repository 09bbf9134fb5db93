"""Tests for kvflow.models.gguf: weights, config and tokenizer from a GGUF file.

The reference implementations are transformers (weights, config, the SmolLM2 tokenizer) and llama.cpp
via llama-cpp-python (the synthetic SPM and BPE pre-tokenizer vocabularies, whose llama.cpp-specific
rules transformers does not follow); tests that need one of them skip when it is not installed.
llama-cpp-python is in the `bench` extra only (it builds llama.cpp from source), so `make test` runs
the transformers comparisons and skips the llama.cpp ones.
"""

import collections
import math
import os

import gguf
import numpy as np
import pytest
import torch

from kvflow.models.gguf import (SUPPORTED_ARCHITECTURES, gguf_hf_config, gguf_tokenizer, gguf_weights,
                                read_gguf)

TOKENIZER_STRINGS = [
    "Hello, world!",
    "12345",
    "The year 2024 had 366 days; pi is 3.14159.",
    "def square(x):\n    return x ** 2  # comment\n",
    "I'm sure you'll see they've DON'T",
    "emoji 🤗👍🏽 ok",
    "中文测试，日本語のテキスト",
    "naïve café — Привет мир",
    "   leading spaces",
    "trailing   ",
    "\n\n\ttabs\t\n",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n",
    "https://example.com/path?q=1&r=2",
    "",
]


@pytest.fixture(scope="module")
def gguf_path(default_model_path):
    return default_model_path


@pytest.fixture(scope="module")
def reader(gguf_path):
    return read_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf_model(hf_smollm2):
    return hf_smollm2


# ---------------------------------------------------------------- the real SmolLM2 GGUF


@pytest.mark.slow          # transformers loads the whole model (hf_smollm2)
def test_weights_match_transformers(reader, hf_model):
    expected = hf_model.state_dict()
    names = set()
    for name, tensor in gguf_weights(reader):
        names.add(name)
        assert tensor.dtype == torch.float32
        if name == "lm_head.weight" and hf_model.config.tie_word_embeddings:
            continue
        assert name in expected, name
        assert tensor.shape == expected[name].shape, name
        assert torch.allclose(tensor, expected[name], atol=1e-6), name
    assert names == set(expected) - ({"lm_head.weight"} if hf_model.config.tie_word_embeddings else set())


def test_weights_dtype(reader):
    name, tensor = next(gguf_weights(reader, dtype=torch.bfloat16))
    assert tensor.dtype == torch.bfloat16 and tensor.is_contiguous()


@pytest.mark.slow          # the same model, when run alone
def test_config_matches_transformers(reader, hf_model):
    config = gguf_hf_config(reader)
    hf = hf_model.config
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "attention_bias"):
        assert config[key] == getattr(hf, key), key
    assert config["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    hf_theta = getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]
    assert config["rope_theta"] == pytest.approx(hf_theta)
    assert config["rope_scaling"] is None
    assert config["tie_word_embeddings"] is True


def test_tokenizer_matches_transformers(gguf_path, reader):
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(gguf_path)
    reference = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer, _ = gguf_tokenizer(reader)
    for s in TOKENIZER_STRINGS:
        expected = reference.encode(s, add_special_tokens=False)     # special tokens in the text still parse
        assert tokenizer.encode(s).ids == expected, s


def test_tokenizer_roundtrip_and_meta(reader):
    tokenizer, meta = gguf_tokenizer(reader)
    for s in TOKENIZER_STRINGS:
        assert tokenizer.decode(tokenizer.encode(s).ids, skip_special_tokens=False) == s
    assert tokenizer.encode("<|im_start|>").ids == [1]
    assert tokenizer.encode("12345").ids == [tokenizer.token_to_id(c) for c in "12345"]  # digits split
    assert tokenizer.encode("hi").ids[0] != meta["bos_token_id"]  # never adds BOS itself
    assert meta["bos_token_id"] == 1 and meta["eos_token_id"] == 2
    assert meta["bos_token"] == "<|im_start|>" and meta["eos_token"] == "<|im_end|>"
    assert meta["add_bos_token"] is False and meta["add_eos_token"] is False
    assert meta["pad_token_id"] == 2
    assert "<|im_start|>" in meta["chat_template"]


# ---------------------------------------------------------------- invalid files


def _write_gguf(path, arch, metadata=None, tensors=None):
    """Write a GGUF file: metadata(writer) adds keys; tensors maps GGUF names to numpy arrays."""
    writer = gguf.GGUFWriter(str(path), arch)
    if metadata is not None:
        metadata(writer)
    for name, array in (tensors or {}).items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="GGUF"):
        read_gguf(str(path))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="GGUF"):
        read_gguf(str(path))


def test_truncated_file(gguf_path, tmp_path):
    path = tmp_path / "half.gguf"
    with open(gguf_path, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(os.path.getsize(gguf_path) // 2))
    with pytest.raises(ValueError, match="not a valid GGUF"):
        read_gguf(str(path))


def test_truncated_header(gguf_path, tmp_path):
    path = tmp_path / "head.gguf"
    with open(gguf_path, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(100_000))  # cut inside the tokenizer metadata
    with pytest.raises(ValueError, match="not a valid GGUF"):
        read_gguf(str(path))


def test_unsupported_architecture(tmp_path):
    path = _write_gguf(tmp_path / "mamba.gguf", "mamba", lambda w: w.add_block_count(1),
                       {"token_embd.weight": np.zeros((8, 4))})
    with pytest.raises(ValueError, match="mamba") as info:
        read_gguf(path)
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in str(info.value)


def test_reader_is_kept_while_the_file_is_unchanged(tmp_path):
    """read_gguf keeps one reader per file as it is: the same object again, a fresh one once the file changed
    (its size or modification time), and an error once it is gone."""
    path = _write_gguf(tmp_path / "t.gguf", "llama", lambda w: w.add_block_count(1),
                       {"token_embd.weight": np.zeros((8, 4))})
    first = read_gguf(path)
    assert read_gguf(path) is first and read_gguf(str(tmp_path / "." / "t.gguf")) is first
    _write_gguf(path, "llama", lambda w: w.add_block_count(2), {"token_embd.weight": np.ones((16, 4))})
    again = read_gguf(path)
    assert again is not first and again.fields["llama.block_count"].contents() == 2
    os.remove(path)
    with pytest.raises(FileNotFoundError):
        read_gguf(path)


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_reader_reads_what_ggufs_own_reader_reads(tmp_path, endian):
    """kvflow's header reader (models/gguf_file.py) against gguf's GGUFReader on a file with every metadata
    value type, arrays, a quantized and a plain tensor, in either byte order."""
    from kvflow.models.gguf_file import GGUFFile
    path = str(tmp_path / "all.gguf")
    writer = gguf.GGUFWriter(path, "llama", endianess=endian)
    writer.add_uint8("t.u8", 200), writer.add_int8("t.i8", -5), writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -300), writer.add_uint32("t.u32", 4_000_000_000), writer.add_int32("t.i32", -7)
    writer.add_uint64("t.u64", 2**40), writer.add_int64("t.i64", -(2**40)), writer.add_float32("t.f32", 1e-5)
    writer.add_float64("t.f64", 0.1), writer.add_bool("t.bool", True), writer.add_string("t.str", "naïve ✓")
    writer.add_array("t.strs", ["a", "", "çé", "<|im_end|>"]), writer.add_array("t.ints", [3, -1, 7])
    writer.add_array("t.floats", [0.5, -2.25])
    rows = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    writer.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(rows, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.arange(64, dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()

    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    assert list(ours.fields) == [k for k in theirs.fields if not k.startswith("GGUF.")]
    for key, field in ours.fields.items():
        assert field.contents() == theirs.fields[key].contents(), key
        assert list(field.types) == theirs.fields[key].types, key
    assert ours.fields["t.strs"].contents() == ["a", "", "çé", "<|im_end|>"]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type, a.n_elements, a.n_bytes, a.data_offset) == \
            (b.name, b.tensor_type, b.n_elements, b.n_bytes, b.data_offset)
        assert list(a.shape) == list(b.shape) and a.data.shape == b.data.shape
        assert np.array_equal(gguf.quants.dequantize(a.data, a.tensor_type),
                              gguf.quants.dequantize(b.data, b.tensor_type))
    assert np.array_equal(ours.tensors[1].data, np.arange(64, dtype=np.float32))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_dequantize_gives_ggufs_own_values(kind, tmp_path):
    """kvflow's whole-array decoding of Q4_0 / Q4_1 / Q8_0 (models/gguf.py) against gguf-py's, on a 2-D and
    a 3-D tensor with an outlier and a zero block, read back from a file: the same fp32 values."""
    from kvflow.models.gguf import _dequantize
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((48, 96)).astype(np.float32)
    a[3, 5], a[7, :32] = 40.0, 0.0                        # an outlier and an all-zero block
    b = rng.standard_normal((3, 4, 64)).astype(np.float32)
    path = str(tmp_path / f"{kind}.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    writer.add_tensor("blk.0.ffn_gate.weight", gguf.quants.quantize(b, qtype), raw_dtype=qtype)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    for t, shape in zip(gguf.GGUFReader(path).tensors, (a.shape, b.shape), strict=True):
        ours = _dequantize(t)
        theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        assert ours.shape == shape and ours.dtype == np.float32
        assert np.array_equal(ours, theirs)          # every value (Q4_0's zeros may differ in sign)


# ---------------------------------------------------------------- tiny synthetic models

_GGUF_SUFFIX = {  # HF name suffix -> GGUF name suffix, written independently of the module under test
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows of arch llama (HF rotate-half -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_model(arch):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-6, tie_word_embeddings=arch != "llama")
    if arch == "llama":
        config = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(config)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.Qwen3Config(head_dim=16, **common)  # head_dim != hidden / heads
        model = transformers.Qwen3ForCausalLM(config)
    torch.manual_seed(0)
    state = {k: torch.randn(v.shape) for k, v in model.state_dict().items()}  # biases/norms non-trivial too
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return config, state


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_model_roundtrip(arch, tmp_path):
    config, state = _tiny_model(arch)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    tensors = {}
    for name, tensor in state.items():
        array = tensor.numpy()
        if name in _GGUF_GLOBAL:
            tensors[_GGUF_GLOBAL[name]] = array
            continue
        _, _, layer, suffix = name.split(".", 3)
        if arch == "llama" and suffix.startswith("self_attn.q_proj"):
            array = _llama_cpp_permute(array, config.num_attention_heads)
        elif arch == "llama" and suffix.startswith("self_attn.k_proj"):
            array = _llama_cpp_permute(array, config.num_key_value_heads)
        tensors[f"blk.{layer}.{_GGUF_SUFFIX[suffix]}"] = array

    def metadata(w):
        w.add_vocab_size(config.vocab_size)
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_block_count(config.num_hidden_layers)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        w.add_rope_freq_base(1_000_000.0)
        if arch == "qwen3":
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)

    reader = read_gguf(_write_gguf(tmp_path / f"{arch}.gguf", arch, metadata, tensors))
    loaded = dict(gguf_weights(reader))
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name

    cfg = gguf_hf_config(reader)
    assert cfg["model_type"] == arch
    assert cfg["architectures"] == [type(config).__name__.replace("Config", "ForCausalLM")]
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]) == (64, 32, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, head_dim)
    assert cfg["intermediate_size"] == 48 and cfg["max_position_embeddings"] == 128
    assert cfg["rms_norm_eps"] == pytest.approx(1e-6) and cfg["rope_theta"] == 1_000_000.0
    assert cfg["tie_word_embeddings"] == (arch != "llama")
    assert cfg["attention_bias"] == (arch == "qwen2")
    assert cfg["rope_scaling"] is None


def _llama3_factors(theta, dim, factor, low, high, old):
    """The per-frequency divisors that llama.cpp's converter stores as rope_freqs.weight."""
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("params", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 2.0, 8.0, 4096)])
def test_llama3_rope_scaling(params, tmp_path):
    theta, dim = 500_000.0, 128
    factors = _llama3_factors(theta, dim, *params)

    def metadata(w):
        w.add_vocab_size(32)
        w.add_context_length(131072)
        w.add_embedding_length(dim * 2)
        w.add_feed_forward_length(64)
        w.add_block_count(1)
        w.add_head_count(2)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_freq_base(theta)
        w.add_rope_dimension_count(dim)

    reader = read_gguf(_write_gguf(tmp_path / "llama3.gguf", "llama", metadata, {"rope_freqs.weight": factors}))
    scaling = gguf_hf_config(reader)["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == params[0]
    if params[1] == 1.0:  # low_freq_factor 1 is what the reconstruction assumes: exact parameters
        assert scaling["high_freq_factor"] == pytest.approx(params[2], rel=1e-4)
        assert scaling["original_max_position_embeddings"] == params[3]
    rebuilt = _llama3_factors(theta, dim, scaling["factor"], scaling["low_freq_factor"],
                              scaling["high_freq_factor"], scaling["original_max_position_embeddings"])
    np.testing.assert_allclose(rebuilt, factors, rtol=1e-4)
    assert list(gguf_weights(reader)) == []  # rope_freqs is folded into the config, not a weight


# ---------------------------------------------------------------- SentencePiece ("llama") tokenizer

_SPM_CORPUS = ("the quick brown fox jumps over the lazy dog. then the other fox went there and they "
               "thought that those three things were theirs. hello world, hello there!")
_SPM_STRINGS = ["the quick brown fox", "hello there", " leading space", "two  spaces",
                "unknown ü and 🤗 bytes", "the\nthe", "thereof theirs", ""]


def _tiny_model_metadata(w):
    """The model part of a one-layer GGUF that only exists to carry a tokenizer."""
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)


def _spm_gguf(path):
    """A tiny SentencePiece-BPE vocab (learned on _SPM_CORPUS) with byte-fallback tokens."""
    words = collections.Counter("▁" + w for w in _SPM_CORPUS.split(" "))
    segments = {w: list(w) for w in words}
    merged = []
    for _ in range(60):
        pairs = collections.Counter()
        for w, seg in segments.items():
            for pair in zip(seg, seg[1:]):
                pairs[pair] += words[w]
        (a, b), _ = pairs.most_common(1)[0]
        merged.append(a + b)
        for w, seg in segments.items():
            out, i = [], 0
            while i < len(seg):
                if seg[i:i + 2] == [a, b]:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            segments[w] = out
    chars = sorted({c for w in words for c in w} - set(merged))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + merged + chars
    types = [2, 3, 3] + [6] * 256 + [1] * (len(merged) + len(chars))
    scores = [0.0] * 259 + [-float(i) for i in range(len(merged) + len(chars))]

    def metadata(w):
        _tiny_model_metadata(w)
        w.add_head_count_kv(2)
        w.add_rope_dimension_count(4)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)

    return _write_gguf(path, "llama", metadata)


def test_spm_tokenizer_roundtrip(tmp_path):
    tokenizer, meta = gguf_tokenizer(read_gguf(_spm_gguf(tmp_path / "spm.gguf")))
    assert meta["add_bos_token"] is True and meta["bos_token"] == "<s>" and meta["eos_token"] == "</s>"
    for s in _SPM_STRINGS:
        assert tokenizer.decode(tokenizer.encode(s).ids) == s
    assert tokenizer.encode("<s>the").ids[0] == 1
    assert tokenizer.encode("🤗").tokens[-4:] == ["<0xF0>", "<0x9F>", "<0xA4>", "<0x97>"]


def test_spm_tokenizer_matches_llama_cpp(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = _spm_gguf(tmp_path / "spm.gguf")
    reference = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    tokenizer, _ = gguf_tokenizer(read_gguf(path))
    for s in _SPM_STRINGS + ["<s>the</s> fox"]:
        assert tokenizer.encode(s).ids == reference.tokenize(s.encode(), add_bos=False, special=True), s


def test_unsupported_tokenizer_model(tmp_path):
    def metadata(w):
        w.add_tokenizer_model("t5")
        w.add_token_list(["<pad>", "a"])

    reader = read_gguf(_write_gguf(tmp_path / "t5tok.gguf", "llama", metadata))
    with pytest.raises(ValueError, match="t5"):
        gguf_tokenizer(reader)


# ---------------------------------------------------------------- byte-level BPE pre-tokenizers


def _byte_chars():
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies are written in it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


# Merges chosen so that each pre-tokenizer's splitting rules show in the ids: digit runs, spaces
# before digits/punctuation, newlines, contractions in both cases.
_BPE_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("1", "2"), ("12", "3"), ("Ġ", "1"), ("Ċ", "Ċ"),
               ("'", "S"), ("'", "s"), ("Ġ", "Ġ"), ("ĠĠ", "Ġ"), ("Ġ", "Ċ"), (".", "Ċ"), ("!", "!"),
               ("Ġ", "'"), ("e", "'"), ("Ġ", "!"), ("ĠĠ", "ĠĠ"), ("4", "5"), ("45", "6"), ("Ġ", "(")]
_BPE_STRINGS = ["the 123456 then", "hello\n\nworld", "HE'S here, he's", "  \n  x", "a!!! b !!", "x.\ny",
                "1234567890", "tab\t\tthe", " (the)", "e'S 'the", "<|special|>the 12"]


def _bpe_gguf(path, pre):
    tokens = _byte_chars() + [a + b for a, b in _BPE_MERGES] + ["<|special|>"]

    def metadata(w):
        _tiny_model_metadata(w)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([1] * (len(tokens) - 1) + [3])
        w.add_token_merges([f"{a} {b}" for a, b in _BPE_MERGES])
        w.add_eos_token_id(len(tokens) - 1)

    return _write_gguf(path, "llama", metadata)


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2", "gpt-2"])
def test_bpe_pre_tokenizers_match_llama_cpp(pre, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = _bpe_gguf(tmp_path / f"{pre}.gguf", pre)
    reference = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    tokenizer, meta = gguf_tokenizer(read_gguf(path))
    assert meta["add_bos_token"] is False and meta["bos_token_id"] is None
    for s in _BPE_STRINGS:
        assert tokenizer.encode(s).ids == reference.tokenize(s.encode(), add_bos=False, special=True), s
        assert tokenizer.decode(tokenizer.encode(s).ids, skip_special_tokens=False) == s


def test_bpe_pre_tokenizer_specifics(tmp_path):
    def pieces(pre, s):
        tokenizer, _ = gguf_tokenizer(read_gguf(_bpe_gguf(tmp_path / f"{pre}.gguf", pre)))
        return tokenizer.encode(s).tokens

    assert pieces("smollm", "123456") == ["1", "2", "3", "4", "5", "6"]  # digits one by one
    assert pieces("llama-bpe", "123456") == ["123", "456"]  # groups of up to three digits
    assert pieces("qwen2", "e\u0301") == ["Ã", "©"]  # NFC-normalized, as Hugging Face's Qwen2 tokenizer
    with pytest.warns(UserWarning, match="not known"):
        assert pieces("some-new-pre", "the 1") == ["t", "he", "Ġ1"]  # GPT-2 regex keeps " 1" together
