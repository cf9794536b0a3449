// Torch binding of the speculative-decoding verification kernel (thinkfuse/ops.h): argument
// checks, the work split and its workspace, device guard and stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "common.h"
#include "thinkfuse/ops.h"

namespace {

using namespace thinkfuse::bindings;

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(thinkfuse_C, m) {
  m.def(
      "mtp_verify(Tensor draft_tokens, Tensor target_logits, Tensor? draft_probs, "
      "Tensor? uniforms, float temperature, int num_splits=1) -> (Tensor tokens, Tensor num_accepted)");
}

TORCH_LIBRARY_IMPL(thinkfuse_C, CUDA, m) {
  m.impl("mtp_verify", &mtp_verify);
}
