// Torch binding of the flash-attention forward: torch.ops.thinkfuse_C.flash_attention_fwd.
// Argument checks (ValueError / TypeError naming the argument), output allocation, device guard
// and stream; the kernels are in csrc/include/thinkfuse/flash_attention_fwd.cuh.
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

std::tuple<at::Tensor, at::Tensor> flash_attention_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal,
    int64_t window) {
  const at::Device device = q_in.device();
  check_device(q_in, "q", device);
  check_device(k_in, "k", device);
  check_device(v_in, "v", device);
  const DType dtype =
      check_half_dtypes(q_in, "cuda flash_attention kernel", {{"k", &k_in}, {"v", &v_in}});

  const QkvLayout qkv = check_qkv_layout(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k);
  const bool packed = qkv.packed;
  const int64_t head_dim = qkv.head_dim;
  const int64_t heads_q = qkv.heads_q;
  const int64_t heads_kv = qkv.heads_kv;
  TORCH_CHECK_VALUE(thinkfuse::flash_attention_forward_head_dim_supported(head_dim), "head_dim ",
                    head_dim,
                    " is not supported by the cuda flash_attention kernel; expected one of 16, "
                    "32, 64, 96, 128, 256");
  TORCH_CHECK_VALUE(heads_q <= thinkfuse::kFlashAttnMaxGridDim, "at most ",
                    thinkfuse::kFlashAttnMaxGridDim, " query heads are supported, got ", heads_q);
  check_scale_and_window(softmax_scale, causal, window);

  const SeqDims dims =
      seq_dims(q_in, k_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, device);
  const int64_t batch = dims.batch;
  const int sq = dims.sq;
  TORCH_CHECK_VALUE(batch <= thinkfuse::kFlashAttnMaxGridDim, "at most ",
                    thinkfuse::kFlashAttnMaxGridDim, " sequences are supported, got ", batch);

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor q = with_16B_rows(q_in);
  const at::Tensor k = with_16B_rows(k_in);
  const at::Tensor v = with_16B_rows(v_in);

  auto [out, lse] = forward_outputs(q, dims, heads_q, packed);
  if (batch == 0 || sq == 0 || q.numel() == 0) return {out, lse};

  thinkfuse::FlashAttnParams p;
  set_qkv(p, q, k, v, packed);
  // K / V with no token at all: the kernel never reads them, but wants non-null pointers.
  if (k.numel() == 0) p.k = p.v = q.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  set_out_lse_strides(p, out, lse, packed);
  set_problem(p, dims, heads_q, heads_kv, head_dim, q, k, cu_seqlens_q, cu_seqlens_k, softmax_scale,
              causal, window);
  check_launch(thinkfuse::flash_attention_forward(p, dtype,
                                                  c10::cuda::getCurrentCUDAStream().stream()),
               "flash_attention_fwd");
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(thinkfuse_C, m) {
  m.def(
      "flash_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? "
      "cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal, int "
      "window) -> (Tensor out, Tensor lse)");
}

TORCH_LIBRARY_IMPL(thinkfuse_C, CUDA, m) { m.impl("flash_attention_fwd", &flash_attention_fwd); }
