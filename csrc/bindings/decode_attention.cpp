// Torch binding of decode_attention (thinkfuse/ops.h): argument checks, the split count and its
// float32 workspace, device guard and stream; registered as torch.ops.thinkfuse_C.decode_attention
// (schema in python/thinkfuse/ops/attention.py). python/thinkfuse/ops checks the arguments
// first; these checks are the second line of defence and raise ValueError / TypeError too.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "common.h"
#include "thinkfuse/ops.h"

namespace {

using namespace thinkfuse::bindings;

void check_4d(const at::Tensor& t, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D ", layout, ", got shape ", t.sizes());
}

void check_unit_last_stride(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.stride(3) == 1 || t.numel() == 0, name,
                    " must have unit stride along head_dim, got strides ", t.strides());
}

// q [B, Sq, Hq, D], k_cache / v_cache [B, S_max, Hkv, D] (unit stride on D, any other strides),
// cache_seqlens [B] int32, cache_leftpad (optional) [B] int32. Returns the kernels' shape
// description.
thinkfuse::DecodeAttentionShape check_decode_args(const at::Tensor& q, const at::Tensor& k_cache,
                                                  const at::Tensor& v_cache,
                                                  const at::Tensor& cache_seqlens,
                                                  const std::optional<at::Tensor>& cache_leftpad) {
  check_4d(q, "q", "[B, Sq, Hq, D]");
  check_4d(k_cache, "k_cache", "[B, S_max, Hkv, D]");
  check_4d(v_cache, "v_cache", "[B, S_max, Hkv, D]");
  const at::Device device = q.device();
  check_device(q, "q", device);
  check_device(k_cache, "k_cache", device);
  check_device(v_cache, "v_cache", device);
  check_device(cache_seqlens, "cache_seqlens", device);
  kernel_dtype(q, "q");
  TORCH_CHECK_TYPE(k_cache.scalar_type() == q.scalar_type(), "k_cache dtype ",
                   k_cache.scalar_type(), " must equal q dtype ", q.scalar_type());
  TORCH_CHECK_TYPE(v_cache.scalar_type() == q.scalar_type(), "v_cache dtype ",
                   v_cache.scalar_type(), " must equal q dtype ", q.scalar_type());
  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt, "cache_seqlens must be int32, got ",
                   cache_seqlens.scalar_type());

  const int64_t batch = q.size(0);
  const int64_t seqlen_q = q.size(1);
  const int64_t q_heads = q.size(2);
  const int64_t head_dim = q.size(3);
  TORCH_CHECK_VALUE(seqlen_q >= 1 && seqlen_q <= thinkfuse::kDecodeMaxQueries, "q must hold 1 to ",
                    thinkfuse::kDecodeMaxQueries,
                    " query tokens per row (dim 1), got ", seqlen_q,
                    "; use flash_attention for prefill");
  TORCH_CHECK_VALUE(k_cache.size(0) == batch, "k_cache batch ", k_cache.size(0),
                    " must equal q batch ", batch);
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache shape ", v_cache.sizes(),
                    " must equal k_cache shape ", k_cache.sizes());
  const int64_t max_seqlen_k = k_cache.size(1);
  const int64_t kv_heads = k_cache.size(2);
  TORCH_CHECK_VALUE(kv_heads >= 1 && q_heads % kv_heads == 0, "q has ", q_heads,
                    " heads, which is not a multiple of k_cache's ", kv_heads,
                    " heads (GQA needs Hq % Hkv == 0)");
  TORCH_CHECK_VALUE(k_cache.size(3) == head_dim, "k_cache head_dim ", k_cache.size(3),
                    " must equal q's head_dim ", head_dim);
  TORCH_CHECK_VALUE(thinkfuse::decode_attention_head_dim_supported(head_dim), "head_dim ",
                    head_dim, " is not supported; expected one of (16, 32, 64, 96, 128, 256)");
  TORCH_CHECK_VALUE(q_heads <= thinkfuse::kDecodeMaxHeads, "q has ", q_heads,
                    " heads; at most ", thinkfuse::kDecodeMaxHeads, " are supported");
  TORCH_CHECK_VALUE(max_seqlen_k <= thinkfuse::kDecodeMaxSeqlenK, "k_cache holds ", max_seqlen_k,
                    " positions (dim 1); at most ", thinkfuse::kDecodeMaxSeqlenK,
                    " are supported");
  check_unit_last_stride(q, "q");
  check_unit_last_stride(k_cache, "k_cache");
  check_unit_last_stride(v_cache, "v_cache");
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == batch,
                    "cache_seqlens must have one entry per batch row ([", batch, "]), got shape ",
                    cache_seqlens.sizes());
  TORCH_CHECK_VALUE(cache_seqlens.is_contiguous(), "cache_seqlens must be contiguous");
  if (cache_leftpad.has_value()) {
    const at::Tensor& leftpad = *cache_leftpad;
    check_device(leftpad, "cache_leftpad", device);
    TORCH_CHECK_TYPE(leftpad.scalar_type() == at::kInt, "cache_leftpad must be int32, got ",
                     leftpad.scalar_type());
    TORCH_CHECK_VALUE(leftpad.dim() == 1 && leftpad.size(0) == batch,
                      "cache_leftpad must have one entry per batch row ([", batch, "]), got shape ",
                      leftpad.sizes());
    TORCH_CHECK_VALUE(leftpad.is_contiguous(), "cache_leftpad must be contiguous");
  }
  return {batch, seqlen_q, q_heads, kv_heads, head_dim, max_seqlen_k};
}

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                 const std::optional<at::Tensor>& cache_leftpad,
                                 double softmax_scale, int64_t window, int64_t num_splits) {
  const thinkfuse::DecodeAttentionShape shape =
      check_decode_args(q, k_cache, v_cache, cache_seqlens, cache_leftpad);
  const DType dtype = kernel_dtype(q, "q");
  // Python floats arrive as double; the kernels take float32, as the Triton kernel does.
  const float scale = static_cast<float>(softmax_scale);
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale) && std::isfinite(scale) && scale > 0.0f,
                    "softmax_scale must be finite and > 0 (in float32), got ", softmax_scale);

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({shape.batch, shape.seqlen_q, shape.q_heads, shape.head_dim},
                             q.options());
  if (out.numel() == 0) return out;
  // From the shapes and the device only (never the lengths): a fixed workspace per shape, so the
  // op can be captured in a CUDA graph.
  const int64_t splits = thinkfuse::decode_attention_num_splits(shape, num_splits, dtype);
  TORCH_CHECK(splits >= 1, "decode_attention: cannot choose a split count on ", q.device(),
              ": ", cudaGetErrorString(cudaGetLastError()));
  at::Tensor o_part;
  at::Tensor lse_part;
  if (splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    const int64_t rows = shape.q_heads * shape.seqlen_q;
    o_part = at::empty({shape.batch, splits, rows, shape.head_dim}, f32);
    lse_part = at::empty({shape.batch, splits, rows}, f32);
  }
  check_launch(
      thinkfuse::decode_attention(
          shape, heads_view(q), heads_view(k_cache), heads_view(v_cache),
          cache_seqlens.const_data_ptr<int32_t>(),
          cache_leftpad.has_value() ? cache_leftpad->const_data_ptr<int32_t>() : nullptr, scale,
          window, splits,
          splits > 1 ? o_part.mutable_data_ptr<float>() : nullptr,
          splits > 1 ? lse_part.mutable_data_ptr<float>() : nullptr, out.mutable_data_ptr(),
          dtype, c10::cuda::getCurrentCUDAStream().stream()),
      "decode_attention");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(thinkfuse_C, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, "
      "Tensor? cache_leftpad, float softmax_scale, int window, int num_splits) -> Tensor out");
}

TORCH_LIBRARY_IMPL(thinkfuse_C, CUDA, m) { m.impl("decode_attention", &decode_attention_cuda); }
