// CPU kernels for the steps between the matmuls of a decoder layer, registered as torch.ops.kvflow.*.
//
// At decode sizes (one to a few rows of 576 values) a PyTorch op costs ~1 us of dispatch whatever it
// computes, and RMSNorm, rotary, the KV write and attention take 5-15 ops each: ~80 us a layer on top of
// the matmuls. Each kernel here is one op. Built and loaded by kvflow/kernels/__init__.py; the PyTorch
// code beside each call site is the reference they are tested against (tests/test_cpu_kernels.py). The
// weight matmuls are in weights.cpp; what both files share in common.h; the ops' signatures in ops.h and
// their registration in register.cpp.
//
// Numerics follow the PyTorch path: math in fp32; a bf16 result is rounded where PyTorch rounds it
// (RMSNorm: the normalised value, then the product with the weight; SiLU-and-mul: silu, then the product).
// Rows must be contiguous in their last dimension; other strides are free (q and k are views of qkv).
#include "common.h"
#include "ops.h"

namespace kvflow_ops {

// ---- RMSNorm ---------------------------------------------------------------------------------------

// one row: y = round(round(x * rsqrt(mean(x^2) + eps)) * w)
template <typename T>
inline void rms_row(const float* x, const T* w, T* out, int64_t d, float eps, float* tmp) {
  const float ss = dot(x, x, d);
  const float inv = 1.f / std::sqrt(ss / float(d) + eps);
  for (int64_t i = 0; i < d; ++i) tmp[i] = round_to<T>(x[i] * inv) * to_f(w[i]);
  store(tmp, out, d);
}

// x and its partner (out, or the residual): [T, D] rows, contiguous in D; weight [D]; one dtype
void check_norm(const char* name, const at::Tensor& x, const at::Tensor& other, const at::Tensor& weight) {
  check_rows(x, "x");
  check_rows(other, name);
  TORCH_CHECK(x.dim() == 2 && other.sizes() == x.sizes(), name, ": x and its partner must be [T, D] alike");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), name, ": weight must be [D]");
  TORCH_CHECK(other.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
              name, ": the tensors and the weight must share one dtype");
}

// out = rms_norm(x) * weight. x, out: [T, D]
void rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm("rms_norm", x, out, weight);
  const int64_t rows = x.size(0), d = x.size(1);
  KVFLOW_DISPATCH(x.scalar_type(), "rms_norm", [&] {
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> xf(d), tmp(d);
      for (int64_t r = begin; r < end; ++r) {
        load(x.data_ptr<scalar_t>() + r * x.stride(0), xf.data(), d);
        rms_row(xf.data(), weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>() + r * out.stride(0), d,
                float(eps), tmp.data());
      }
    });
  });
}

// residual = x + residual (rounded to the dtype, as PyTorch's add); x = rms_norm(residual) * weight.
// Both are overwritten, as in vLLM's fused_add_rms_norm.
void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_norm("fused_add_rms_norm", x, residual, weight);
  const int64_t rows = x.size(0), d = x.size(1);
  KVFLOW_DISPATCH(x.scalar_type(), "fused_add_rms_norm", [&] {
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> sum(d), tmp(d);
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* xr = x.data_ptr<scalar_t>() + r * x.stride(0);
        scalar_t* rr = residual.data_ptr<scalar_t>() + r * residual.stride(0);
        for (int64_t i = 0; i < d; ++i) sum[i] = round_to<scalar_t>(to_f(xr[i]) + to_f(rr[i]));
        store(sum.data(), rr, d);
        rms_row(sum.data(), weight.data_ptr<scalar_t>(), xr, d, float(eps), tmp.data());
      }
    });
  });
}

// ---- rotary embedding --------------------------------------------------------------------------------

// x: [T, H, D], rotated in place: x = x * cos + roll(x, D/2) * sin, in fp32, rounded once.
// cos, sin: fp32, T rows of D (RotaryEmbedding's tables: cos repeated, sin negated in the first half).
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(x, "x");
  TORCH_CHECK(x.dim() == 3, "rotary_: x must be [T, H, D]");
  const int64_t t = x.size(0), h = x.size(1), d = x.size(2), half = d / 2;
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == t * d && sin.numel() == t * d,
              "rotary_: cos and sin must be contiguous float32 with T * D values");
  KVFLOW_DISPATCH(x.scalar_type(), "rotary_", [&] {
    at::parallel_for(0, t, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> xf(d), y(d);
      for (int64_t i = begin; i < end; ++i) {
        const float* c = cos.data_ptr<float>() + i * d;
        const float* s = sin.data_ptr<float>() + i * d;
        for (int64_t j = 0; j < h; ++j) {
          scalar_t* row = x.data_ptr<scalar_t>() + i * x.stride(0) + j * x.stride(1);
          load(row, xf.data(), d);
          for (int64_t k = 0; k < half; ++k) y[k] = xf[k] * c[k] + xf[k + half] * s[k];
          for (int64_t k = half; k < d; ++k) y[k] = xf[k] * c[k] + xf[k - half] * s[k];
          store(y.data(), row, d);
        }
      }
    });
  });
}

// ---- paged KV cache ------------------------------------------------------------------------------------

// k, v: [T, Hkv, D] rows (views of qkv); caches [N, block_size, Hkv, D] contiguous; slot_mapping int64 [T]
void check_kv_write(const char* name, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  check_rows(k, "k");
  check_rows(v, "v");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), name, ": caches must be contiguous");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k_cache.dim() == 4 && k_cache.size(2) == k.size(1) &&
                  k_cache.size(3) == k.size(2) && v_cache.sizes() == k_cache.sizes(),
              name, ": k, v [T, Hkv, D] and caches [N, block_size, Hkv, D] must match");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == k.size(0), name, ": slot_mapping must be int64 [T]");
}

// k_cache[slot] = k[t], v_cache[slot] = v[t] for slot = slot_mapping[t].
// k, v: [T, Hkv, D]; caches: [num_blocks, block_size, Hkv, D] contiguous; slot_mapping: int64 [T].
void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  check_kv_write("write_kv", k, v, k_cache, v_cache, slot_mapping);
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(), "write_kv: one dtype for k, v and the caches");
  const int64_t t = k.size(0), h = k.size(1), d = k.size(2);
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const size_t row_bytes = d * k.element_size();
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  for (int64_t i = 0; i < t; ++i) {
    TORCH_CHECK(slots[i] >= 0 && slots[i] < num_slots, "write_kv: slot ", slots[i], " out of range");
    for (int64_t j = 0; j < h; ++j) {
      const size_t dst = size_t((slots[i] * h + j) * d) * k.element_size();
      std::memcpy(kc + dst, static_cast<const char*>(k.data_ptr()) + (i * k.stride(0) + j * k.stride(1)) * k.element_size(), row_bytes);
      std::memcpy(vc + dst, static_cast<const char*>(v.data_ptr()) + (i * v.stride(0) + j * v.stride(1)) * v.element_size(), row_bytes);
    }
  }
}

// int8 cache: each new (token, head) row is quantized symmetrically, scale = max(absmax / 127, 1e-10)
// rounded to the scales' dtype, codes = round_half_even(x / scale) clamped to +-127 (attention/cpu.py's
// quantize_int8, bit for bit). k_scale, v_scale: [num_blocks, block_size, Hkv] in k's dtype.
template <typename T>
void quantize_row_int8(const T* x, int64_t d, int8_t* q, T* scale) {
  float amax = 0.f;
  for (int64_t i = 0; i < d; ++i) amax = std::max(amax, std::fabs(to_f(x[i])));
  const T s = from_f<T>(std::max(amax / 127.f, 1e-10f));
  const float sf = to_f(s);
  for (int64_t i = 0; i < d; ++i) q[i] = int8_t(std::min(127.f, std::max(-127.f, std::nearbyint(to_f(x[i]) / sf))));
  *scale = s;
}

void write_kv_int8(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                   at::Tensor& k_scale, at::Tensor& v_scale, const at::Tensor& slot_mapping) {
  check_kv_write("write_kv_int8", k, v, k_cache, v_cache, slot_mapping);
  TORCH_CHECK(k_scale.is_contiguous() && v_scale.is_contiguous() && k_scale.numel() == k_cache.numel() / k.size(2) &&
                  v_scale.sizes() == k_scale.sizes(), "write_kv_int8: scales must be contiguous [N, block_size, Hkv]");
  TORCH_CHECK(k_cache.scalar_type() == at::kChar && v_cache.scalar_type() == at::kChar, "write_kv_int8: int8 caches");
  TORCH_CHECK(v.scalar_type() == k.scalar_type() && k_scale.scalar_type() == k.scalar_type() &&
                  v_scale.scalar_type() == k.scalar_type(), "write_kv_int8: k, v and the scales share one dtype");
  const int64_t t = k.size(0), h = k.size(1), d = k.size(2);
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  KVFLOW_DISPATCH(k.scalar_type(), "write_kv_int8", [&] {
    for (int64_t i = 0; i < t; ++i) {
      TORCH_CHECK(slots[i] >= 0 && slots[i] < num_slots, "write_kv_int8: slot ", slots[i], " out of range");
      for (int64_t j = 0; j < h; ++j) {
        const int64_t row = slots[i] * h + j;
        quantize_row_int8(k.data_ptr<scalar_t>() + i * k.stride(0) + j * k.stride(1), d,
                          k_cache.data_ptr<int8_t>() + row * d, k_scale.data_ptr<scalar_t>() + row);
        quantize_row_int8(v.data_ptr<scalar_t>() + i * v.stride(0) + j * v.stride(1), d,
                          v_cache.data_ptr<int8_t>() + row * d, v_scale.data_ptr<scalar_t>() + row);
      }
    }
  });
}

// ---- decode attention over the paged cache --------------------------------------------------------------

template <typename T, typename C>   // C: the cache's element type, T or int8_t
struct DecodeTask {
  const T* q;
  T* out;
  const C* k_cache;
  const C* v_cache;
  const T* k_scale;   // int8 cache: one scale per (slot, KV head); unused otherwise
  const T* v_scale;
  int64_t q_stride0, q_stride1, out_stride0, out_stride1, block_size, num_kv_heads, group, head_dim;
  float scale;
};

template <typename C>
inline void prefetch_row(const C* cache, int64_t r, int64_t d) {
  const char* p = reinterpret_cast<const char*>(cache + r * d);
  for (int64_t b = 0; b < d * int64_t(sizeof(C)); b += 64) __builtin_prefetch(p + b);
}

// row `r` (= slot * Hkv + head) of a cache as floats; an int8 cache's codes times their scale, rounded to
// T as the PyTorch path's dequantization does
template <typename T>
inline void load_row(const T* cache, const T*, int64_t r, int64_t d, float* out) { load(cache + r * d, out, d); }
template <typename T>
inline void load_row(const int8_t* cache, const T* scales, int64_t r, int64_t d, float* out) {
  const float s = to_f(scales[r]);
  const int8_t* c = cache + r * d;
  for (int64_t i = 0; i < d; ++i) out[i] = round_to<T>(float(c[i]) * s);
}

// Context positions [t0, t1) of one (sequence, KV head): its `group` query heads read each K and V row
// once. Leaves, per query head j, the chunk's max score m[j], its sum of exp(score - m) l[j], and the
// unnormalised sum of exp(score - m) V in acc_out[j * D ...] (merged across chunks by run_decode_tasks).
// HEAD_DIM is the head size known at compile time (64, 128: the loops unroll, about 2x faster) or 0.
template <typename T, typename C, int HEAD_DIM>
void attend_chunk(const DecodeTask<T, C>& p, int64_t seq, int64_t kvh, const int64_t* table, int64_t t0,
                  int64_t t1, bool prefetch, std::vector<float>& buf, std::vector<int64_t>& rows, float* m,
                  float* l, float* acc_out) {
  const int64_t d = HEAD_DIM ? HEAD_DIM : p.head_dim, g = p.group, bs = p.block_size, n = t1 - t0;
  buf.resize(g * d * 2 + d + g * n);
  float* __restrict qf = buf.data();
  float* __restrict acc = qf + g * d;
  float* __restrict row = acc + g * d;
  float* __restrict scores = row + d;
  for (int64_t j = 0; j < g; ++j) {
    load(p.q + seq * p.q_stride0 + (kvh * g + j) * p.q_stride1, qf + j * d, d);
    for (int64_t i = 0; i < d; ++i) qf[j * d + i] *= p.scale;
  }
  // each position's cache row (slot * Hkv + kvh), stepping through the blocks: no division per position
  rows.resize(n);
  for (int64_t t = 0, blk = t0 / bs, off = t0 % bs; t < n; ++t) {
    rows[t] = (table[blk] * bs + off) * p.num_kv_heads + kvh;
    if (++off == bs) off = 0, ++blk;
  }
  // long contexts (past L2) prefetch rows ahead: the blocks are scattered, the hardware prefetcher loses them
  constexpr int64_t AHEAD = 8;
  const int64_t ahead_end = prefetch ? n - AHEAD : 0;
  for (int64_t t = 0; t < n; ++t) {
    if (t < ahead_end) prefetch_row(p.k_cache, rows[t + AHEAD], d);
    load_row<T>(p.k_cache, p.k_scale, rows[t], d, row);
    for (int64_t j = 0; j < g; ++j) scores[j * n + t] = dot(qf + j * d, row, d);
  }
  for (int64_t j = 0; j < g; ++j) exp_scores(scores + j * n, n, m + j, l + j);
  std::fill(acc, acc + g * d, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    if (t < ahead_end) prefetch_row(p.v_cache, rows[t + AHEAD], d);
    load_row<T>(p.v_cache, p.v_scale, rows[t], d, row);
    for (int64_t j = 0; j < g; ++j) {
      const float w = scores[j * n + t];
      for (int64_t i = 0; i < d; ++i) acc[j * d + i] += w * row[i];
    }
  }
  std::copy(acc, acc + g * d, acc_out);
}

// Tasks are (sequence, KV head, chunk of DECODE_CHUNK positions), so that one long context also spreads
// over the threads (split-K, as in flash-decoding). Each chunk's partial softmax is then merged per
// (sequence, KV head), rescaled to the largest max.
constexpr int64_t DECODE_CHUNK = 256;

template <typename T, typename C>
void run_decode_tasks(const DecodeTask<T, C>& p, const int64_t* tables, int64_t max_blocks, const int64_t* lens,
                      int64_t batch, bool parallel) {
  const int64_t hkv = p.num_kv_heads, d = p.head_dim, g = p.group, pairs = batch * hkv;
  std::vector<int64_t> first(pairs + 1, 0);     // the task of each (sequence, KV head)'s first chunk
  for (int64_t i = 0; i < pairs; ++i) first[i + 1] = first[i] + (lens[i / hkv] + DECODE_CHUNK - 1) / DECODE_CHUNK;
  const int64_t tasks = first.back();
  std::vector<float> m(tasks * g), l(tasks * g), acc(tasks * g * d);
  at::parallel_for(0, tasks, parallel ? 1 : tasks, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    std::vector<int64_t> rows;
    int64_t pair = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    for (int64_t task = begin; task < end; ++task) {
      while (first[pair + 1] <= task) ++pair;
      const int64_t s = pair / hkv, kvh = pair % hkv, t0 = (task - first[pair]) * DECODE_CHUNK;
      const int64_t t1 = std::min(lens[s], t0 + DECODE_CHUNK);
      float* mt = m.data() + task * g;
      float* lt = l.data() + task * g;
      float* at = acc.data() + task * g * d;
      const int64_t* table = tables + s * max_blocks;
      const bool pf = lens[s] >= 1024;
      if (d == 64) attend_chunk<T, C, 64>(p, s, kvh, table, t0, t1, pf, buf, rows, mt, lt, at);
      else if (d == 128) attend_chunk<T, C, 128>(p, s, kvh, table, t0, t1, pf, buf, rows, mt, lt, at);
      else attend_chunk<T, C, 0>(p, s, kvh, table, t0, t1, pf, buf, rows, mt, lt, at);
    }
  });
  std::vector<float> o(d);
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const int64_t s = pair / hkv, kvh = pair % hkv;
    for (int64_t j = 0; j < g; ++j) {
      float mx = -INFINITY;
      for (int64_t c = first[pair]; c < first[pair + 1]; ++c) mx = std::max(mx, m[c * g + j]);
      float total = 0.f;
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t c = first[pair]; c < first[pair + 1]; ++c) {
        const float w = std::exp(m[c * g + j] - mx);
        total += w * l[c * g + j];
        const float* a = acc.data() + (c * g + j) * d;
        for (int64_t i = 0; i < d; ++i) o[i] += w * a[i];
      }
      const float inv = 1.f / total;
      for (int64_t i = 0; i < d; ++i) o[i] *= inv;
      store(o.data(), p.out + s * p.out_stride0 + (kvh * g + j) * p.out_stride1, d);
    }
  }
}

// One new token per sequence. q: [B, Hq, D]; out: [B, Hq, D]; caches [N, block_size, Hkv, D], in q's dtype
// or int8 with k_scale / v_scale [N, block_size, Hkv] in q's dtype; block_tables: int64 [B, max_blocks];
// context_lens: int64 [B] (the new token included, its K/V written).
void paged_decode_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, double scale, const std::optional<at::Tensor>& k_scale,
                            const std::optional<at::Tensor>& v_scale) {
  check_rows(q, "q");
  check_rows(out, "out");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode_attention: caches must be contiguous");
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "paged_decode_attention: q and out must be [B, Hq, D] alike");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(3) == q.size(2) &&
                  q.size(1) % k_cache.size(2) == 0, "paged_decode_attention: caches must be [N, block_size, Hkv, D]");
  const bool int8 = k_scale.has_value();
  TORCH_CHECK(int8 == v_scale.has_value(), "paged_decode_attention: give both scales or neither");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type() &&
                  k_cache.scalar_type() == (int8 ? at::kChar : q.scalar_type()),
              "paged_decode_attention: caches in q's dtype, or int8 with scales");
  if (int8)
    TORCH_CHECK(k_scale->is_contiguous() && v_scale->is_contiguous() && k_scale->scalar_type() == q.scalar_type() &&
                    v_scale->scalar_type() == q.scalar_type() && k_scale->numel() == k_cache.numel() / q.size(2) &&
                    v_scale->numel() == k_scale->numel(),
                "paged_decode_attention: scales must be [N, block_size, Hkv] in q's dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.is_contiguous() &&
                  block_tables.size(0) == q.size(0), "paged_decode_attention: block_tables must be int64 [B, max_blocks]");
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.numel() == q.size(0) && context_lens.is_contiguous(),
              "paged_decode_attention: context_lens must be int64 [B]");
  const int64_t b = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t bs = k_cache.size(1), hkv = k_cache.size(2), g = hq / hkv;
  const int64_t max_blocks = block_tables.size(1), num_blocks = k_cache.size(0);
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  int64_t work = 0;
  for (int64_t i = 0; i < b; ++i) {
    TORCH_CHECK(lens[i] >= 1 && lens[i] <= max_blocks * bs, "paged_decode_attention: context length ", lens[i],
                " does not fit the block table");
    for (int64_t blk = 0; blk < (lens[i] + bs - 1) / bs; ++blk)
      TORCH_CHECK(tables[i * max_blocks + blk] >= 0 && tables[i * max_blocks + blk] < num_blocks,
                  "paged_decode_attention: block id out of range");
    work += lens[i];
  }
  const bool parallel = work * hq * d >= (1 << 17);   // small steps stay on one thread (a fork costs more)
  KVFLOW_DISPATCH(q.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    if (int8) {
      const DecodeTask<scalar_t, int8_t> base{qp, op, k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(),
                                              k_scale->data_ptr<scalar_t>(), v_scale->data_ptr<scalar_t>(),
                                              q.stride(0), q.stride(1), out.stride(0), out.stride(1), bs, hkv, g, d,
                                              float(scale)};
      run_decode_tasks(base, tables, max_blocks, lens, b, parallel);
    } else {
      const DecodeTask<scalar_t, scalar_t> base{qp, op, k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                                                nullptr, nullptr, q.stride(0), q.stride(1), out.stride(0),
                                                out.stride(1), bs, hkv, g, d, float(scale)};
      run_decode_tasks(base, tables, max_blocks, lens, b, parallel);
    }
  });
}

// ---- SiLU-and-mul ---------------------------------------------------------------------------------------

// x: [T, 2I] (gate | up); out: [T, I] = round(round(silu(gate)) * up)
void silu_and_mul(at::Tensor& out, const at::Tensor& x) {
  check_rows(x, "x");
  check_rows(out, "out");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.size(0) == out.size(0) && x.size(1) == 2 * out.size(1),
              "silu_and_mul: x must be [T, 2I] and out [T, I]");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "silu_and_mul: x and out must share one dtype");
  const int64_t rows = x.size(0), n = out.size(1);
  KVFLOW_DISPATCH(x.scalar_type(), "silu_and_mul", [&] {
    at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
      std::vector<float> gf(n), uf(n);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = x.data_ptr<scalar_t>() + r * x.stride(0);
        load(xr, gf.data(), n);
        load(xr + n, uf.data(), n);
        for (int64_t i = 0; i < n; ++i) gf[i] = round_to<scalar_t>(gf[i] / (1.f + exp_approx(-gf[i]))) * uf[i];
        store(gf.data(), out.data_ptr<scalar_t>() + r * out.stride(0), n);
      }
    });
  });
}

}  // namespace kvflow_ops
