// Argument helpers shared by the attention bindings (flash_attention*.cpp): strides of the
// padded / packed layouts, the 16-byte row rule of the kernels' async copies, cu_seqlens and
// sequence-length checks. Torch-facing; never include it from a kernel file.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <utility>

#include "common.h"
#include "thinkfuse/flash_attention_params.cuh"
#include "thinkfuse/ops.h"

namespace thinkfuse::bindings {

// (batch, seq, head) element strides of a [B, S, H, D] or packed [total, H, D] tensor (no batch
// dim: 0); 0 where a dim has one element (its stride is meaningless there).
struct TokenStrides {
  int64_t b = 0, s = 0, h = 0;
};

inline TokenStrides token_strides(const at::Tensor& t, bool packed) {
  TokenStrides st;
  if (packed) {
    st.s = stride_or_zero(t, 0);
    st.h = stride_or_zero(t, 1);
  } else {
    st.b = stride_or_zero(t, 0);
    st.s = stride_or_zero(t, 1);
    st.h = stride_or_zero(t, 2);
  }
  return st;
}

// The kernels move rows in 16-byte chunks (cp.async, TMA): the base pointer and the stride of
// every dim with more than one element must be non-negative 16-byte multiples, the last dim
// unit-stride. Any other layout (an odd slice of a fused projection, an offset or transposed
// view) is copied into a fresh contiguous tensor. Empty tensors too: the launchers check the
// strides of a tensor they never read (k / v without keys), and torch's contiguous() keeps an
// empty tensor's strides (clone with an explicit memory format recomputes them, for free).
inline at::Tensor with_16B_rows(const at::Tensor& t) {
  bool ok = reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % 16 == 0 && t.stride(-1) == 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    const int64_t stride = stride_or_zero(t, d);
    ok = ok && stride >= 0 && (stride * t.element_size()) % 16 == 0;
  }
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// ValueError unless `device` is compute capability 9.0 (the Hopper kernels' sm_90a code runs
// nowhere else), naming the kernel and the op that takes other devices.
inline void check_hopper_device(const at::Device& device, const char* kernel,
                                const char* other_op) {
  int major = 0;
  int minor = 0;
  check_launch(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index()),
               kernel);
  check_launch(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device.index()),
               kernel);
  TORCH_CHECK_VALUE(major == 9 && minor == 0, kernel,
                    " needs a compute capability 9.0 (Hopper) GPU, but q is on ", device,
                    " (compute capability ", major, ".", minor, "); use ", other_op);
}

// ValueError for packed q / k with more rows than the Hopper kernels' int32 TMA coordinates
// reach (a tile past the last row included).
inline void check_hopper_packed_rows(const at::Tensor& q, const at::Tensor& k) {
  constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max() - 1024;
  TORCH_CHECK_VALUE(q.size(0) <= kMaxRows && k.size(0) <= kMaxRows, "packed q / k with more than ",
                    kMaxRows, " tokens are not supported by the sm90 kernels (int32 TMA coordinates)");
}

// A Hopper kernel's launch status: cudaErrorNotSupported (this build or driver cannot run it)
// becomes a ValueError saying "not supported here", which ops.attention takes as the signal to
// fall back; other errors as check_launch.
inline void check_hopper_launch(cudaError_t err, const char* op) {
  TORCH_CHECK_VALUE(err != cudaErrorNotSupported, op,
                    ": not supported here (the device must be compute capability 9.0, the "
                    "extension built for sm_90a (TORCH_CUDA_ARCH_LIST with 9.0a) and the driver "
                    "able to encode TMA tensor maps): ",
                    cudaGetErrorString(err));
  check_launch(err, op);
}

inline void check_cu_seqlens(const at::Tensor& cu, const char* name, const at::Device& device) {
  check_device(cu, name, device);
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, name,
                    " must be 1-D with batch + 1 >= 1 entries, got shape ", cu.sizes());
  TORCH_CHECK_VALUE(cu.is_contiguous(), name, " must be contiguous");
}

inline int checked_seqlen(int64_t value, const char* name) {
  TORCH_CHECK_VALUE(value >= 0 && value <= thinkfuse::kFlashAttnMaxSeqlen, name, " must be in [0, ",
                    thinkfuse::kFlashAttnMaxSeqlen, "], got ", value);
  return static_cast<int>(value);
}

// The layout of q [B, S, Hq, D] / k, v [B, S, Hkv, D], or packed [total, H, D] when cu_seqlens
// are given, checked: ranks, v like k, one head_dim, Hq a multiple of Hkv.
struct QkvLayout {
  bool packed = false;
  int64_t head_dim = 0;
  int64_t heads_q = 0;
  int64_t heads_kv = 0;
};

inline QkvLayout check_qkv_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const std::optional<at::Tensor>& cu_seqlens_q,
                                  const std::optional<at::Tensor>& cu_seqlens_k) {
  TORCH_CHECK_VALUE(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
                    "cu_seqlens_q and cu_seqlens_k must be given together (packed layout) or both "
                    "be None");
  QkvLayout l;
  l.packed = cu_seqlens_q.has_value();
  const int64_t rank = l.packed ? 3 : 4;
  const char* layout = l.packed ? "[total_tokens, H, D] with cu_seqlens" : "[B, S, H, D]";
  TORCH_CHECK_VALUE(q.dim() == rank, "q must be ", layout, ", got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == rank, "k must be ", layout, ", got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v shape ", v.sizes(), " must equal k shape ",
                    k.sizes());
  l.head_dim = q.size(-1);
  l.heads_q = q.size(-2);
  l.heads_kv = k.size(-2);
  TORCH_CHECK_VALUE(k.size(-1) == l.head_dim, "k head_dim ", k.size(-1),
                    " must equal q's head_dim ", l.head_dim);
  TORCH_CHECK_VALUE(l.heads_kv > 0 && l.heads_q % l.heads_kv == 0, "q has ", l.heads_q,
                    " heads, which is not a multiple of k's ", l.heads_kv,
                    " heads (GQA needs Hq % Hkv == 0)");
  return l;
}

inline void check_scale_and_window(double softmax_scale, bool causal, int64_t window) {
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale) && softmax_scale > 0,
                    "softmax_scale must be finite and > 0, got ", softmax_scale);
  TORCH_CHECK_VALUE(window <= 0 || causal, "a sliding window (window > 0) requires causal=True");
}

// Batch and (max) sequence lengths of a padded problem (q [B, Sq, H, D], k [B, Sk, H, D]) or a
// packed one (cu_seqlens of batch + 1 entries, max_seqlen from the caller), checked.
struct SeqDims {
  int64_t batch = 0;
  int sq = 0;
  int sk = 0;
};

inline SeqDims seq_dims(const at::Tensor& q, const at::Tensor& k,
                        const std::optional<at::Tensor>& cu_seqlens_q,
                        const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                        int64_t max_seqlen_k, const at::Device& device) {
  SeqDims dims;
  if (cu_seqlens_q.has_value()) {
    check_cu_seqlens(*cu_seqlens_q, "cu_seqlens_q", device);
    check_cu_seqlens(*cu_seqlens_k, "cu_seqlens_k", device);
    TORCH_CHECK_VALUE(cu_seqlens_k->size(0) == cu_seqlens_q->size(0), "cu_seqlens_k has ",
                      cu_seqlens_k->size(0), " entries but cu_seqlens_q has ",
                      cu_seqlens_q->size(0), "; both must be batch + 1");
    dims.batch = cu_seqlens_q->size(0) - 1;
    dims.sq = checked_seqlen(max_seqlen_q, "max_seqlen_q");
    dims.sk = checked_seqlen(max_seqlen_k, "max_seqlen_k");
  } else {
    TORCH_CHECK_VALUE(k.size(0) == q.size(0), "k batch ", k.size(0), " must equal q batch ",
                      q.size(0));
    dims.batch = q.size(0);
    dims.sq = checked_seqlen(q.size(1), "q's sequence length");
    dims.sk = checked_seqlen(k.size(1), "k's sequence length");
  }
  return dims;
}

// float16 / bfloat16 q (the tensor-core kernels have no float32 path) and `others` (name,
// tensor) of q's dtype; returns the kernels' dtype. `kernel` names the kernel in the message.
inline DType check_half_dtypes(const at::Tensor& q, const char* kernel,
                               std::initializer_list<std::pair<const char*, const at::Tensor*>> others) {
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                   "q must be float16 or bfloat16 for the ", kernel, " (tensor cores), got ",
                   q.scalar_type(), "; use backend='triton' or 'torch' for float32");
  for (const auto& [name, t] : others) {
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), name, " dtype ", t->scalar_type(),
                     " must equal q dtype ", q.scalar_type());
  }
  return kernel_dtype(q, "q");
}

// The forward's outputs: out contiguous like q, lse [B, Hq, Sq] (padded) or [Hq, total_q]
// (packed). Packed rows outside every sequence (cu_seqlens_q not ending at total) are never
// written by the kernels, so there out starts at 0 and lse at -inf, as the triton backend has.
inline std::pair<at::Tensor, at::Tensor> forward_outputs(const at::Tensor& q, const SeqDims& dims,
                                                         int64_t heads_q, bool packed) {
  const auto f32 = q.options().dtype(at::kFloat);
  if (packed) {
    return {at::zeros(q.sizes(), q.options()),
            at::full({heads_q, q.size(0)}, -std::numeric_limits<float>::infinity(), f32)};
  }
  return {at::empty(q.sizes(), q.options()),
          at::empty({dims.batch, heads_q, static_cast<int64_t>(dims.sq)}, f32)};
}

// The inputs' pointers and strides.
inline void set_qkv(thinkfuse::FlashAttnParams& p, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, bool packed) {
  const TokenStrides qs = token_strides(q, packed);
  const TokenStrides ks = token_strides(k, packed);
  const TokenStrides vs = token_strides(v, packed);
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.q_batch_stride = qs.b;
  p.q_seq_stride = qs.s;
  p.q_head_stride = qs.h;
  p.k_batch_stride = ks.b;
  p.k_seq_stride = ks.s;
  p.k_head_stride = ks.h;
  p.v_batch_stride = vs.b;
  p.v_seq_stride = vs.s;
  p.v_head_stride = vs.h;
}

// out's and lse's strides (their pointers are set by the caller: written by the forward, read by
// the backward).
inline void set_out_lse_strides(thinkfuse::FlashAttnParams& p, const at::Tensor& out,
                                const at::Tensor& lse, bool packed) {
  const TokenStrides os = token_strides(out, packed);
  p.o_batch_stride = os.b;
  p.o_seq_stride = os.s;
  p.o_head_stride = os.h;
  p.lse_batch_stride = packed ? 0 : stride_or_zero(lse, 0);
  p.lse_head_stride = stride_or_zero(lse, packed ? 0 : 1);
}

// Everything else the kernels need: sequences, heads, scale, mask.
inline void set_problem(thinkfuse::FlashAttnParams& p, const SeqDims& dims, int64_t heads_q,
                        int64_t heads_kv, int64_t head_dim, const at::Tensor& q,
                        const at::Tensor& k, const std::optional<at::Tensor>& cu_seqlens_q,
                        const std::optional<at::Tensor>& cu_seqlens_k, double softmax_scale,
                        bool causal, int64_t window) {
  if (cu_seqlens_q.has_value()) {
    p.cu_seqlens_q = cu_seqlens_q->const_data_ptr<int32_t>();
    p.cu_seqlens_k = cu_seqlens_k->const_data_ptr<int32_t>();
    p.total_q = q.size(0);
    p.total_k = k.size(0);
  }
  p.batch = static_cast<int>(dims.batch);
  p.heads_q = static_cast<int>(heads_q);
  p.heads_kv = static_cast<int>(heads_kv);
  p.group = static_cast<int>(heads_q / heads_kv);
  p.head_dim = static_cast<int>(head_dim);
  p.max_seqlen_q = dims.sq;
  p.max_seqlen_k = dims.sk;
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.causal = causal;
  // A window wider than every sequence hides nothing; clamping keeps it in int range.
  p.window = window <= 0 ? 0
                         : static_cast<int>(std::min<int64_t>(
                               window, int64_t{thinkfuse::kFlashAttnMaxSeqlen} + 1));
}

}  // namespace thinkfuse::bindings
