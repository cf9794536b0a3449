// Torch bindings of the thinkfuse CUDA kernels: argument checks, device guard and stream, and
// registration as torch.ops.thinkfuse_C.*. This file defines the library (TORCH_LIBRARY) and the
// Python module; csrc/bindings/*.cpp add ops to it with TORCH_LIBRARY_FRAGMENT, one file per op
// group. Only binding files include torch (the kernels are compiled without it, see
// csrc/include/thinkfuse/ops.h); their shared argument checks are in csrc/bindings/common.h.
//
// The checks here are a second line of defence: python/thinkfuse/ops validates arguments first,
// with friendlier messages. They still name the argument, and raise ValueError / TypeError like
// the Python checks do.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "bindings/common.h"
#include "thinkfuse/ops.h"

namespace {

using namespace thinkfuse::bindings;

void check_width(int64_t cols) {
  TORCH_CHECK_VALUE(cols <= thinkfuse::kRmsNormMaxCols, "rows wider than ",
                    thinkfuse::kRmsNormMaxCols, " elements are not supported, got ", cols);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual,
    double eps) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D [rows, cols], got shape ", x.sizes());
  const int64_t rows = x.size(0);
  const int64_t cols = x.size(1);
  check_device(x, "x", x.device());
  check_rows(x, "x", rows, cols);
  check_width(cols);
  const DType x_dtype = kernel_dtype(x, "x");
  check_device(weight, "weight", x.device());
  check_vector(weight, "weight", cols);
  const DType w_dtype = kernel_dtype(weight, "weight");
  if (residual.has_value()) {
    check_device(*residual, "residual", x.device());
    check_rows(*residual, "residual", rows, cols);
    TORCH_CHECK_TYPE(residual->scalar_type() == x.scalar_type(), "residual must have x's dtype ",
                     x.scalar_type(), ", got ", residual->scalar_type());
  }

  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType y_type = at::promote_types(x.scalar_type(), weight.scalar_type());
  at::Tensor y = at::empty({rows, cols}, x.options().dtype(y_type));
  at::Tensor h = residual.has_value() ? at::empty({rows, cols}, x.options())
                                      : at::empty({0}, x.options());
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  check_launch(
      thinkfuse::rms_norm_forward(
          x.const_data_ptr(), x.stride(0),
          residual.has_value() ? residual->const_data_ptr() : nullptr,
          residual.has_value() ? residual->stride(0) : 0, weight.const_data_ptr(),
          y.mutable_data_ptr(), residual.has_value() ? h.mutable_data_ptr() : nullptr,
          rstd.mutable_data_ptr<float>(), rows, cols, static_cast<float>(eps), x_dtype, w_dtype,
          c10::cuda::getCurrentCUDAStream().stream()),
      "rms_norm_fwd");
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& h,
                                                const at::Tensor& weight, const at::Tensor& rstd,
                                                const std::optional<at::Tensor>& dh) {
  TORCH_CHECK_VALUE(h.dim() == 2, "h must be 2-D [rows, cols], got shape ", h.sizes());
  const int64_t rows = h.size(0);
  const int64_t cols = h.size(1);
  check_device(h, "h", h.device());
  check_rows(h, "h", rows, cols);
  check_width(cols);
  const DType x_dtype = kernel_dtype(h, "h");
  check_device(weight, "weight", h.device());
  check_vector(weight, "weight", cols);
  const DType w_dtype = kernel_dtype(weight, "weight");
  check_device(dy, "dy", h.device());
  check_rows(dy, "dy", rows, cols);
  const at::ScalarType y_type = at::promote_types(h.scalar_type(), weight.scalar_type());
  TORCH_CHECK_TYPE(dy.scalar_type() == y_type, "dy must have the forward output's dtype ", y_type,
                   ", got ", dy.scalar_type());
  check_device(rstd, "rstd", h.device());
  check_vector(rstd, "rstd", rows);
  TORCH_CHECK_TYPE(rstd.scalar_type() == at::kFloat, "rstd must be float32, got ",
                   rstd.scalar_type());
  if (dh.has_value()) {
    check_device(*dh, "dh", h.device());
    check_rows(*dh, "dh", rows, cols);
    TORCH_CHECK_VALUE(dh->is_contiguous(), "dh must be contiguous");
    TORCH_CHECK_TYPE(dh->scalar_type() == h.scalar_type(), "dh must have h's dtype ",
                     h.scalar_type(), ", got ", dh->scalar_type());
  }

  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t workspace_floats =
      thinkfuse::rms_norm_backward_workspace_floats(cols, h.device().index());
  TORCH_CHECK(workspace_floats >= 0, "rms_norm_bwd: cannot query the SM count of ", h.device());
  at::Tensor workspace = at::empty({workspace_floats}, h.options().dtype(at::kFloat));
  at::Tensor dx = at::empty({rows, cols}, h.options());
  at::Tensor dw = at::empty({cols}, weight.options());
  check_launch(
      thinkfuse::rms_norm_backward(
          dy.const_data_ptr(), dy.stride(0), h.const_data_ptr(), h.stride(0),
          weight.const_data_ptr(), rstd.const_data_ptr<float>(),
          dh.has_value() ? dh->const_data_ptr() : nullptr, dx.mutable_data_ptr(),
          dw.mutable_data_ptr(), workspace.mutable_data_ptr<float>(), rows, cols, x_dtype, w_dtype,
          c10::cuda::getCurrentCUDAStream().stream()),
      "rms_norm_bwd");
  return {dx, dw};
}

// --- rotary embedding -------------------------------------------------------------------------

// Stride of dim, or 0 when the dim has one element: its index is always 0, and an arbitrary
// stride there (torch allows any) must not block vectorisation. Also makes a [1, S] position
// or cos/sin tensor broadcast over the batch.
thinkfuse::HeadsView heads_view(const at::Tensor& t) {
  return {t.const_data_ptr(), t.size(2), stride_or_zero(t, 0), stride_or_zero(t, 1),
          stride_or_zero(t, 2)};
}

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

// --- SwiGLU --------------------------------------------------------------------------------------

void check_swiglu_width(int64_t cols) {
  TORCH_CHECK_VALUE(cols <= thinkfuse::kSwigluMaxCols, "rows wider than ",
                    thinkfuse::kSwigluMaxCols, " elements are not supported, got ", cols);
}

// [rows, cols] with x's dtype and device and a unit column stride.
void check_like_rows(const at::Tensor& t, const char* name, const at::Tensor& like,
                     const char* like_name, int64_t rows, int64_t cols) {
  check_device(t, name, like.device());
  check_rows(t, name, rows, cols);
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, " must have ", like_name,
                   "'s dtype ", like.scalar_type(), ", got ", t.scalar_type());
}

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK_VALUE(gate.dim() == 2, "gate must be 2-D [rows, cols], got shape ", gate.sizes());
  const int64_t rows = gate.size(0);
  const int64_t cols = gate.size(1);
  check_device(gate, "gate", gate.device());
  check_rows(gate, "gate", rows, cols);
  check_swiglu_width(cols);
  const DType dtype = kernel_dtype(gate, "gate");
  check_like_rows(up, "up", gate, "gate", rows, cols);

  const c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor y = at::empty({rows, cols}, gate.options());
  check_launch(thinkfuse::swiglu_forward(gate.const_data_ptr(), gate.stride(0),
                                         up.const_data_ptr(), up.stride(0), y.mutable_data_ptr(),
                                         cols, rows, cols, dtype,
                                         c10::cuda::getCurrentCUDAStream().stream()),
               "swiglu_fwd");
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate,
                                              const at::Tensor& up) {
  TORCH_CHECK_VALUE(gate.dim() == 2, "gate must be 2-D [rows, cols], got shape ", gate.sizes());
  const int64_t rows = gate.size(0);
  const int64_t cols = gate.size(1);
  check_device(gate, "gate", gate.device());
  check_rows(gate, "gate", rows, cols);
  check_swiglu_width(cols);
  const DType dtype = kernel_dtype(gate, "gate");
  check_like_rows(up, "up", gate, "gate", rows, cols);
  check_like_rows(dy, "dy", gate, "gate", rows, cols);

  const c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor dgate = at::empty({rows, cols}, gate.options());
  at::Tensor dup = at::empty({rows, cols}, gate.options());
  check_launch(thinkfuse::swiglu_backward(dy.const_data_ptr(), dy.stride(0),
                                          gate.const_data_ptr(), gate.stride(0),
                                          up.const_data_ptr(), up.stride(0),
                                          dgate.mutable_data_ptr(), cols, dup.mutable_data_ptr(),
                                          cols, rows, cols, dtype,
                                          c10::cuda::getCurrentCUDAStream().stream()),
               "swiglu_bwd");
  return {dgate, dup};
}

// gate_up [rows, 2N]: returns N. gate is its first column half, up the second.
int64_t check_gate_up(const at::Tensor& gate_up) {
  TORCH_CHECK_VALUE(gate_up.dim() == 2, "gate_up must be 2-D [rows, 2 * N], got shape ",
                    gate_up.sizes());
  check_device(gate_up, "gate_up", gate_up.device());
  check_rows(gate_up, "gate_up", gate_up.size(0), gate_up.size(1));
  TORCH_CHECK_VALUE(gate_up.size(1) % 2 == 0,
                    "gate_up's last dim must be even (gate and up halves), got ", gate_up.size(1));
  const int64_t cols = gate_up.size(1) / 2;
  check_swiglu_width(cols);
  return cols;
}

at::Tensor swiglu_fused_fwd(const at::Tensor& gate_up) {
  const int64_t cols = check_gate_up(gate_up);
  const int64_t rows = gate_up.size(0);
  const DType dtype = kernel_dtype(gate_up, "gate_up");

  const c10::cuda::CUDAGuard guard(gate_up.device());
  const at::Tensor gate = gate_up.narrow(1, 0, cols);
  const at::Tensor up = gate_up.narrow(1, cols, cols);
  at::Tensor y = at::empty({rows, cols}, gate_up.options());
  check_launch(thinkfuse::swiglu_forward(gate.const_data_ptr(), gate_up.stride(0),
                                         up.const_data_ptr(), gate_up.stride(0),
                                         y.mutable_data_ptr(), cols, rows, cols, dtype,
                                         c10::cuda::getCurrentCUDAStream().stream()),
               "swiglu_fused_fwd");
  return y;
}

at::Tensor swiglu_fused_bwd(const at::Tensor& dy, const at::Tensor& gate_up) {
  const int64_t cols = check_gate_up(gate_up);
  const int64_t rows = gate_up.size(0);
  const DType dtype = kernel_dtype(gate_up, "gate_up");
  check_like_rows(dy, "dy", gate_up, "gate_up", rows, cols);

  const c10::cuda::CUDAGuard guard(gate_up.device());
  const at::Tensor gate = gate_up.narrow(1, 0, cols);
  const at::Tensor up = gate_up.narrow(1, cols, cols);
  at::Tensor dgate_up = at::empty({rows, 2 * cols}, gate_up.options());
  at::Tensor dgate = dgate_up.narrow(1, 0, cols);
  at::Tensor dup = dgate_up.narrow(1, cols, cols);
  check_launch(thinkfuse::swiglu_backward(dy.const_data_ptr(), dy.stride(0),
                                          gate.const_data_ptr(), gate_up.stride(0),
                                          up.const_data_ptr(), gate_up.stride(0),
                                          dgate.mutable_data_ptr(), 2 * cols,
                                          dup.mutable_data_ptr(), 2 * cols, rows, cols, dtype,
                                          c10::cuda::getCurrentCUDAStream().stream()),
               "swiglu_fused_bwd");
  return dgate_up;
}

// --- token log-probabilities ----------------------------------------------------------------

// logits [B, T, V] with a unit stride on V; returns V.
int64_t check_logits3(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.dim() == 3, "logits must be 3-D [B, T, V], got shape ", logits.sizes());
  check_device(logits, "logits", logits.device());
  kernel_dtype(logits, "logits");
  const int64_t vocab = logits.size(2);
  TORCH_CHECK_VALUE(vocab >= 1 && vocab <= thinkfuse::kLogprobsMaxVocab,
                    "logits' vocabulary dim must be in [1, ", thinkfuse::kLogprobsMaxVocab,
                    "], got ", vocab);
  TORCH_CHECK_VALUE(logits.stride(2) == 1 || vocab == 1,
                    "logits must have unit stride along V, got strides ", logits.strides());
  TORCH_CHECK_VALUE(logits.size(0) * logits.size(1) <= thinkfuse::kLogprobsMaxRows,
                    "more than ", thinkfuse::kLogprobsMaxRows, " rows are not supported, got ",
                    logits.size(0) * logits.size(1));
  return vocab;
}

// token_ids [rows] contiguous int32/int64 on `device`; returns whether they are int64.
bool check_token_ids(const at::Tensor& ids, int64_t rows, const at::Device& device) {
  check_device(ids, "token_ids", device);
  const at::ScalarType type = ids.scalar_type();
  TORCH_CHECK_TYPE(type == at::kInt || type == at::kLong, "token_ids must be int32 or int64, got ",
                   type);
  check_vector(ids, "token_ids", rows);
  return type == at::kLong;
}

// A float32 [rows] contiguous vector on `device`.
void check_f32_rows(const at::Tensor& t, const char* name, int64_t rows,
                    const at::Device& device) {
  check_device(t, name, device);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  check_vector(t, name, rows);
}

float inverse_temperature(double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "temperature must be finite and > 0, got ", temperature);
  // As the Triton launcher: 1 / T in double, then float32.
  return static_cast<float>(1.0 / temperature);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(const at::Tensor& logits,
                                                                  const at::Tensor& token_ids,
                                                                  double temperature,
                                                                  bool return_entropy) {
  const int64_t vocab = check_logits3(logits);
  const DType dtype = kernel_dtype(logits, "logits");
  const int64_t rows = logits.size(0) * logits.size(1);
  const bool ids_int64 = check_token_ids(token_ids, rows, logits.device());
  const float inv_t = inverse_temperature(temperature);

  const c10::cuda::CUDAGuard guard(logits.device());
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({rows}, f32);
  at::Tensor entropy = at::empty({return_entropy ? rows : 0}, f32);
  at::Tensor lse = at::empty({rows}, f32);
  check_launch(thinkfuse::token_logprobs_forward(
                   logits.const_data_ptr(), stride_or_zero(logits, 0), stride_or_zero(logits, 1),
                   logits.size(1), token_ids.const_data_ptr(), ids_int64,
                   logprobs.mutable_data_ptr<float>(),
                   return_entropy ? entropy.mutable_data_ptr<float>() : nullptr,
                   lse.mutable_data_ptr<float>(), rows, vocab, inv_t, dtype,
                   c10::cuda::getCurrentCUDAStream().stream()),
               "token_logprobs_fwd");
  return {logprobs, entropy, lse};
}

at::Tensor token_logprobs_bwd(const at::Tensor& grad_logprobs,
                              const std::optional<at::Tensor>& grad_entropy,
                              const at::Tensor& logits, const at::Tensor& token_ids,
                              const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                              double temperature) {
  const int64_t vocab = check_logits3(logits);
  const DType dtype = kernel_dtype(logits, "logits");
  const int64_t rows = logits.size(0) * logits.size(1);
  const at::Device device = logits.device();
  const bool ids_int64 = check_token_ids(token_ids, rows, device);
  check_f32_rows(grad_logprobs, "grad_logprobs", rows, device);
  check_f32_rows(lse, "lse", rows, device);
  if (grad_entropy.has_value()) {
    check_f32_rows(*grad_entropy, "grad_entropy", rows, device);
    TORCH_CHECK_VALUE(entropy.has_value(), "entropy is required with grad_entropy");
    check_f32_rows(*entropy, "entropy", rows, device);
  }
  const float inv_t = inverse_temperature(temperature);

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());  // contiguous
  const bool d_entropy = grad_entropy.has_value();
  check_launch(thinkfuse::token_logprobs_backward(
                   grad_logprobs.const_data_ptr<float>(),
                   d_entropy ? grad_entropy->const_data_ptr<float>() : nullptr,
                   logits.const_data_ptr(), stride_or_zero(logits, 0), stride_or_zero(logits, 1),
                   logits.size(1), token_ids.const_data_ptr(), ids_int64,
                   lse.const_data_ptr<float>(),
                   d_entropy ? entropy->const_data_ptr<float>() : nullptr,
                   grad_logits.mutable_data_ptr(), rows, vocab, inv_t, dtype,
                   c10::cuda::getCurrentCUDAStream().stream()),
               "token_logprobs_bwd");
  return grad_logits;
}

// --- speculative verification ----------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> mtp_verify(const at::Tensor& draft_tokens,
                                              const at::Tensor& target_logits,
                                              const std::optional<at::Tensor>& draft_probs,
                                              const std::optional<at::Tensor>& uniforms,
                                              double temperature, int64_t num_splits) {
  TORCH_CHECK_VALUE(draft_tokens.dim() == 2, "draft_tokens must be 2-D [B, K], got shape ",
                    draft_tokens.sizes());
  const int64_t batch = draft_tokens.size(0);
  const int64_t k = draft_tokens.size(1);
  const at::Device device = target_logits.device();
  check_device(target_logits, "target_logits", device);
  check_device(draft_tokens, "draft_tokens", device);
  TORCH_CHECK_TYPE(draft_tokens.scalar_type() == at::kLong, "draft_tokens must be int64, got ",
                   draft_tokens.scalar_type());
  TORCH_CHECK_VALUE(draft_tokens.is_contiguous(), "draft_tokens must be contiguous");
  TORCH_CHECK_VALUE(batch <= thinkfuse::kMtpMaxBatch && k <= thinkfuse::kMtpMaxDrafts,
                    "draft_tokens of shape ", draft_tokens.sizes(), " are not supported (at most ",
                    thinkfuse::kMtpMaxDrafts, " drafts per row)");
  TORCH_CHECK_VALUE(target_logits.dim() == 3 && target_logits.size(0) == batch &&
                        target_logits.size(1) == k + 1,
                    "target_logits must be [B, K+1, V] = [", batch, ", ", k + 1, ", V], got ",
                    target_logits.sizes());
  const DType logits_dtype = kernel_dtype(target_logits, "target_logits");
  const int64_t vocab = target_logits.size(2);
  TORCH_CHECK_VALUE(vocab >= 1 && vocab <= thinkfuse::kMtpMaxVocab,
                    "target_logits' vocabulary dim must be in [1, ", thinkfuse::kMtpMaxVocab,
                    "], got ", vocab);
  TORCH_CHECK_VALUE(target_logits.stride(2) == 1 || vocab == 1,
                    "target_logits must have unit stride along V, got strides ",
                    target_logits.strides());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature >= 0.0,
                    "temperature must be finite and >= 0, got ", temperature);
  const bool sampled = temperature > 0.0;
  DType probs_dtype = DType::kFloat32;
  const bool has_probs = sampled && draft_probs.has_value();
  if (has_probs) {
    check_device(*draft_probs, "draft_probs", device);
    probs_dtype = kernel_dtype(*draft_probs, "draft_probs");
    TORCH_CHECK_VALUE(draft_probs->dim() == 3 && draft_probs->size(0) == batch &&
                          draft_probs->size(1) == k && draft_probs->size(2) == vocab,
                      "draft_probs must be [B, K, V] = [", batch, ", ", k, ", ", vocab, "], got ",
                      draft_probs->sizes());
    TORCH_CHECK_VALUE(draft_probs->stride(2) == 1 || vocab == 1,
                      "draft_probs must have unit stride along V, got strides ",
                      draft_probs->strides());
  }
  if (sampled) {
    TORCH_CHECK_VALUE(uniforms.has_value(), "uniforms are required when temperature > 0");
    check_device(*uniforms, "uniforms", device);
    TORCH_CHECK_TYPE(uniforms->scalar_type() == at::kFloat, "uniforms must be float32, got ",
                     uniforms->scalar_type());
    TORCH_CHECK_VALUE(uniforms->dim() == 2 && uniforms->size(0) == batch &&
                          uniforms->size(1) == k + 1,
                      "uniforms must be [B, K+1] = [", batch, ", ", k + 1, "], got ",
                      uniforms->sizes());
    TORCH_CHECK_VALUE(uniforms->is_contiguous(), "uniforms must be contiguous");
  }
  // float32, as the Triton kernel; a positive temperature below float32's range would become a
  // (greedy) 0, so it is kept positive.
  float temp = static_cast<float>(temperature);
  if (sampled && temp == 0.0f) temp = std::numeric_limits<float>::min();
  TORCH_CHECK_VALUE(num_splits <= thinkfuse::kMtpMaxSplits, "num_splits must be <= ",
                    thinkfuse::kMtpMaxSplits,
                    " (<= 0: chosen by heuristic, 1: one block per batch row), got ", num_splits);

  const c10::cuda::CUDAGuard guard(device);
  const auto i64 = target_logits.options().dtype(at::kLong);
  at::Tensor tokens = at::empty({batch, k + 1}, i64);
  at::Tensor num_accepted = at::empty({batch}, i64);
  // The work split (0: one block per batch row; else vocabulary slices per row, which need a
  // workspace for the per-slice partials and the per-row ticket counters the launch zeroes).
  int sm_count = 0;
  if (num_splits <= 0 && batch > 0) {
    check_launch(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device.index()),
                 "mtp_verify (SM count)");
  }
  const int64_t splits =
      thinkfuse::mtp_verify_splits(batch, k, vocab, sampled, num_splits, sm_count);
  const int64_t workspace_bytes = thinkfuse::mtp_verify_workspace_bytes(batch, k, splits, sampled);
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({(workspace_bytes + 3) / 4}, target_logits.options().dtype(at::kInt));
  }
  check_launch(
      thinkfuse::mtp_verify(
          draft_tokens.const_data_ptr<int64_t>(), target_logits.const_data_ptr(),
          stride_or_zero(target_logits, 0), stride_or_zero(target_logits, 1),
          has_probs ? draft_probs->const_data_ptr() : nullptr,
          has_probs ? stride_or_zero(*draft_probs, 0) : 0,
          has_probs ? stride_or_zero(*draft_probs, 1) : 0,
          sampled ? uniforms->const_data_ptr<float>() : nullptr,
          tokens.mutable_data_ptr<int64_t>(), num_accepted.mutable_data_ptr<int64_t>(), batch, k,
          vocab, temp, logits_dtype, probs_dtype, splits,
          workspace_bytes > 0 ? workspace.mutable_data_ptr() : nullptr, workspace_bytes,
          c10::cuda::getCurrentCUDAStream().stream()),
      "mtp_verify");
  return {tokens, num_accepted};
}

std::string cuda_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
}

}  // namespace

TORCH_LIBRARY(thinkfuse_C, m) {
  m.def(
      "rms_norm_fwd(Tensor x, Tensor weight, Tensor? residual, float eps) "
      "-> (Tensor y, Tensor h, Tensor rstd)");
  m.def(
      "rms_norm_bwd(Tensor dy, Tensor h, Tensor weight, Tensor rstd, Tensor? dh) "
      "-> (Tensor dx, Tensor dw)");
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
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor y");
  m.def("swiglu_bwd(Tensor dy, Tensor gate, Tensor up) -> (Tensor dgate, Tensor dup)");
  m.def("swiglu_fused_fwd(Tensor gate_up) -> Tensor y");
  m.def("swiglu_fused_bwd(Tensor dy, Tensor gate_up) -> Tensor dgate_up");
  m.def(
      "token_logprobs_fwd(Tensor logits, Tensor token_ids, float temperature, bool return_entropy) "
      "-> (Tensor logprobs, Tensor entropy, Tensor lse)");
  m.def(
      "token_logprobs_bwd(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, "
      "Tensor token_ids, Tensor lse, Tensor? entropy, float temperature) -> Tensor grad_logits");
  m.def(
      "mtp_verify(Tensor draft_tokens, Tensor target_logits, Tensor? draft_probs, "
      "Tensor? uniforms, float temperature, int num_splits=1) -> (Tensor tokens, Tensor num_accepted)");
}

TORCH_LIBRARY_IMPL(thinkfuse_C, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("rope_fwd", &rope_fwd);
  m.impl("rope_bwd", &rope_bwd);
  m.impl("apply_rotary_fwd", &apply_rotary_fwd);
  m.impl("apply_rotary_bwd", &apply_rotary_bwd);
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
  m.impl("swiglu_fused_fwd", &swiglu_fused_fwd);
  m.impl("swiglu_fused_bwd", &swiglu_fused_bwd);
  m.impl("token_logprobs_fwd", &token_logprobs_fwd);
  m.impl("token_logprobs_bwd", &token_logprobs_bwd);
  m.impl("mtp_verify", &mtp_verify);
}

// Importing thinkfuse._C loads this library, which registers the ops above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "thinkfuse CUDA kernels, registered as torch.ops.thinkfuse_C.*";
  m.def("cuda_version", &cuda_version, "CUDA toolkit version the extension was built with");
}
