// Rotary embedding entry points: argument validation and dtype dispatch onto the templates of
// thinkfuse/rope.cuh. rope is instantiated per q/k dtype; apply_rotary per (input, cos/sin,
// output) dtype triple, since its outputs follow torch's type promotion.
#include "thinkfuse/common.cuh"
#include "thinkfuse/ops.h"
#include "thinkfuse/rope.cuh"

namespace thinkfuse {
namespace {

bool valid_shape(const RotaryShape& shape, const HeadsView& q, const HeadsView& k) {
  return shape.batch >= 0 && shape.seq >= 0 && shape.head_dim >= 0 && shape.head_dim % 2 == 0 &&
         shape.head_dim <= kRotaryMaxHeadDim && q.heads >= 0 && k.heads >= 0 &&
         q.heads + k.heads <= kRotaryMaxHeads;
}

template <typename InT, typename OutT>
rotary::QKParams<InT, OutT> qk_params(const RotaryShape& shape, const HeadsView& q,
                                      const HeadsView& k, void* q_out, void* k_out) {
  rotary::QKParams<InT, OutT> p;
  p.q = static_cast<const InT*>(q.data);
  p.k = static_cast<const InT*>(k.data);
  p.q_stride_b = q.stride_b;
  p.q_stride_s = q.stride_s;
  p.q_stride_h = q.stride_h;
  p.k_stride_b = k.stride_b;
  p.k_stride_s = k.stride_s;
  p.k_stride_h = k.stride_h;
  p.q_out = static_cast<OutT*>(q_out);
  p.k_out = static_cast<OutT*>(k_out);
  p.seq_len = shape.seq;
  p.tokens = shape.batch * shape.seq;
  p.q_heads = static_cast<int>(q.heads);
  p.k_heads = static_cast<int>(k.heads);
  p.half = static_cast<int>(shape.head_dim / 2);
  return p;
}

cudaError_t rope(const RotaryShape& shape, const HeadsView& q, const HeadsView& k,
                 const PositionsView& positions, const float* inv_freq, float attention_scaling,
                 float llama4_beta, int64_t llama4_original_max, void* q_out, void* k_out,
                 DType dtype, bool inverse, cudaStream_t stream) {
  if (!valid_shape(shape, q, k) || (llama4_beta != 0.0f && llama4_original_max <= 0)) {
    return cudaErrorInvalidValue;
  }
  rotary::RopeAngles a;
  a.positions = positions.data;
  a.positions_int64 = positions.is_int64;
  a.pos_stride_b = positions.stride_b;
  a.pos_stride_s = positions.stride_s;
  a.inv_freq = inv_freq;
  a.attention_scaling = attention_scaling;
  a.sin_sign = inverse ? -1.0f : 1.0f;
  a.llama4_beta = llama4_beta;
  // torch divides by the int L0 converted to float32 (round to nearest), as does this.
  a.llama4_original_max = static_cast<float>(llama4_original_max);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return rotary::rope(qk_params<T, T>(shape, q, k, q_out, k_out), a, stream);
  });
}

cudaError_t apply_rotary(const RotaryShape& shape, const HeadsView& q, const HeadsView& k,
                         const CosSinView& cos_sin, void* q_out, void* k_out, DType in_dtype,
                         DType cos_dtype, DType out_dtype, bool inverse, cudaStream_t stream) {
  if (!valid_shape(shape, q, k)) return cudaErrorInvalidValue;
  return dispatch_dtype(in_dtype, [&](auto in_tag) {
    return dispatch_dtype(cos_dtype, [&](auto cos_tag) {
      return dispatch_dtype(out_dtype, [&](auto out_tag) {
        using InT = typename decltype(in_tag)::type;
        using CosT = typename decltype(cos_tag)::type;
        using OutT = typename decltype(out_tag)::type;
        rotary::CosSinParams<CosT> cs;
        cs.cos = static_cast<const CosT*>(cos_sin.cos);
        cs.sin = static_cast<const CosT*>(cos_sin.sin);
        cs.cos_stride_b = cos_sin.cos_stride_b;
        cs.cos_stride_s = cos_sin.cos_stride_s;
        cs.sin_stride_b = cos_sin.sin_stride_b;
        cs.sin_stride_s = cos_sin.sin_stride_s;
        cs.inverse = inverse;
        return rotary::apply_rotary(qk_params<InT, OutT>(shape, q, k, q_out, k_out), cs, stream);
      });
    });
  });
}

}  // namespace

cudaError_t rope_forward(const RotaryShape& shape, const HeadsView& q, const HeadsView& k,
                         const PositionsView& positions, const float* inv_freq,
                         float attention_scaling, float llama4_beta, int64_t llama4_original_max,
                         void* q_out, void* k_out, DType dtype, cudaStream_t stream) {
  return rope(shape, q, k, positions, inv_freq, attention_scaling, llama4_beta,
              llama4_original_max, q_out, k_out, dtype, /*inverse=*/false, stream);
}

cudaError_t rope_backward(const RotaryShape& shape, const HeadsView& dq_out,
                          const HeadsView& dk_out, const PositionsView& positions,
                          const float* inv_freq, float attention_scaling, float llama4_beta,
                          int64_t llama4_original_max, void* dq, void* dk, DType dtype,
                          cudaStream_t stream) {
  return rope(shape, dq_out, dk_out, positions, inv_freq, attention_scaling, llama4_beta,
              llama4_original_max, dq, dk, dtype, /*inverse=*/true, stream);
}

cudaError_t apply_rotary_forward(const RotaryShape& shape, const HeadsView& q, const HeadsView& k,
                                 const CosSinView& cos_sin, void* q_out, void* k_out,
                                 DType in_dtype, DType cos_dtype, DType out_dtype,
                                 cudaStream_t stream) {
  return apply_rotary(shape, q, k, cos_sin, q_out, k_out, in_dtype, cos_dtype, out_dtype,
                      /*inverse=*/false, stream);
}

cudaError_t apply_rotary_backward(const RotaryShape& shape, const HeadsView& dq_out,
                                  const HeadsView& dk_out, const CosSinView& cos_sin, void* dq,
                                  void* dk, DType in_dtype, DType cos_dtype, DType out_dtype,
                                  cudaStream_t stream) {
  return apply_rotary(shape, dq_out, dk_out, cos_sin, dq, dk, in_dtype, cos_dtype, out_dtype,
                      /*inverse=*/true, stream);
}

}  // namespace thinkfuse
