// The ops kvflow's kernel files define (cpu.cpp, weights.cpp) and register.cpp registers as
// torch.ops.kvflow.*. Only register.cpp includes torch/library.h: parsing it is a third of a file's
// compile time, and each file parses its headers anew.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

// which variant of the weight tiles this build has (weights.cpp includes it; without one, int4_linear and
// int8_linear are neither defined nor registered)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define KVFLOW_WEIGHT_TILES "avx512_vnni"
#define KVFLOW_TILES_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define KVFLOW_WEIGHT_TILES "avx2"
#define KVFLOW_TILES_AVX2 1
#endif

namespace kvflow_ops {

// cpu.cpp
void rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps);
void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps);
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping);
void write_kv_int8(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                   at::Tensor& k_scale, at::Tensor& v_scale, const at::Tensor& slot_mapping);
void paged_decode_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, double scale, const std::optional<at::Tensor>& k_scale,
                            const std::optional<at::Tensor>& v_scale);
void silu_and_mul(at::Tensor& out, const at::Tensor& x);

// weights.cpp
std::string weight_tiles();
void int4_dequantize(at::Tensor& out, const at::Tensor& packed, const at::Tensor& scale_zero, int64_t tile0);
#ifdef KVFLOW_WEIGHT_TILES
void int4_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_zero);
void int8_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& wsum,
                 const at::Tensor& scale);
#endif

}  // namespace kvflow_ops
