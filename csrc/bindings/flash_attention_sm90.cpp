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
  check_hopper_device(device, "flash_attention_fwd_sm90", "flash_attention_fwd");
  const DType dtype =
      check_half_dtypes(q_in, "sm90 flash_attention kernel", {{"k", &k_in}, {"v", &v_in}});

  const QkvLayout qkv = check_qkv_layout(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k);
  const bool packed = qkv.packed;
  const int64_t head_dim = qkv.head_dim;
  const int64_t heads_q = qkv.heads_q;
  const int64_t heads_kv = qkv.heads_kv;
  TORCH_CHECK_VALUE(thinkfuse::flash_attention_forward_sm90_head_dim_supported(head_dim),
                    "head_dim ", head_dim,
                    " is not supported by the sm90 flash_attention kernel; expected 64 or 128 "
                    "(flash_attention_fwd takes the others)");
  TORCH_CHECK_VALUE(heads_q <= thinkfuse::kFlashAttnMaxGridDim, "at most ",
                    thinkfuse::kFlashAttnMaxGridDim, " query heads are supported, got ", heads_q);
  check_scale_and_window(softmax_scale, causal, window);

  const SeqDims dims =
      seq_dims(q_in, k_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, device);
  const int64_t batch = dims.batch;
  const int sq = dims.sq;
  if (packed) check_hopper_packed_rows(q_in, k_in);
  TORCH_CHECK_VALUE(batch <= thinkfuse::kFlashAttnMaxGridDim, "at most ",
                    thinkfuse::kFlashAttnMaxGridDim, " sequences are supported, got ", batch);

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor q = with_16B_rows(q_in);
  at::Tensor k = with_16B_rows(k_in);
  at::Tensor v = with_16B_rows(v_in);

  auto [out, lse] = forward_outputs(q, dims, heads_q, packed);
  if (batch == 0 || sq == 0 || q.numel() == 0) return {out, lse};

  thinkfuse::FlashAttnParams p;
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  set_out_lse_strides(p, out, lse, packed);
  set_problem(p, dims, heads_q, heads_kv, head_dim, q, k, cu_seqlens_q, cu_seqlens_k, softmax_scale,
              causal, window);

  auto set_inputs = [&](const at::Tensor& qq, const at::Tensor& kk, const at::Tensor& vv) {
    set_qkv(p, qq, kk, vv, packed);
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
  check_hopper_launch(err, "flash_attention_fwd_sm90");
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
