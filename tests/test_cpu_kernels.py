"""The CPU kernels (kvflow/kernels/cpu.cpp) against the PyTorch code they replace, on random inputs with
the shapes and strides the model gives them: exact where the arithmetic is the same, to a tolerance where
only the order of a sum differs (attention)."""
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kvflow.kernels as dispatch
from kvflow.attention import cpu as attn_cpu
from kvflow.attention.metadata import AttentionMetadata
from kvflow.layers.norm import RMSNorm
from kvflow.layers.rotary import RotaryEmbedding

ops = dispatch.load_ops()
needs_kernels = pytest.mark.skipif(ops is None, reason="the CPU kernels could not be built here")
DTYPES = [torch.bfloat16, torch.float32]


def _ref_rms(x, w, eps):
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * w


def _close(got, expected, dtype):
    """fp32: a sum added in another order, or exp from another library, differs in the last bits; bf16:
    that may flip a rounding, one bf16 ulp on a few values."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
        assert (got != expected).float().mean().item() < 0.02


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 70])
@needs_kernels
def test_rms_norm_kernels_match_pytorch(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=g).to(dtype) * 3
    r = torch.randn(rows, 576, generator=g).to(dtype)
    w = torch.randn(576, generator=g).to(dtype)
    out = torch.empty_like(x)
    ops.rms_norm(out, x, w, 1e-5)
    _close(out, _ref_rms(x, w, 1e-5), dtype)
    xk, rk = x.clone(), r.clone()
    ops.fused_add_rms_norm(xk, rk, w, 1e-5)
    assert torch.equal(rk, x + r)                       # the residual add rounds exactly as PyTorch's
    _close(xk, _ref_rms(x + r, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@needs_kernels
def test_rmsnorm_module_takes_the_kernel_and_agrees(dtype):
    norm = RMSNorm(64, 1e-6).to(dtype)
    norm.weight.data = torch.rand(64).to(dtype) + 0.5
    x, r = torch.randn(5, 64).to(dtype), torch.randn(5, 64).to(dtype)
    out, res = norm(x.clone(), r.clone())
    assert torch.equal(res, x + r)
    torch.testing.assert_close(out.float(), _ref_rms(x + r, norm.weight, 1e-6).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@needs_kernels
def test_rotary_kernel_is_exact_on_a_strided_view(dtype):
    rope = RotaryEmbedding(64, 512, 10000.0)
    pos = torch.tensor([0, 3, 100, 511])
    qkv = torch.randn(4, (9 + 2 * 3) * 64).to(dtype)
    qk = qkv[:, :12 * 64].view(4, 12, 64)             # q and k heads side by side, a view of qkv
    cos, sin = rope.cos_sin(pos)
    expected = (qk.float() * cos + qk.float().roll(32, dims=-1) * sin).to(dtype)
    v_before = qkv[:, 12 * 64:].clone()
    ops.rotary_(qk, cos, sin)
    assert torch.equal(qk, expected)
    assert torch.equal(qkv[:, 12 * 64:], v_before)     # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@needs_kernels
def test_silu_and_mul_kernel_matches_pytorch(dtype):
    x = torch.randn(3, 2 * 1536).to(dtype) * 4
    gate, up = x.chunk(2, dim=-1)
    out = torch.empty(3, 1536, dtype=dtype)
    ops.silu_and_mul(out, x)
    _close(out, F.silu(gate) * up, dtype)                # exp may differ in its last fp32 bit


def _paged_case(dtype, lens, block_size=16, hq=9, hkv=3, d=64, num_blocks=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    max_blocks = max(-(-n // block_size) for n in lens)
    tables = torch.zeros(len(lens), max_blocks, dtype=torch.int64)
    used = 0
    for i, n in enumerate(lens):
        nb = -(-n // block_size)
        tables[i, :nb] = perm[used:used + nb]
        used += nb
    q = torch.randn(len(lens), hq, d, generator=g).to(dtype)
    return q, k_cache, v_cache, tables


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens", [[1], [37], [16, 5, 130, 64], [300] * 12])
@needs_kernels
def test_paged_decode_attention_kernel_matches_sdpa(dtype, lens):
    q, k_cache, v_cache, tables = _paged_case(dtype, lens)
    out = torch.empty_like(q)
    ctx = torch.tensor(lens, dtype=torch.int64)
    ops.paged_decode_attention(out, q, k_cache, v_cache, tables, ctx, 0.125)
    for i, n in enumerate(lens):
        keys = k_cache[tables[i]].flatten(0, 1)[:n].transpose(0, 1).float()     # [Hkv, n, D]
        values = v_cache[tables[i]].flatten(0, 1)[:n].transpose(0, 1).float()
        ref = F.scaled_dot_product_attention(q[i].float().view(3, 3, 64), keys, values, scale=0.125).view(9, 64)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[i].float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@needs_kernels
def test_paged_attention_kernel_path_agrees_with_the_pytorch_path(monkeypatch, dtype):
    """The whole paged_attention call, kernels on and off: two decode rows and a prefill chunk that
    attends to a cached prefix, each writing its new K/V first."""
    from kvflow.attention.metadata import PrefillSeq
    bs = 16
    _, k_cache, v_cache, tables = _paged_case(dtype, [40, 7, 50])
    g = torch.Generator().manual_seed(1)
    # rows 0, 1: decodes at positions 39 and 6; rows 2..5: a chunk at positions 46..49 of sequence 2
    pos = [(0, 39), (1, 6)] + [(2, p) for p in range(46, 50)]
    slots = torch.tensor([int(tables[s, p // bs]) * bs + p % bs for s, p in pos])
    q = torch.randn(6, 9, 64, generator=g).to(dtype)
    k, v = torch.randn(6, 3, 64, generator=g).to(dtype), torch.randn(6, 3, 64, generator=g).to(dtype)
    mask = torch.arange(50).unsqueeze(0) <= torch.arange(46, 50).unsqueeze(1)
    outs = []
    for kernels in (True, False):
        meta = AttentionMetadata(slot_mapping=slots, num_decodes=2, decode_block_tables=tables[:2],
                                 decode_context_lens=torch.tensor([40, 7]),
                                 prefills=[PrefillSeq(2, 4, 50, tables[2, :4], mask)])
        monkeypatch.setattr(dispatch, "ENABLED", kernels)
        kc, vc = k_cache.clone(), v_cache.clone()
        outs.append((attn_cpu.paged_attention(q, k, v, kc, vc, meta, 0.125), kc, vc))
    (o1, kc1, vc1), (o2, kc2, vc2) = outs
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)
    assert torch.equal(o1[2:], o2[2:])                  # the chunk runs SDPA on both paths
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(o1[:2].float(), o2[:2].float(), rtol=tol, atol=tol)


def test_kernels_are_built_where_a_compiler_is():
    """A machine with a C++ compiler must run the kernels: a failed build must not pass as a skip."""
    import shutil
    if shutil.which("c++") or shutil.which("g++"):
        assert ops is not None and hasattr(ops, "paged_decode_attention")


@needs_kernels
def test_kernels_reject_bad_arguments():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.rms_norm(torch.empty(2, 8, dtype=torch.float64), x.double(), torch.ones(8, dtype=torch.float64), 1e-5)
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(torch.empty_like(x), x, torch.ones(7), 1e-5)
    q, k_cache, v_cache, tables = _paged_case(torch.float32, [20])
    with pytest.raises(RuntimeError, match="does not fit"):
        ops.paged_decode_attention(torch.empty_like(q), q, k_cache, v_cache, tables, torch.tensor([99]), 0.1)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.write_kv(torch.randn(1, 3, 64), torch.randn(1, 3, 64), k_cache, v_cache, torch.tensor([10 ** 6]))


# ---- int4 weights x two-term int8 activations ------------------------------------------------------------

def _int4_weight(n, k, seed=0):
    from kvflow.quant.formats import quantize_int4
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    return quantize_int4(w)


@needs_kernels
def test_int4_tile_packing_round_trips():
    from kvflow.quant.formats import pack_int4_tiles, unpack_int4_tiles
    w = _int4_weight(48, 96)
    packed, sz = pack_int4_tiles(w)
    assert packed.shape == (3, 3, 4, 64) and packed.dtype == torch.uint8 and sz.shape == (3, 3, 2, 16)
    assert torch.equal(unpack_int4_tiles(packed), w.codes)
    dense = torch.empty(48, 96)
    ops.int4_dequantize(dense, packed, sz, 0)
    zero = (w.min + 8 * w.scale).bfloat16().float()
    ref = (w.codes.view(48, 3, 32).float() - 8) * w.scale.bfloat16().float()[..., None] + zero[..., None]
    assert torch.equal(dense, ref.view(48, 96))           # (q - 8) s + z in fp32, as PyTorch's int4 kernel
    part = torch.empty(16, 96)
    ops.int4_dequantize(part, packed, sz, 2)               # the last tile alone
    assert torch.equal(part, dense[32:])


@needs_kernels
@pytest.mark.skipif(ops is None or not hasattr(ops, "int4_linear"), reason="needs AVX-512 VNNI or AVX2 + FMA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 17, 128])
def test_int4_linear_matches_the_dequantized_matmul(dtype, rows):
    """The activations' two int8 terms leave an error below bf16's: the result matches a matmul on the
    dequantized weights to a few 1e-4 of its largest value, even with an outlier channel in x."""
    from kvflow.quant.formats import pack_int4_tiles
    w = _int4_weight(208, 576, seed=rows)
    packed, sz = pack_int4_tiles(w)
    dense = torch.empty(208, 576)
    ops.int4_dequantize(dense, packed, sz, 0)
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(1))
    x[:, 7] = 40.0                                          # an outlier channel, as real hidden states have
    x = x.to(dtype)
    out = torch.empty(rows, 208, dtype=dtype)
    ops.int4_linear(out, x, packed, sz)
    ref = x.float() @ dense.t()
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < (5e-4 if dtype == torch.float32 else 1e-2), err.item()
    with pytest.raises(RuntimeError, match="columns"):
        ops.int4_linear(torch.empty(rows, 100, dtype=dtype), x, packed, sz)


@needs_kernels
def test_int8_tile_packing_round_trips():
    from kvflow.quant.formats import pack_int8_tiles, quantize_int8, unpack_int8_tiles
    w = quantize_int8(torch.randn(40, 64) * 0.05)          # 40 rows: the last tile is padded
    packed, wsum = pack_int8_tiles(w.codes)
    assert packed.shape == (3, 16, 64) and wsum.shape == (3, 2, 16)
    assert torch.equal(unpack_int8_tiles(packed, 0, 40), w.codes)
    assert torch.equal(unpack_int8_tiles(packed, 16, 35), w.codes[16:35])
    assert torch.equal(wsum.transpose(1, 2).reshape(48, 2)[:40], w.codes.view(40, 2, 32).sum(-1, dtype=torch.int32))


@needs_kernels
@pytest.mark.skipif(ops is None or not hasattr(ops, "int8_linear"), reason="needs AVX-512 VNNI or AVX2 + FMA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int8_linear_matches_the_dequantized_matmul(dtype, rows):
    from kvflow.quant.formats import pack_int8_tiles, quantize_int8
    w = quantize_int8(torch.randn(200, 576, generator=torch.Generator().manual_seed(rows)) * 0.05)
    packed, wsum = pack_int8_tiles(w.codes)
    scale = F.pad(w.scale.float(), (0, 8))
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(2))
    x[:, 3] = -50.0
    x = x.to(dtype)
    out = torch.empty(rows, 200, dtype=dtype)
    ops.int8_linear(out, x, packed, wsum, scale)
    ref = x.float() @ (w.codes.float() * w.scale[:, None]).t()
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < (5e-4 if dtype == torch.float32 else 1e-2), err.item()


# ---- int8 KV cache -----------------------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_int8_is_bit_exact_with_the_pytorch_quantization(dtype):
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(5, 15 * 64, generator=g).to(dtype) * 4
    qkv[0, 12 * 64:13 * 64] = 0                          # an all-zero row: the 1e-10 floor on the scale
    k, v = qkv[:, 9 * 64:12 * 64].view(5, 3, 64), qkv[:, 12 * 64:].view(5, 3, 64)
    slots = torch.tensor([3, 17, 40, 41, 100])
    caches = [torch.zeros(8, 16, 3, 64, dtype=torch.int8) for _ in range(2)]
    scales = [torch.zeros(8, 16, 3, dtype=dtype) for _ in range(2)]
    ops.write_kv_int8(k, v, *caches, *scales, slots)
    ref_caches = [torch.zeros(8, 16, 3, 64, dtype=torch.int8) for _ in range(2)]
    ref_scales = [torch.zeros(8, 16, 3, dtype=dtype) for _ in range(2)]
    attn_cpu.write_kv(*ref_caches, k, v, slots, *ref_scales)
    for got, ref in zip(caches + scales, ref_caches + ref_scales):
        assert torch.equal(got, ref)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_cache_decode_kernel_agrees_with_the_pytorch_path(monkeypatch, dtype):
    _, k_cache, v_cache, tables = _paged_case(dtype, [40, 7, 130])
    kq, ks = attn_cpu.quantize_int8(k_cache.flatten(0, 1))
    vq, vs = attn_cpu.quantize_int8(v_cache.flatten(0, 1))
    kq, vq = kq.view(k_cache.shape), vq.view(v_cache.shape)
    ks, vs = ks.view(k_cache.shape[:3]), vs.view(v_cache.shape[:3])
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 9, 64, generator=g).to(dtype)
    k, v = torch.randn(3, 3, 64, generator=g).to(dtype), torch.randn(3, 3, 64, generator=g).to(dtype)
    lens = [40, 7, 130]
    slots = torch.tensor([int(tables[i, (n - 1) // 16]) * 16 + (n - 1) % 16 for i, n in enumerate(lens)])
    outs = []
    for kernels in (True, False):
        meta = AttentionMetadata(slot_mapping=slots, num_decodes=3, decode_block_tables=tables,
                                 decode_context_lens=torch.tensor(lens), prefills=[])
        monkeypatch.setattr(dispatch, "ENABLED", kernels)
        state = [t.clone() for t in (kq, vq, ks, vs)]
        outs.append((attn_cpu.paged_attention(q, k, v, state[0], state[1], meta, 0.125, state[2], state[3]), state))
    (o1, s1), (o2, s2) = outs
    assert all(torch.equal(a, b) for a, b in zip(s1, s2))           # the same bytes written
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(o1.float(), o2.float(), rtol=tol, atol=tol)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_splits_long_contexts_and_merges_exactly(dtype):
    """Contexts past one 256-position chunk are split over tasks and merged (split-K); a chunk boundary
    inside a block, many chunks, and a one-token context in the same batch."""
    lens = [257, 1000, 1, 512]
    q, k_cache, v_cache, tables = _paged_case(dtype, lens, block_size=24, num_blocks=128)
    out = torch.empty_like(q)
    ops.paged_decode_attention(out, q, k_cache, v_cache, tables, torch.tensor(lens), 0.125)
    for i, n in enumerate(lens):
        keys = k_cache[tables[i]].flatten(0, 1)[:n].transpose(0, 1).float()
        values = v_cache[tables[i]].flatten(0, 1)[:n].transpose(0, 1).float()
        ref = F.scaled_dot_product_attention(q[i].float().view(3, 3, 64), keys, values, scale=0.125).view(9, 64)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[i].float(), ref, rtol=tol, atol=tol)


def test_kernel_cache_falls_back_to_the_temp_dir_when_the_cache_is_not_writable(tmp_path, monkeypatch):
    import kvflow.kernels.build as kernels
    monkeypatch.setenv("KVFLOW_CACHE_DIR", str(tmp_path / "rw"))
    assert kernels.cache_dir() == tmp_path / "rw" / "kernels"
    blocker = tmp_path / "a-file"
    blocker.write_text("")                  # a folder cannot be made under a file, even by root
    monkeypatch.setenv("KVFLOW_CACHE_DIR", str(blocker / "cache"))
    assert kernels.cache_dir().parent == Path(tempfile.gettempdir())


@needs_kernels
def test_int4_tiles_dequantize_in_pytorch_matches_the_kernel():
    """The tiles layout's PyTorch dequantization (a "tiles" layer's path while the kernels are off)."""
    from kvflow.quant.formats import dequantize_int4_tiles, pack_int4_tiles
    w = _int4_weight(64, 96, seed=3)
    packed, sz = pack_int4_tiles(w)
    for dtype in DTYPES:
        dense = torch.empty(64, 96, dtype=dtype)
        ops.int4_dequantize(dense, packed, sz, 0)
        assert torch.equal(dequantize_int4_tiles(packed, sz, 0, 64).to(dtype), dense)
        assert torch.equal(dequantize_int4_tiles(packed, sz, 32, 64).to(dtype), dense[32:])


# ---- the one dispatch (kvflow.kernels.kernel_ops) ------------------------------------------------------------

def test_kernel_ops_answers_by_switch_device_and_dtype():
    x = torch.zeros(2, 64)
    assert dispatch.kernel_ops(x) is ops and dispatch.kernel_ops(x.bfloat16()) is ops   # None: not built here
    assert dispatch.kernel_ops(x.half()) is None and dispatch.kernel_ops(x.to(torch.int8)) is None
    assert dispatch.kernel_ops(torch.zeros(2, device="meta")) is None
    assert dispatch.kernel_ops_for("meta") is None and dispatch.kernel_ops_for("cpu", "no_such_op") is None
    assert dispatch.kernel_ops_for(torch.device("cpu")) is ops
    with dispatch.disabled():
        assert dispatch.kernel_ops(x) is None and dispatch.kernel_ops_for("cpu") is None
        assert not dispatch.enabled()
    assert dispatch.kernel_ops(x) is ops and dispatch.enabled() == (ops is not None)
    assert dispatch.set_enabled(False) is True and dispatch.kernel_ops(x) is None
    assert dispatch.set_enabled(True) is False and dispatch.kernel_ops(x) is ops


class _Spy:
    """The kernels' namespace, recording the name of every op called through it."""

    def __init__(self, ops):
        self.ops, self.calls = ops, []

    def __getattr__(self, name):
        op = getattr(self.ops, name)             # AttributeError for an op this build lacks, as the real one

        def call(*args):
            self.calls.append(name)
            return op(*args)
        return call


def _tiny_quantized_model(method):
    from kvflow.attention.backend import get_attention_backend
    from kvflow.config import ModelConfig
    from kvflow.models.llama import LlamaForCausalLM
    from kvflow.quant.layers import quantize_model
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
                      max_position_embeddings=64, tie_word_embeddings=False, attention_bias=False, qk_norm=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg, 64, get_attention_backend(device="cpu"))
    quantize_model(model, method)
    return model


def _decode_step(model):
    """Two decode rows (positions 0 and 1) on fresh caches; the logits."""
    attn = model.layers[0].self_attn
    attn.k_cache, attn.v_cache = torch.zeros(4, 8, 2, 16), torch.zeros(4, 8, 2, 16)
    meta = AttentionMetadata(slot_mapping=torch.tensor([0, 9]), num_decodes=2,
                             decode_block_tables=torch.tensor([[0], [1]]), decode_context_lens=torch.tensor([1, 2]),
                             prefills=[])
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor([3, 5]), torch.tensor([0, 1]), meta))


@needs_kernels
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_the_switch_reaches_every_call_site(monkeypatch, method):
    """Every call site asks kernel_ops: with the kernels off not one op runs, the quantized layers included
    (built while off: PyTorch's layout; built while on and run off: their dense PyTorch path)."""
    spy = _Spy(ops)
    monkeypatch.setattr(dispatch, "_library", spy)
    with dispatch.disabled():
        built_off = _tiny_quantized_model(method)
        off = _decode_step(built_off)
    assert spy.calls == []
    assert {m.layout for m in built_off.modules() if hasattr(m, "layout")} == {"aten"}
    built_on = _tiny_quantized_model(method)
    on = _decode_step(built_on)
    expected = {"rms_norm", "fused_add_rms_norm", "rotary_", "write_kv", "paged_decode_attention", "silu_and_mul"}
    expected |= {name for name in {f"{method}_linear", "int8_linear"} if hasattr(ops, name)}   # int8 logits
    assert set(spy.calls) == expected
    spy.calls.clear()
    with dispatch.disabled():
        on_then_off = _decode_step(built_on)
    assert spy.calls == []
    for got in (on, on_then_off):        # other kernels, the same weights: bf16-level differences at most
        assert (got - off).abs().max() <= 0.02 * off.abs().max()
