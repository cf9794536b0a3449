// Torch binding of the flash-attention backward: torch.ops.thinkfuse_C.flash_attention_bwd.
// Argument checks (ValueError / TypeError naming the argument), output and workspace allocation,
// device guard and stream; the kernels are in csrc/ops/flash_attention_bwd.cu.
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
#include <vector>

#include "attention_common.h"
#include "common.h"
#include "thinkfuse/flash_attention_params.cuh"
#include "thinkfuse/ops.h"

namespace {

using namespace thinkfuse::bindings;

void check_unit_last_stride(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.stride(-1) == 1 || t.size(-1) <= 1 || t.numel() == 0, name,
                    " must have unit stride along its last dimension, got strides ", t.strides());
}

// lse-shaped float32 ([B, Hq, Sq] or [Hq, total_q]); returns it with a unit stride along the
// sequence (a copy only if it had none).
at::Tensor check_lse(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                     const at::Device& device) {
  check_device(t, name, device);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  const int64_t last = t.dim() - 1;
  return t.size(last) <= 1 || t.stride(last) == 1 ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& lse_in,
    const std::optional<at::Tensor>& dlse_in, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double softmax_scale, bool causal, int64_t window) {
  const at::Device device = q_in.device();
  check_device(q_in, "q", device);
  check_device(k_in, "k", device);
  check_device(v_in, "v", device);
  check_device(out, "out", device);
  check_device(dout_in, "dout", device);
  const DType dtype = check_half_dtypes(q_in, "cuda flash_attention backward",
                                        {{"k", &k_in}, {"v", &v_in}, {"out", &out}, {"dout", &dout_in}});

  const QkvLayout qkv = check_qkv_layout(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k);
  const bool packed = qkv.packed;
  TORCH_CHECK_VALUE(out.sizes() == q_in.sizes(), "out shape ", out.sizes(),
                    " must equal q shape ", q_in.sizes());
  TORCH_CHECK_VALUE(dout_in.sizes() == q_in.sizes(), "dout shape ", dout_in.sizes(),
                    " must equal q shape ", q_in.sizes());
  const int64_t head_dim = qkv.head_dim;
  const int64_t heads_q = qkv.heads_q;
  const int64_t heads_kv = qkv.heads_kv;
  TORCH_CHECK_VALUE(thinkfuse::flash_attention_backward_head_dim_supported(head_dim), "head_dim ",
                    head_dim,
                    " is not supported by the cuda flash_attention backward; expected 64, 96 or "
                    "128");
  TORCH_CHECK_VALUE(heads_q <= thinkfuse::kFlashAttnMaxGridDim &&
                        heads_kv <= thinkfuse::kFlashAttnMaxGridDim,
                    "at most ", thinkfuse::kFlashAttnMaxGridDim, " heads are supported, got ",
                    heads_q, " query and ", heads_kv, " key/value heads");
  check_unit_last_stride(q_in, "q");
  check_unit_last_stride(k_in, "k");
  check_unit_last_stride(v_in, "v");
  check_unit_last_stride(out, "out");
  check_unit_last_stride(dout_in, "dout");
  check_scale_and_window(softmax_scale, causal, window);

  const SeqDims dims =
      seq_dims(q_in, k_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, device);
  const int64_t batch = dims.batch;
  const int sq = dims.sq;
  TORCH_CHECK_VALUE(batch <= std::numeric_limits<int>::max(), "batch ", batch, " is too large");
  const std::vector<int64_t> lse_shape =
      packed ? std::vector<int64_t>{heads_q, q_in.size(0)}
             : std::vector<int64_t>{batch, heads_q, static_cast<int64_t>(sq)};
  const at::Tensor lse = check_lse(lse_in, "lse", lse_shape, device);
  std::optional<at::Tensor> dlse;
  if (dlse_in.has_value()) dlse = check_lse(*dlse_in, "dlse", lse_shape, device);

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor q = with_16B_rows(q_in);
  const at::Tensor k = with_16B_rows(k_in);
  const at::Tensor v = with_16B_rows(v_in);
  const at::Tensor dout = with_16B_rows(dout_in);

  // Outputs contiguous like q, k, v. Packed dk/dv start at zero: rows outside every sequence
  // are never written by the kernel (dq's are, by the preprocessing and conversion kernels).
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = packed ? at::zeros(k.sizes(), k.options()) : at::empty(k.sizes(), k.options());
  at::Tensor dv = packed ? at::zeros(v.sizes(), v.options()) : at::empty(v.sizes(), v.options());
  const int64_t rows_q = packed ? q.size(0) : batch * sq;
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq_accum = at::empty({rows_q * heads_q * head_dim}, f32);
  at::Tensor stats = at::empty({2, rows_q * heads_q}, f32);  // lse_log2, delta

  thinkfuse::FlashAttnParams p;
  set_qkv(p, q, k, v, packed);
  p.out = const_cast<void*>(out.const_data_ptr());  // read only by the backward
  p.lse = const_cast<float*>(lse.const_data_ptr<float>());  // read only by the backward
  set_out_lse_strides(p, out, lse, packed);
  set_problem(p, dims, heads_q, heads_kv, head_dim, q, k, cu_seqlens_q, cu_seqlens_k, softmax_scale,
              causal, window);

  thinkfuse::FlashAttnBwdArgs a;
  const TokenStrides ds = token_strides(dout, packed);
  a.dout = dout.const_data_ptr();
  a.do_batch_stride = ds.b;
  a.do_seq_stride = ds.s;
  a.do_head_stride = ds.h;
  if (dlse.has_value()) {
    a.dlse = dlse->const_data_ptr<float>();
    a.dlse_batch_stride = packed ? 0 : stride_or_zero(*dlse, 0);
    a.dlse_head_stride = stride_or_zero(*dlse, packed ? 0 : 1);
  }
  a.dq = dq.mutable_data_ptr();
  a.dk = dk.mutable_data_ptr();
  a.dv = dv.mutable_data_ptr();
  a.dq_accum = dq_accum.mutable_data_ptr<float>();
  a.lse_log2 = stats.mutable_data_ptr<float>();
  a.delta = a.lse_log2 + rows_q * heads_q;

  if (batch > 0 && q.numel() + k.numel() > 0) {
    check_launch(thinkfuse::flash_attention_backward(p, a, dtype,
                                                     c10::cuda::getCurrentCUDAStream().stream()),
                 "flash_attention_bwd");
  } else {
    dq.zero_();
    dk.zero_();
    dv.zero_();
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(thinkfuse_C, m) {
  m.def(
      "flash_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? dlse, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float softmax_scale, bool causal, int window) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(thinkfuse_C, CUDA, m) { m.impl("flash_attention_bwd", &flash_attention_bwd); }
