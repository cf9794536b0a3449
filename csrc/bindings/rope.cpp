// Torch bindings of the rotary embedding kernels (thinkfuse/ops.h): rope_{fwd,bwd} with cos/sin
// computed in the kernel, and apply_rotary_{fwd,bwd} with given cos/sin tensors.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "common.h"
#include "thinkfuse/ops.h"

namespace {

using namespace thinkfuse::bindings;

// q [B, S, Hq, D] and k [B, S, Hkv, D] (or their output gradients, named q_name / k_name): same
// device and dtype, unit stride on D, D even and non-zero. Returns the shared sizes.
thinkfuse::RotaryShape check_qk(const at::Tensor& q, const at::Tensor& k, const char* q_name,
                                const char* k_name) {
  TORCH_CHECK_VALUE(q.dim() == 4, q_name, " must be 4-D [batch, seq, heads, head_dim], got shape ",
                    q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, k_name, " must be 4-D [batch, seq, heads, head_dim], got shape ",
                    k.sizes());
  check_device(q, q_name, q.device());
  check_device(k, k_name, q.device());
  kernel_dtype(q, q_name);
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), k_name, " must have ", q_name, "'s dtype ",
                   q.scalar_type(), ", got ", k.scalar_type());
  const int64_t batch = q.size(0);
  const int64_t seq = q.size(1);
  const int64_t head_dim = q.size(3);
  TORCH_CHECK_VALUE(k.size(0) == batch && k.size(1) == seq && k.size(3) == head_dim, k_name,
                    " must have shape [", batch, ", ", seq, ", heads, ", head_dim, "] like ", q_name,
                    " ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK_VALUE(head_dim > 0 && head_dim % 2 == 0, q_name,
                    "'s head_dim must be even and non-zero (half-split rotation), got ", head_dim);
  TORCH_CHECK_VALUE(head_dim <= thinkfuse::kRotaryMaxHeadDim, "head_dim above ",
                    thinkfuse::kRotaryMaxHeadDim, " is not supported, got ", head_dim);
  TORCH_CHECK_VALUE(q.size(2) + k.size(2) <= thinkfuse::kRotaryMaxHeads, "more than ",
                    thinkfuse::kRotaryMaxHeads, " q + k heads are not supported, got ", q.size(2),
                    " + ", k.size(2));
  TORCH_CHECK_VALUE(q.stride(3) == 1, q_name,
                    " must have unit stride along head_dim, got strides ", q.strides());
  TORCH_CHECK_VALUE(k.stride(3) == 1, k_name,
                    " must have unit stride along head_dim, got strides ", k.strides());
  return {batch, seq, head_dim};
}

// Python floats arrive as double; the kernels take float32 as the Triton kernels do.
float finite_float(double value, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(value), name, " must be finite, got ", value);
  return static_cast<float>(value);
}

std::tuple<at::Tensor, at::Tensor> rope_impl(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& position_ids,
                                             const at::Tensor& inv_freq, double attention_scaling,
                                             double llama4_beta, int64_t llama4_original_max,
                                             bool backward) {
  const char* q_name = backward ? "dq_out" : "q";
  const char* k_name = backward ? "dk_out" : "k";
  const thinkfuse::RotaryShape shape = check_qk(q, k, q_name, k_name);
  const DType dtype = kernel_dtype(q, q_name);
  check_device(position_ids, "position_ids", q.device());
  const at::ScalarType pos_type = position_ids.scalar_type();
  TORCH_CHECK_TYPE(pos_type == at::kInt || pos_type == at::kLong,
                   "position_ids must be int32 or int64, got ", pos_type);
  TORCH_CHECK_VALUE(position_ids.dim() == 2 && position_ids.size(1) == shape.seq &&
                        (position_ids.size(0) == shape.batch || position_ids.size(0) == 1),
                    "position_ids must have shape [", shape.batch, ", ", shape.seq, "] or [1, ",
                    shape.seq, "], got ", position_ids.sizes());
  check_device(inv_freq, "inv_freq", q.device());
  TORCH_CHECK_TYPE(inv_freq.scalar_type() == at::kFloat, "inv_freq must be float32, got ",
                   inv_freq.scalar_type());
  check_vector(inv_freq, "inv_freq", shape.head_dim / 2);
  const float scaling = finite_float(attention_scaling, "attention_scaling");
  const float beta = finite_float(llama4_beta, "llama4_beta");
  TORCH_CHECK_VALUE(beta == 0.0f || llama4_original_max > 0,
                    "llama4_original_max must be > 0 when llama4_beta != 0, got ",
                    llama4_original_max);

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  const thinkfuse::PositionsView positions{position_ids.const_data_ptr(), pos_type == at::kLong,
                                           stride_or_zero(position_ids, 0), position_ids.stride(1)};
  const auto launch = backward ? &thinkfuse::rope_backward : &thinkfuse::rope_forward;
  check_launch(launch(shape, heads_view(q), heads_view(k), positions,
                      inv_freq.const_data_ptr<float>(), scaling, beta, llama4_original_max,
                      q_out.mutable_data_ptr(), k_out.mutable_data_ptr(), dtype,
                      c10::cuda::getCurrentCUDAStream().stream()),
               backward ? "rope_bwd" : "rope_fwd");
  return {q_out, k_out};
}

std::tuple<at::Tensor, at::Tensor> rope_fwd(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& position_ids,
                                            const at::Tensor& inv_freq, double attention_scaling,
                                            double llama4_beta, int64_t llama4_original_max) {
  return rope_impl(q, k, position_ids, inv_freq, attention_scaling, llama4_beta,
                   llama4_original_max, /*backward=*/false);
}

std::tuple<at::Tensor, at::Tensor> rope_bwd(const at::Tensor& dq_out, const at::Tensor& dk_out,
                                            const at::Tensor& position_ids,
                                            const at::Tensor& inv_freq, double attention_scaling,
                                            double llama4_beta, int64_t llama4_original_max) {
  return rope_impl(dq_out, dk_out, position_ids, inv_freq, attention_scaling, llama4_beta,
                   llama4_original_max, /*backward=*/true);
}

// cos/sin [B or 1, S, D] for q of `shape`: one dtype, q's device, unit stride on D.
thinkfuse::CosSinView check_cos_sin(const at::Tensor& cos, const at::Tensor& sin,
                                    const thinkfuse::RotaryShape& shape,
                                    const at::Device& device) {
  check_device(cos, "cos", device);
  check_device(sin, "sin", device);
  kernel_dtype(cos, "cos");
  TORCH_CHECK_TYPE(sin.scalar_type() == cos.scalar_type(), "sin must have cos's dtype ",
                   cos.scalar_type(), ", got ", sin.scalar_type());
  TORCH_CHECK_VALUE(cos.dim() == 3 && (cos.size(0) == shape.batch || cos.size(0) == 1) &&
                        cos.size(1) == shape.seq && cos.size(2) == shape.head_dim,
                    "cos must have shape [", shape.batch, ", ", shape.seq, ", ", shape.head_dim,
                    "] or [1, ", shape.seq, ", ", shape.head_dim, "], got ", cos.sizes());
  TORCH_CHECK_VALUE(sin.sizes() == cos.sizes(), "sin must have cos's shape ", cos.sizes(),
                    ", got ", sin.sizes());
  TORCH_CHECK_VALUE(cos.stride(2) == 1, "cos must have unit stride along its last dimension, "
                    "got strides ", cos.strides());
  TORCH_CHECK_VALUE(sin.stride(2) == 1, "sin must have unit stride along its last dimension, "
                    "got strides ", sin.strides());
  return {cos.const_data_ptr(),  sin.const_data_ptr(),  stride_or_zero(cos, 0),
          stride_or_zero(cos, 1), stride_or_zero(sin, 0), stride_or_zero(sin, 1)};
}

std::tuple<at::Tensor, at::Tensor> apply_rotary_impl(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& cos, const at::Tensor& sin,
                                                     at::ScalarType out_type, bool backward) {
  const char* q_name = backward ? "dq_out" : "q";
  const char* k_name = backward ? "dk_out" : "k";
  const thinkfuse::RotaryShape shape = check_qk(q, k, q_name, k_name);
  const thinkfuse::CosSinView cos_sin = check_cos_sin(cos, sin, shape, q.device());
  const DType in_dtype = kernel_dtype(q, q_name);
  const DType cos_dtype = kernel_dtype(cos, "cos");
  const DType out_dtype = kernel_dtype(out_type, backward ? "q_dtype" : "the output dtype");

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor q_out = at::empty(q.sizes(), q.options().dtype(out_type));
  at::Tensor k_out = at::empty(k.sizes(), k.options().dtype(out_type));
  const auto launch =
      backward ? &thinkfuse::apply_rotary_backward : &thinkfuse::apply_rotary_forward;
  check_launch(launch(shape, heads_view(q), heads_view(k), cos_sin, q_out.mutable_data_ptr(),
                      k_out.mutable_data_ptr(), in_dtype, cos_dtype, out_dtype,
                      c10::cuda::getCurrentCUDAStream().stream()),
               backward ? "apply_rotary_bwd" : "apply_rotary_fwd");
  return {q_out, k_out};
}

std::tuple<at::Tensor, at::Tensor> apply_rotary_fwd(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& cos,
                                                    const at::Tensor& sin) {
  // transformers' q * cos + rotate_half(q) * sin promotes q's dtype with cos's.
  return apply_rotary_impl(q, k, cos, sin, at::promote_types(q.scalar_type(), cos.scalar_type()),
                           /*backward=*/false);
}

std::tuple<at::Tensor, at::Tensor> apply_rotary_bwd(const at::Tensor& dq_out,
                                                    const at::Tensor& dk_out,
                                                    const at::Tensor& cos, const at::Tensor& sin,
                                                    at::ScalarType q_dtype,
                                                    at::ScalarType k_dtype) {
  // One launch writes both gradients: they share a dtype (as q and k do in the forward).
  kernel_dtype(q_dtype, "q_dtype");
  TORCH_CHECK_TYPE(k_dtype == q_dtype, "k_dtype must equal q_dtype ", q_dtype, ", got ", k_dtype);
  return apply_rotary_impl(dq_out, dk_out, cos, sin, q_dtype, /*backward=*/true);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(thinkfuse_C, m) {
  m.def(
      "rope_fwd(Tensor q, Tensor k, Tensor position_ids, Tensor inv_freq, float attention_scaling, "
      "float llama4_beta, int llama4_original_max) -> (Tensor q_out, Tensor k_out)");
  m.def(
      "rope_bwd(Tensor dq_out, Tensor dk_out, Tensor position_ids, Tensor inv_freq, "
      "float attention_scaling, float llama4_beta, int llama4_original_max) "
      "-> (Tensor dq, Tensor dk)");
  m.def("apply_rotary_fwd(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor q_out, Tensor k_out)");
  m.def(
      "apply_rotary_bwd(Tensor dq_out, Tensor dk_out, Tensor cos, Tensor sin, ScalarType q_dtype, "
      "ScalarType k_dtype) -> (Tensor dq, Tensor dk)");
}

TORCH_LIBRARY_IMPL(thinkfuse_C, CUDA, m) {
  m.impl("rope_fwd", &rope_fwd);
  m.impl("rope_bwd", &rope_bwd);
  m.impl("apply_rotary_fwd", &apply_rotary_fwd);
  m.impl("apply_rotary_bwd", &apply_rotary_bwd);
}
