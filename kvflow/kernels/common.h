// What kvflow's kernel files share (cpu.cpp, weights.cpp): element conversions, reductions, the dtype
// dispatch and argument checks. Everything is in an anonymous namespace: each file has its own copy.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

// ---- element conversions (plain loops: the compiler vectorises them) -------------------------------

inline float to_f(float v) { return v; }
inline float to_f(c10::BFloat16 v) {
  uint32_t u = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename T> inline T from_f(float f);
template <> inline float from_f<float>(float f) { return f; }
template <> inline c10::BFloat16 from_f<c10::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  c10::BFloat16 r;
  if (std::isnan(f)) {
    r.x = 0x7fc0;
  } else {
    u += 0x7fff + ((u >> 16) & 1);   // round to nearest even, as c10::BFloat16 does
    r.x = uint16_t(u >> 16);
  }
  return r;
}
template <typename T> inline float round_to(float f) { return to_f(from_f<T>(f)); }

template <typename T> inline void load(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_f(src[i]);
}
template <typename T> inline void store(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_f<T>(src[i]);
}

// Reductions: `omp simd reduction` lets the compiler split a sum over vector lanes (it may not reorder a
// plain float loop). The order then differs from PyTorch's, in the last bits.
inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// exp(x) for fp32 in straight-line code that vectorises (std::exp is a libm call per value): Cephes'
// expf, a degree-7 polynomial after reducing by ln 2, within ~2 ulp of fp32 on [-87, 88] (clamped there).
inline float exp_approx(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float t = x * 1.44269504088896341f;
  const int32_t n = int32_t(t + (t >= 0.f ? 0.5f : -0.5f));
  const float nf = float(n);
  const float r = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const uint32_t bits = uint32_t(n + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return p * two_n;
}

// x = exp(x - max) in place; *mx_out = the max, *sum_out = the sum of the exps
inline void exp_scores(float* x, int64_t n, float* mx_out, float* sum_out) {
  float mx = x[0];
#pragma omp simd reduction(max : mx)
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, x[i]);
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) total += (x[i] = exp_approx(x[i] - mx));
  *mx_out = mx;
  *sum_out = total;
}

#define KVFLOW_DISPATCH(dtype, NAME, ...)                                        \
  [&] {                                                                          \
    if ((dtype) == at::kBFloat16) {                                              \
      using scalar_t = c10::BFloat16;                                            \
      return __VA_ARGS__();                                                      \
    } else if ((dtype) == at::kFloat) {                                          \
      using scalar_t = float;                                                    \
      return __VA_ARGS__();                                                      \
    }                                                                            \
    TORCH_CHECK(false, NAME, ": dtype must be bfloat16 or float32, got ", dtype); \
  }()

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}
void check_rows(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

}  // namespace
