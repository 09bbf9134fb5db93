// The weight matmuls of the quantized linear layers (kvflow/quant/layers.py): int4 (group 32) and int8
// (per row) weights times activations quantized to int8 on the fly, registered as torch.ops.kvflow.*
// beside cpu.cpp's kernels. The tile kernels come in one variant per instruction set, chosen when the
// library is compiled for this machine (build.py; KVFLOW_CPU_ISA=avx2 forces the AVX2 one; ops.h tells which):
// tiles_avx512.h (AVX-512 VNNI) or tiles_avx2.h (AVX2 + FMA). Both compute the same integer dots exactly
// and combine them with the same fp32 operations, so their results are identical. Without either, the two
// linear ops are not registered and the quantized layers use PyTorch's kernels.
//
// Int4Linear's layout for this kernel (kvflow/quant/weights.py packs it): rows in tiles of 16, K in groups
// of 32. packed [tiles, groups, 4, 64] uint8: vector p of a (tile, group) holds, at byte 4 * row + b, the
// code of k = 8p + b in its low nibble and of k = 8p + 4 + b in its high nibble. scale_zero [tiles, groups,
// 2, 16] bf16: the tile's 16 scales s, then its 16 zeros z; w = (q - 8) * s + z (PyTorch's int4 convention).
//
// Each activation row is quantized per group of 32 to two int8 terms (quantize_activations), and one
// vpdpbusd multiplies 64 weight codes (u8) by 4 activation bytes (s8) for 16 rows at once, with no
// horizontal sums: y[n] = sum_g s[n,g] (d1 q_g . x1_g + d2 q_g . x2_g) + (z[n,g] - 8 s[n,g]) sum(x_g), in
// fp32. The weights are read once for all rows of x: decode streams 4.5-bit weights at close to the
// memory's speed, instead of converting each code to a float.
//
// Int8Linear's layout (one scale per row): packed [tiles, K / 4, 64] int8, vector j of a tile holding at
// byte 4 r + b the weight of row r, k = 4 j + b; wsum [tiles, K / 32, 16] int32, each (row, group)'s sum of
// codes (the VNNI tiles take the activations as q + 128 and 128 * wsum off again); scale float32 [16 tiles].
// y[n] = scale[n] * sum_g (d1 dot1 + d2 dot2).
#include "common.h"
#include "ops.h"

namespace {

// x per group of 32 as d1 q1 + d2 q2, both int8: q1 = round(x / d1) with d1 = absmax / 127, and q2 the
// remainder x - d1 q1 quantized the same way (|remainder| <= d1 / 2). The error is then ~1/250 of one int8
// step, about bf16's own precision: one int8 term alone cost 1.5-2% perplexity on the default model.
template <typename T>
void quantize_activations(const T* x, int64_t k, int8_t* q1, int8_t* q2, float* d1, float* d2, float* sum) {
  float xf[32], rest[32];
  for (int64_t g = 0; g < k / 32; ++g) {
    load(x + g * 32, xf, 32);
    float amax = 0.f, total = 0.f;
    for (int i = 0; i < 32; ++i) {
      amax = std::max(amax, std::fabs(xf[i]));
      total += xf[i];
    }
    const float step = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    float rmax = 0.f;
    for (int i = 0; i < 32; ++i) {
      const float q = std::nearbyint(xf[i] * inv);
      q1[g * 32 + i] = int8_t(q);
      rest[i] = xf[i] - q * step;
      rmax = std::max(rmax, std::fabs(rest[i]));
    }
    const float inv2 = rmax > 0.f ? 127.f / rmax : 0.f;
    for (int i = 0; i < 32; ++i) q2[g * 32 + i] = int8_t(std::nearbyint(rest[i] * inv2));
    d1[g] = step;
    d2[g] = rmax / 127.f;
    sum[g] = total;
  }
}

struct Activations {   // quantize_activations' output for m rows
  std::vector<int8_t> q1, q2;
  std::vector<float> d1, d2, sum;
};

}  // namespace

#if defined(KVFLOW_TILES_AVX512)
#include "tiles_avx512.h"
#elif defined(KVFLOW_TILES_AVX2)
#include "tiles_avx2.h"
#endif

namespace kvflow_ops {

#ifdef KVFLOW_WEIGHT_TILES
// What int4_linear and int8_linear share: quantize x's rows, then run tile(t, activations, acc [m, 16])
// for every tile of 16 output columns over the threads, storing acc into out in out's dtype.
template <typename TileFn>
void tiled_matmul(at::Tensor& out, const at::Tensor& x, int64_t tiles, const char* name, const TileFn& tile) {
  const int64_t m = x.size(0), k = x.size(1), n = out.size(1), groups = k / 32;
  Activations a{std::vector<int8_t>(m * k), std::vector<int8_t>(m * k), std::vector<float>(m * groups),
                std::vector<float>(m * groups), std::vector<float>(m * groups)};
  KVFLOW_DISPATCH(x.scalar_type(), name, [&] {
    for (int64_t r = 0; r < m; ++r)
      quantize_activations(x.data_ptr<scalar_t>() + r * k, k, a.q1.data() + r * k, a.q2.data() + r * k,
                           a.d1.data() + r * groups, a.d2.data() + r * groups, a.sum.data() + r * groups);
    scalar_t* y = out.data_ptr<scalar_t>();
    const int64_t ys = out.stride(0);
    at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(m * 16);
      for (int64_t t = begin; t < end; ++t) {
        tile(t, a, acc.data());
        const int64_t cols = std::min<int64_t>(16, n - t * 16);
        for (int64_t r = 0; r < m; ++r) store(acc.data() + r * 16, y + r * ys + t * 16, cols);
      }
    });
  });
}

void check_int4(const at::Tensor& packed, const at::Tensor& scale_zero, int64_t k) {
  TORCH_CHECK(k % 32 == 0, "int4: K must be a multiple of 32");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 4 &&
                  packed.size(1) == k / 32 && packed.size(2) == 4 && packed.size(3) == 64,
              "int4: packed must be uint8 [tiles, K / 32, 4, 64]");
  TORCH_CHECK(scale_zero.scalar_type() == at::kBFloat16 && scale_zero.is_contiguous() && scale_zero.dim() == 4 &&
                  scale_zero.size(0) == packed.size(0) && scale_zero.size(1) == k / 32 && scale_zero.size(2) == 2 &&
                  scale_zero.size(3) == 16, "int4: scale_zero must be bf16 [tiles, K / 32, 2, 16]");
  check_cpu(packed, "packed");
}

// out [M, N] = x [M, K] @ W^T, W [N, K] int4 as above (N <= 16 tiles).
void int4_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_zero) {
  check_rows(x, "x");
  check_rows(out, "out");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && out.dim() == 2 && out.size(0) == x.size(0),
              "int4_linear: x must be contiguous [M, K] and out [M, N]");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "int4_linear: x and out must share one dtype");
  const int64_t m = x.size(0), k = x.size(1), n = out.size(1), groups = k / 32;
  check_int4(packed, scale_zero, k);
  const int64_t tiles = packed.size(0);
  TORCH_CHECK(n <= tiles * 16 && n > (tiles - 1) * 16, "int4_linear: out has ", n, " columns for ", tiles, " tiles");
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const c10::BFloat16* sz = scale_zero.data_ptr<c10::BFloat16>();
  tiled_matmul(out, x, tiles, "int4_linear", [&](int64_t t, const Activations& a, float* acc) {
    int4_tile(w + t * groups * 256, sz + t * groups * 32, groups, a, m, k, acc);
  });
}

// out [M, N] = x [M, K] @ W^T for int8 W as above; scale: float32 [16 * tiles].
void int8_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& wsum,
                 const at::Tensor& scale) {
  check_rows(out, "out");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() && out.dim() == 2 && out.size(0) == x.size(0),
              "int8_linear: x must be contiguous [M, K] and out [M, N]");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "int8_linear: x and out must share one dtype");
  const int64_t m = x.size(0), k = x.size(1), n = out.size(1), groups = k / 32;
  TORCH_CHECK(k % 32 == 0, "int8_linear: K must be a multiple of 32");
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.device().is_cpu() &&
                  packed.dim() == 3 && packed.size(1) == k / 4 && packed.size(2) == 64,
              "int8_linear: packed must be int8 [tiles, K / 4, 64]");
  const int64_t tiles = packed.size(0);
  TORCH_CHECK(wsum.scalar_type() == at::kInt && wsum.is_contiguous() && wsum.numel() == tiles * groups * 16,
              "int8_linear: wsum must be int32 [tiles, K / 32, 16]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == tiles * 16,
              "int8_linear: scale must be float32 [16 * tiles]");
  TORCH_CHECK(n <= tiles * 16 && n > (tiles - 1) * 16, "int8_linear: out has ", n, " columns for ", tiles, " tiles");
  const int8_t* w = packed.data_ptr<int8_t>();
  const int32_t* ws = wsum.data_ptr<int32_t>();
  const float* sc = scale.data_ptr<float>();
  tiled_matmul(out, x, tiles, "int8_linear", [&](int64_t t, const Activations& a, float* acc) {
    int8_tile(w + t * k * 16, ws + t * groups * 16, sc + t * 16, groups, a, m, k, acc);
  });
}
#endif

// The weight rows of tiles [tile0, tile0 + out.size(0) / 16), dequantized: out = (q - 8) * s + z, rounded
// once to out's dtype (PyTorch's int4 kernel computes the same in fp32). For the many-row path.
void int4_dequantize(at::Tensor& out, const at::Tensor& packed, const at::Tensor& scale_zero, int64_t tile0) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) % 16 == 0, "int4_dequantize: out must be "
              "contiguous [16 * tiles, K]");
  const int64_t k = out.size(1), groups = k / 32, tiles = out.size(0) / 16;
  TORCH_CHECK(k % 32 == 0, "int4: K must be a multiple of 32");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && scale_zero.is_contiguous() &&
                  scale_zero.scalar_type() == at::kBFloat16 && packed.numel() == scale_zero.numel() * 8 &&
                  packed.numel() % (groups * 256) == 0 && tile0 >= 0 && (tile0 + tiles) * groups * 256 <= packed.numel(),
              "int4_dequantize: packed / scale_zero do not hold those tiles");
  const uint8_t* w = packed.data_ptr<uint8_t>() + tile0 * groups * 256;
  const c10::BFloat16* sz = scale_zero.data_ptr<c10::BFloat16>() + tile0 * groups * 32;
  KVFLOW_DISPATCH(out.scalar_type(), "int4_dequantize", [&] {
    scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
      float vals[32];
      for (int64_t t = begin; t < end; ++t)
        for (int64_t g = 0; g < groups; ++g) {
          const uint8_t* wg = w + (t * groups + g) * 256;
          const c10::BFloat16* s = sz + (t * groups + g) * 32;
          for (int64_t r = 0; r < 16; ++r) {
            const float sc = to_f(s[r]), z = to_f(s[16 + r]);
            for (int p = 0; p < 4; ++p)
              for (int b = 0; b < 4; ++b) {
                const uint8_t byte = wg[p * 64 + r * 4 + b];
                vals[8 * p + b] = (float(byte & 15) - 8.f) * sc + z;
                vals[8 * p + 4 + b] = (float(byte >> 4) - 8.f) * sc + z;
              }
            store(vals, y + (t * 16 + r) * k + g * 32, 32);
          }
        }
    });
  });
}

// which variant of the tiles this build has: "avx512_vnni", "avx2", or "none" (no int4/int8_linear)
std::string weight_tiles() {
#ifdef KVFLOW_WEIGHT_TILES
  return KVFLOW_WEIGHT_TILES;
#else
  return "none";
#endif
}

}  // namespace kvflow_ops
