// Torch bindings of the token log-probability kernels (thinkfuse/ops.h): token_logprobs_fwd and
// token_logprobs_bwd, plus token_logprobs_bwd_out, which writes the gradient into a given tensor
// (the logits themselves, when the caller no longer needs them).
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "common.h"
#include "thinkfuse/ops.h"

namespace {

using namespace thinkfuse::bindings;

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

// grad_logits: contiguous [B, T, V] in the logits' dtype, on their device. It may be the logits
// themselves (the kernel reads each element before the same thread overwrites it), but no other
// overlap with them.
void check_grad_logits(const at::Tensor& grad_logits, const at::Tensor& logits) {
  check_device(grad_logits, "grad_logits", logits.device());
  TORCH_CHECK_TYPE(grad_logits.scalar_type() == logits.scalar_type(),
                   "grad_logits must have the logits' dtype ", logits.scalar_type(), ", got ",
                   grad_logits.scalar_type());
  TORCH_CHECK_VALUE(grad_logits.sizes() == logits.sizes(), "grad_logits must have the logits' shape ",
                    logits.sizes(), ", got ", grad_logits.sizes());
  TORCH_CHECK_VALUE(grad_logits.is_contiguous(), "grad_logits must be contiguous");
  if (grad_logits.numel() > 0 && grad_logits.storage().is_alias_of(logits.storage())) {
    TORCH_CHECK_VALUE(at::get_overlap_status(grad_logits, logits) == at::MemOverlapStatus::Full,
                      "grad_logits may be the logits themselves (in place) but must not "
                      "otherwise overlap them");
  }
}

// The backward into grad_logits (checked by the caller).
void token_logprobs_bwd_into(const at::Tensor& grad_logprobs,
                             const std::optional<at::Tensor>& grad_entropy,
                             const at::Tensor& logits, const at::Tensor& token_ids,
                             const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                             double temperature, const at::Tensor& grad_logits, const char* op) {
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
               op);
}

at::Tensor token_logprobs_bwd(const at::Tensor& grad_logprobs,
                              const std::optional<at::Tensor>& grad_entropy,
                              const at::Tensor& logits, const at::Tensor& token_ids,
                              const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                              double temperature) {
  check_logits3(logits);
  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());  // contiguous
  token_logprobs_bwd_into(grad_logprobs, grad_entropy, logits, token_ids, lse, entropy,
                          temperature, grad_logits, "token_logprobs_bwd");
  return grad_logits;
}

void token_logprobs_bwd_out(const at::Tensor& grad_logprobs,
                            const std::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& logits, const at::Tensor& token_ids,
                            const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                            double temperature, const at::Tensor& grad_logits) {
  check_logits3(logits);
  check_grad_logits(grad_logits, logits);
  token_logprobs_bwd_into(grad_logprobs, grad_entropy, logits, token_ids, lse, entropy,
                          temperature, grad_logits, "token_logprobs_bwd_out");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(thinkfuse_C, m) {
  m.def(
      "token_logprobs_fwd(Tensor logits, Tensor token_ids, float temperature, bool return_entropy) "
      "-> (Tensor logprobs, Tensor entropy, Tensor lse)");
  m.def(
      "token_logprobs_bwd(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, "
      "Tensor token_ids, Tensor lse, Tensor? entropy, float temperature) -> Tensor grad_logits");
  m.def(
      "token_logprobs_bwd_out(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, "
      "Tensor token_ids, Tensor lse, Tensor? entropy, float temperature, Tensor(a!) grad_logits) "
      "-> ()");
}

TORCH_LIBRARY_IMPL(thinkfuse_C, CUDA, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd);
  m.impl("token_logprobs_bwd", &token_logprobs_bwd);
  m.impl("token_logprobs_bwd_out", &token_logprobs_bwd_out);
}
