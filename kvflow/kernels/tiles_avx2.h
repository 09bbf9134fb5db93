// The int4 and int8 weight tiles for AVX2 + FMA (included by weights.cpp; see the layouts there), for CPUs
// without AVX-512 VNNI. Same layouts, same results as tiles_avx512.h: a 64-byte vector of a tile is two
// 256-bit halves, rows 0-7 then rows 8-15, each 32-bit lane one row's 4 consecutive k.
//
// AVX2 has no vpdpbusd; the dot of unsigned bytes with signed bytes is vpmaddubsw (pairs into int16, with
// saturation) then vpmaddwd by ones (pairs of int16 into int32), as llama.cpp's AVX2 block dots do:
// - int4: codes 0..15 times activations |q| <= 127: a pair is at most 3810 in size, and the 8 pairs of a
//   lane over a group at most 30480, so the int16 sums of a whole group add without saturating before one
//   vpmaddwd.
// - int8: both sides are signed. |w| goes in as the unsigned side and q takes w's sign (vpsignb), so each
//   product is q w; a pair is at most 2 * 128 * 127 = 32512 and cannot saturate (w = -128, from a GGUF
//   Q8_0 block, is 128 as an unsigned byte). No 128 * wsum correction is needed.
// The integer dots are exact, as vpdpbusd's, and the fp32 operations after them are the same, in order.
#pragma once
#include <immintrin.h>

namespace {

inline __m256 bf16x8_to_f32(const c10::BFloat16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

inline int32_t four_bytes(const int8_t* p) {
  int32_t four;
  std::memcpy(&four, p, 4);
  return four;
}

// one group of one half-tile: 8 rows' int32 dots of their 32 codes with the row of activations xq
inline __m256i dot_group_avx2(const __m256i* codes, const int8_t* xq) {
  __m256i sum16 = _mm256_setzero_si256();
  for (int j = 0; j < 8; ++j) {   // codes[j] holds k = 8 (j / 2) + 4 (j % 2) + b, as in tiles_avx512.h
    const __m256i x = _mm256_set1_epi32(four_bytes(xq + 8 * (j / 2) + 4 * (j % 2)));
    sum16 = _mm256_add_epi16(sum16, _mm256_maddubs_epi16(codes[j], x));
  }
  return _mm256_madd_epi16(sum16, _mm256_set1_epi16(1));
}

// rows x one tile: acc [m, 16] = x[:m] . W[tile rows]^T
void int4_tile(const uint8_t* w, const c10::BFloat16* sz, int64_t groups, const Activations& a, int64_t m,
               int64_t k, float* acc) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256 eight = _mm256_set1_ps(8.f);
  for (int64_t r = 0; r < m * 16; ++r) acc[r] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* wg = w + g * 256;
    for (int h = 0; h < 2; ++h) {
      __m256i codes[8];
      for (int p = 0; p < 4; ++p) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + p * 64 + h * 32));
        codes[2 * p] = _mm256_and_si256(v, low);
        codes[2 * p + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      }
      const __m256 s = bf16x8_to_f32(sz + g * 32 + h * 8);
      const __m256 mn = _mm256_sub_ps(bf16x8_to_f32(sz + g * 32 + 16 + h * 8), _mm256_mul_ps(eight, s));
      for (int64_t r = 0; r < m; ++r) {
        const int64_t rg = r * groups + g;
        const __m256 dot1 = _mm256_cvtepi32_ps(dot_group_avx2(codes, a.q1.data() + r * k + g * 32));
        const __m256 dot2 = _mm256_cvtepi32_ps(dot_group_avx2(codes, a.q2.data() + r * k + g * 32));
        const __m256 dot = _mm256_fmadd_ps(dot1, _mm256_set1_ps(a.d1[rg]),
                                           _mm256_mul_ps(dot2, _mm256_set1_ps(a.d2[rg])));
        float* out = acc + r * 16 + h * 8;
        __m256 y = _mm256_loadu_ps(out);
        y = _mm256_fmadd_ps(dot, s, y);
        y = _mm256_fmadd_ps(mn, _mm256_set1_ps(a.sum[rg]), y);
        _mm256_storeu_ps(out, y);
      }
    }
  }
}

// int8 weights (Int8Linear's layout); wsum is not needed here (the VNNI tiles use it)
void int8_tile(const int8_t* w, const int32_t*, const float* scale, int64_t groups, const Activations& a,
               int64_t m, int64_t k, float* acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t r = 0; r < m * 16; ++r) acc[r] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    for (int h = 0; h < 2; ++h) {
      __m256i codes[8], mags[8];
      for (int j = 0; j < 8; ++j) {
        codes[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (g * 8 + j) * 64 + h * 32));
        mags[j] = _mm256_abs_epi8(codes[j]);
      }
      for (int64_t r = 0; r < m; ++r) {
        const int64_t rg = r * groups + g;
        __m256i dots[2];
        for (int term = 0; term < 2; ++term) {
          const int8_t* xq = (term ? a.q2.data() : a.q1.data()) + r * k + g * 32;
          __m256i dot = _mm256_setzero_si256();
          for (int j = 0; j < 8; ++j) {
            const __m256i signed_x = _mm256_sign_epi8(_mm256_set1_epi32(four_bytes(xq + 4 * j)), codes[j]);
            dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(mags[j], signed_x), ones));
          }
          dots[term] = dot;
        }
        const __m256 dot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[0]), _mm256_set1_ps(a.d1[rg]),
                                           _mm256_mul_ps(_mm256_cvtepi32_ps(dots[1]), _mm256_set1_ps(a.d2[rg])));
        float* out = acc + r * 16 + h * 8;
        _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), dot));
      }
    }
  }
  for (int h = 0; h < 2; ++h) {
    const __m256 s = _mm256_loadu_ps(scale + h * 8);
    for (int64_t r = 0; r < m; ++r)
      _mm256_storeu_ps(acc + r * 16 + h * 8, _mm256_mul_ps(_mm256_loadu_ps(acc + r * 16 + h * 8), s));
  }
}

}  // namespace
