// Torch binding of the Hopper flash-attention forward: torch.ops.thinkfuse_C.flash_attention_fwd_sm90,
// with the schema and semantics of flash_attention_fwd (csrc/bindings/flash_attention.cpp).
// Argument checks (ValueError / TypeError naming the argument; also for a device that is not
// compute capability 9.0 and head dims other than 64 / 128), output allocation, device guard and
// stream; the kernel is csrc/include/thinkfuse/flash_attention_fwd_sm90.cuh.
//
// Inputs whose base or strides are not 16-byte multiples (TMA's requirement) are copied into
// contiguous tensors first; if the driver still refuses to encode a tensor map for the given
// strides (cudaErrorInvalidPitchValue), the call is retried once with contiguous copies.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "attention_common.h"
#include "common.h"
#include "thinkfuse/flash_attention_params.cuh"
#include "thinkfuse/ops.h"

namespace {

using namespace thinkfuse::bindings;

std::tuple<at::Tensor, at::Tensor> flash_attention_fwd_sm90(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal,
    int64_t window) {
  const at::Device device = q_in.device();
  check_device(q_in, "q", device);
  check_device(k_in, "k", device);
  check_device(v_in, "v", device);
  {
    int major = 0;
    int minor = 0;
    check_launch(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index()),
                 "flash_attention_fwd_sm90 (device query)");
    check_launch(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device.index()),
                 "flash_attention_fwd_sm90 (device query)");
    TORCH_CHECK_VALUE(major == 9 && minor == 0,
                      "flash_attention_fwd_sm90 needs a compute capability 9.0 (Hopper) GPU, but q "
                      "is on ",
                      device, " (compute capability ", major, ".", minor,
                      "); use flash_attention_fwd");
  }
  TORCH_CHECK_TYPE(q_in.scalar_type() == at::kHalf || q_in.scalar_type() == at::kBFloat16,
                   "q must be float16 or bfloat16 for the sm90 flash_attention kernel (tensor "
                   "cores), got ",
                   q_in.scalar_type());
  const DType dtype = kernel_dtype(q_in, "q");
  TORCH_CHECK_TYPE(k_in.scalar_type() == q_in.scalar_type(), "k dtype ", k_in.scalar_type(),
                   " must equal q dtype ", q_in.scalar_type());
  TORCH_CHECK_TYPE(v_in.scalar_type() == q_in.scalar_type(), "v dtype ", v_in.scalar_type(),
                   " must equal q dtype ", q_in.scalar_type());

  TORCH_CHECK_VALUE(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
                    "cu_seqlens_q and cu_seqlens_k must be given together (packed layout) or both "
                    "be None");
  const bool packed = cu_seqlens_q.has_value();
  const int64_t rank = packed ? 3 : 4;
  const char* layout = packed ? "[total_tokens, H, D] with cu_seqlens" : "[B, S, H, D]";
  TORCH_CHECK_VALUE(q_in.dim() == rank, "q must be ", layout, ", got shape ", q_in.sizes());
  TORCH_CHECK_VALUE(k_in.dim() == rank, "k must be ", layout, ", got shape ", k_in.sizes());
  TORCH_CHECK_VALUE(v_in.sizes() == k_in.sizes(), "v shape ", v_in.sizes(),
                    " must equal k shape ", k_in.sizes());
  const int64_t head_dim = q_in.size(-1);
  const int64_t heads_q = q_in.size(-2);
  const int64_t heads_kv = k_in.size(-2);
  TORCH_CHECK_VALUE(k_in.size(-1) == head_dim, "k head_dim ", k_in.size(-1),
                    " must equal q's head_dim ", head_dim);
  TORCH_CHECK_VALUE(thinkfuse::flash_attention_forward_sm90_head_dim_supported(head_dim),
                    "head_dim ", head_dim,
                    " is not supported by the sm90 flash_attention kernel; expected 64 or 128 "
                    "(flash_attention_fwd takes the others)");
  TORCH_CHECK_VALUE(heads_kv > 0 && heads_q % heads_kv == 0, "q has ", heads_q,
                    " heads, which is not a multiple of k's ", heads_kv,
                    " heads (GQA needs Hq % Hkv == 0)");
  TORCH_CHECK_VALUE(heads_q <= thinkfuse::kFlashAttnMaxGridDim, "at most ",
                    thinkfuse::kFlashAttnMaxGridDim, " query heads are supported, got ", heads_q);
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale) && softmax_scale > 0,
                    "softmax_scale must be finite and > 0, got ", softmax_scale);
  TORCH_CHECK_VALUE(window <= 0 || causal, "a sliding window (window > 0) requires causal=True");

  int64_t batch = 0;
  int sq = 0;
  int sk = 0;
  if (packed) {
    check_cu_seqlens(*cu_seqlens_q, "cu_seqlens_q", device);
    check_cu_seqlens(*cu_seqlens_k, "cu_seqlens_k", device);
    TORCH_CHECK_VALUE(cu_seqlens_k->size(0) == cu_seqlens_q->size(0), "cu_seqlens_k has ",
                      cu_seqlens_k->size(0), " entries but cu_seqlens_q has ",
                      cu_seqlens_q->size(0), "; both must be batch + 1");
    batch = cu_seqlens_q->size(0) - 1;
    sq = checked_seqlen(max_seqlen_q, "max_seqlen_q");
    sk = checked_seqlen(max_seqlen_k, "max_seqlen_k");
    constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max() - 1024;
    TORCH_CHECK_VALUE(q_in.size(0) <= kMaxRows && k_in.size(0) <= kMaxRows,
                      "packed q / k with more than ", kMaxRows,
                      " tokens are not supported by the sm90 kernel (int32 TMA coordinates)");
  } else {
    TORCH_CHECK_VALUE(k_in.size(0) == q_in.size(0), "k batch ", k_in.size(0),
                      " must equal q batch ", q_in.size(0));
    batch = q_in.size(0);
    sq = checked_seqlen(q_in.size(1), "q's sequence length");
    sk = checked_seqlen(k_in.size(1), "k's sequence length");
  }
  TORCH_CHECK_VALUE(batch <= thinkfuse::kFlashAttnMaxGridDim, "at most ",
                    thinkfuse::kFlashAttnMaxGridDim, " sequences are supported, got ", batch);

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor q = with_16B_rows(q_in);
  at::Tensor k = with_16B_rows(k_in);
  at::Tensor v = with_16B_rows(v_in);

  // out contiguous like q. Packed: rows outside every sequence are never written, so out starts
  // at 0 and lse at -inf (as flash_attention_fwd).
  at::Tensor out = packed ? at::zeros(q.sizes(), q.options()) : at::empty(q.sizes(), q.options());
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor lse = packed ? at::full({heads_q, q.size(0)}, -std::numeric_limits<float>::infinity(), f32)
                          : at::empty({batch, heads_q, static_cast<int64_t>(sq)}, f32);
  if (batch == 0 || sq == 0 || q.numel() == 0) return {out, lse};

  thinkfuse::FlashAttnParams p;
  const TokenStrides os = token_strides(out, packed);
  p.out = out.mutable_data_ptr();
  p.o_batch_stride = os.b;
  p.o_seq_stride = os.s;
  p.o_head_stride = os.h;
  p.lse = lse.mutable_data_ptr<float>();
  p.lse_batch_stride = packed ? 0 : stride_or_zero(lse, 0);
  p.lse_head_stride = stride_or_zero(lse, packed ? 0 : 1);
  if (packed) {
    p.cu_seqlens_q = cu_seqlens_q->const_data_ptr<int32_t>();
    p.cu_seqlens_k = cu_seqlens_k->const_data_ptr<int32_t>();
    p.total_q = q.size(0);
    p.total_k = k.size(0);
  }
  p.batch = static_cast<int>(batch);
  p.heads_q = static_cast<int>(heads_q);
  p.heads_kv = static_cast<int>(heads_kv);
  p.group = static_cast<int>(heads_q / heads_kv);
  p.head_dim = static_cast<int>(head_dim);
  p.max_seqlen_q = sq;
  p.max_seqlen_k = sk;
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.causal = causal;
  // A window wider than every sequence hides nothing; clamping keeps it in int range.
  p.window = window <= 0 ? 0
                         : static_cast<int>(std::min<int64_t>(
                               window, int64_t{thinkfuse::kFlashAttnMaxSeqlen} + 1));

  auto set_inputs = [&](const at::Tensor& qq, const at::Tensor& kk, const at::Tensor& vv) {
    const TokenStrides qs = token_strides(qq, packed);
    const TokenStrides ks = token_strides(kk, packed);
    const TokenStrides vs = token_strides(vv, packed);
    p.q = qq.const_data_ptr();
    p.k = kk.const_data_ptr();
    p.v = vv.const_data_ptr();
    p.q_batch_stride = qs.b;
    p.q_seq_stride = qs.s;
    p.q_head_stride = qs.h;
    p.k_batch_stride = ks.b;
    p.k_seq_stride = ks.s;
    p.k_head_stride = ks.h;
    p.v_batch_stride = vs.b;
    p.v_seq_stride = vs.s;
    p.v_head_stride = vs.h;
    // K / V with no token at all: the kernel never reads them, but wants non-null pointers.
    if (kk.numel() == 0) p.k = p.v = qq.const_data_ptr();
  };
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  set_inputs(q, k, v);
  cudaError_t err = thinkfuse::flash_attention_forward_sm90(p, dtype, stream);
  if (err == cudaErrorInvalidPitchValue) {
    // The driver refused a tensor map for these strides: contiguous copies always encode.
    q = q.contiguous();
    k = k.contiguous();
    v = v.contiguous();
    set_inputs(q, k, v);
    err = thinkfuse::flash_attention_forward_sm90(p, dtype, stream);
  }
  TORCH_CHECK_VALUE(err != cudaErrorNotSupported,
                    "flash_attention_fwd_sm90: not supported here (the device must be compute "
                    "capability 9.0, the extension built for sm_90a (TORCH_CUDA_ARCH_LIST with "
                    "9.0a) and the driver able to encode TMA tensor maps): ",
                    cudaGetErrorString(err));
  check_launch(err, "flash_attention_fwd_sm90");
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(thinkfuse_C, m) {
  m.def(
      "flash_attention_fwd_sm90(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? "
      "cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal, int "
      "window) -> (Tensor out, Tensor lse)");
}

TORCH_LIBRARY_IMPL(thinkfuse_C, CUDA, m) {
  m.impl("flash_attention_fwd_sm90", &flash_attention_fwd_sm90);
}
