// The int4 and int8 weight tiles for AVX-512 VNNI (included by weights.cpp; see the layouts there).
// vpdpbusd multiplies 64 weight bytes by 4 activation bytes for the tile's 16 rows at once.
#pragma once
#include <immintrin.h>

namespace {

inline __m512 bf16x16_to_f32(const c10::BFloat16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}


inline __m512i dot_group(const __m512i* codes, const int8_t* xq) {
  __m512i dot = _mm512_setzero_si512();
  for (int j = 0; j < 8; ++j) {
    // codes[j] holds k = 8 (j / 2) + 4 (j % 2) + b: low nibbles (even j) then high (odd j)
    int32_t four;
    std::memcpy(&four, xq + 8 * (j / 2) + 4 * (j % 2), 4);
    dot = _mm512_dpbusd_epi32(dot, codes[j], _mm512_set1_epi32(four));
  }
  return dot;
}

// rows x one tile: acc [m, 16] = x[:m] . W[tile rows]^T
void int4_tile(const uint8_t* w, const c10::BFloat16* sz, int64_t groups, const Activations& a, int64_t m,
               int64_t k, float* acc) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512 eight = _mm512_set1_ps(8.f);
  for (int64_t r = 0; r < m * 16; ++r) acc[r] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* wg = w + g * 256;
    __m512i codes[8];
    for (int p = 0; p < 4; ++p) {
      const __m512i v = _mm512_loadu_si512(wg + p * 64);
      codes[2 * p] = _mm512_and_si512(v, low);
      codes[2 * p + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    }
    const __m512 s = bf16x16_to_f32(sz + g * 32);
    const __m512 mn = _mm512_sub_ps(bf16x16_to_f32(sz + g * 32 + 16), _mm512_mul_ps(eight, s));
    for (int64_t r = 0; r < m; ++r) {
      const int64_t rg = r * groups + g;
      const __m512 dot1 = _mm512_cvtepi32_ps(dot_group(codes, a.q1.data() + r * k + g * 32));
      const __m512 dot2 = _mm512_cvtepi32_ps(dot_group(codes, a.q2.data() + r * k + g * 32));
      const __m512 dot = _mm512_fmadd_ps(dot1, _mm512_set1_ps(a.d1[rg]), _mm512_mul_ps(dot2, _mm512_set1_ps(a.d2[rg])));
      __m512 y = _mm512_loadu_ps(acc + r * 16);
      y = _mm512_fmadd_ps(dot, s, y);
      y = _mm512_fmadd_ps(mn, _mm512_set1_ps(a.sum[rg]), y);
      _mm512_storeu_ps(acc + r * 16, y);
    }
  }
}


// int8 weights, one scale per row (Int8Linear): packed [tiles, K / 4, 64] int8, vector j of a tile holding
// at byte 4 r + b the weight of row r, k = 4 j + b; wsum [tiles, K / 32, 16] int32, each (row, group)'s sum
// of codes. vpdpbusd takes unsigned bytes on one side: the activations go in as q + 128 (q xor 0x80), and
// 128 * wsum is taken off each group's dot again. y[n] = scale[n] * sum_g (d1 dot1 + d2 dot2).
void int8_tile(const int8_t* w, const int32_t* wsum, const float* scale, int64_t groups, const Activations& a,
               int64_t m, int64_t k, float* acc) {
  for (int64_t r = 0; r < m * 16; ++r) acc[r] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i codes[8];
    for (int j = 0; j < 8; ++j) codes[j] = _mm512_loadu_si512(w + (g * 8 + j) * 64);
    const __m512i offset = _mm512_slli_epi32(_mm512_loadu_si512(wsum + g * 16), 7);   // 128 * wsum
    for (int64_t r = 0; r < m; ++r) {
      const int64_t rg = r * groups + g;
      __m512i dots[2];
      for (int term = 0; term < 2; ++term) {
        const int8_t* xq = (term ? a.q2.data() : a.q1.data()) + r * k + g * 32;
        __m512i dot = _mm512_setzero_si512();
        for (int j = 0; j < 8; ++j) {
          uint32_t four;
          std::memcpy(&four, xq + 4 * j, 4);
          dot = _mm512_dpbusd_epi32(dot, _mm512_set1_epi32(int32_t(four ^ 0x80808080u)), codes[j]);
        }
        dots[term] = _mm512_sub_epi32(dot, offset);
      }
      const __m512 dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[0]), _mm512_set1_ps(a.d1[rg]),
                                         _mm512_mul_ps(_mm512_cvtepi32_ps(dots[1]), _mm512_set1_ps(a.d2[rg])));
      _mm512_storeu_ps(acc + r * 16, _mm512_add_ps(_mm512_loadu_ps(acc + r * 16), dot));
    }
  }
  const __m512 s = _mm512_loadu_ps(scale);
  for (int64_t r = 0; r < m; ++r) _mm512_storeu_ps(acc + r * 16, _mm512_mul_ps(_mm512_loadu_ps(acc + r * 16), s));
}


}  // namespace
