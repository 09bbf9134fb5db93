// The kernels' registration as torch.ops.kvflow.* (the ops are defined in cpu.cpp and weights.cpp, declared
// in ops.h). This is the one file that includes torch/library.h.
#include <torch/library.h>

#include "ops.h"

using namespace kvflow_ops;

TORCH_LIBRARY(kvflow, m) {
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()", &rms_norm);
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()", &fused_add_rms_norm);
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()", &rotary_);
  m.def("write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()", &write_kv);
  m.def("write_kv_int8(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) k_scale, "
        "Tensor(d!) v_scale, Tensor slot_mapping) -> ()", &write_kv_int8);
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, Tensor? k_scale=None, Tensor? v_scale=None) -> ()", &paged_decode_attention);
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()", &silu_and_mul);
  m.def("weight_tiles() -> str", &weight_tiles);
  m.def("int4_dequantize(Tensor(a!) out, Tensor packed, Tensor scale_zero, int tile0) -> ()", &int4_dequantize);
#ifdef KVFLOW_WEIGHT_TILES
  m.def("int4_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor scale_zero) -> ()", &int4_linear);
  m.def("int8_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor wsum, Tensor scale) -> ()", &int8_linear);
#endif
}
