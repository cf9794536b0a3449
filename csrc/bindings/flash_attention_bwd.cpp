// Torch bindings of the flash-attention backward: torch.ops.thinkfuse_C.flash_attention_bwd
// (csrc/ops/flash_attention_bwd.cu, tensor cores, sm80+) and flash_attention_bwd_sm90 (the Hopper
// kernel, csrc/ops/flash_attention_bwd_sm90.cu; same schema). Argument checks (ValueError /
// TypeError naming the argument; for the Hopper op also a device that is not compute capability
// 9.0 and head dims other than 128), output and workspace allocation, device guard and stream.
// The Hopper op retries once with contiguous copies when the driver refuses a tensor map for the
// given strides (cudaErrorInvalidPitchValue), and says "not supported here" when this build or
// driver cannot run it.
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

enum class Kernel { kSm80, kSm90 };

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    Kernel kernel, const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const std::optional<at::Tensor>& dlse_in, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double softmax_scale, bool causal, int64_t window) {
  const at::Device device = q_in.device();
  check_device(q_in, "q", device);
  check_device(k_in, "k", device);
  check_device(v_in, "v", device);
  check_device(out_in, "out", device);
  check_device(dout_in, "dout", device);
  const bool sm90 = kernel == Kernel::kSm90;
  const char* op = sm90 ? "flash_attention_bwd_sm90" : "flash_attention_bwd";
  if (sm90) check_hopper_device(device, op, "flash_attention_bwd");
  const DType dtype = check_half_dtypes(q_in, sm90 ? "sm90 flash_attention backward"
                                                   : "cuda flash_attention backward",
                                        {{"k", &k_in}, {"v", &v_in}, {"out", &out_in},
                                         {"dout", &dout_in}});

  const QkvLayout qkv = check_qkv_layout(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k);
  const bool packed = qkv.packed;
  TORCH_CHECK_VALUE(out_in.sizes() == q_in.sizes(), "out shape ", out_in.sizes(),
                    " must equal q shape ", q_in.sizes());
  TORCH_CHECK_VALUE(dout_in.sizes() == q_in.sizes(), "dout shape ", dout_in.sizes(),
                    " must equal q shape ", q_in.sizes());
  const int64_t head_dim = qkv.head_dim;
  const int64_t heads_q = qkv.heads_q;
  const int64_t heads_kv = qkv.heads_kv;
  if (sm90) {
    TORCH_CHECK_VALUE(thinkfuse::flash_attention_backward_sm90_head_dim_supported(head_dim),
                      "head_dim ", head_dim,
                      " is not supported by the sm90 flash_attention backward; expected 128 "
                      "(flash_attention_bwd takes 64 and 96)");
  } else {
    TORCH_CHECK_VALUE(thinkfuse::flash_attention_backward_head_dim_supported(head_dim),
                      "head_dim ", head_dim,
                      " is not supported by the cuda flash_attention backward; expected 64, 96 or "
                      "128");
  }
  TORCH_CHECK_VALUE(heads_q <= thinkfuse::kFlashAttnMaxGridDim &&
                        heads_kv <= thinkfuse::kFlashAttnMaxGridDim,
                    "at most ", thinkfuse::kFlashAttnMaxGridDim, " heads are supported, got ",
                    heads_q, " query and ", heads_kv, " key/value heads");
  check_unit_last_stride(q_in, "q");
  check_unit_last_stride(k_in, "k");
  check_unit_last_stride(v_in, "v");
  check_unit_last_stride(out_in, "out");
  check_unit_last_stride(dout_in, "dout");
  check_scale_and_window(softmax_scale, causal, window);

  const SeqDims dims =
      seq_dims(q_in, k_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, device);
  const int64_t batch = dims.batch;
  const int sq = dims.sq;
  TORCH_CHECK_VALUE(batch <= std::numeric_limits<int>::max(), "batch ", batch, " is too large");
  if (sm90 && packed) check_hopper_packed_rows(q_in, k_in);
  const std::vector<int64_t> lse_shape =
      packed ? std::vector<int64_t>{heads_q, q_in.size(0)}
             : std::vector<int64_t>{batch, heads_q, static_cast<int64_t>(sq)};
  const at::Tensor lse = check_lse(lse_in, "lse", lse_shape, device);
  std::optional<at::Tensor> dlse;
  if (dlse_in.has_value()) dlse = check_lse(*dlse_in, "dlse", lse_shape, device);

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor q = with_16B_rows(q_in);
  at::Tensor k = with_16B_rows(k_in);
  at::Tensor v = with_16B_rows(v_in);
  at::Tensor dout = with_16B_rows(dout_in);
  // The launchers check out's rows like q's (FlashAttnParams::rows_16B_aligned), though the
  // kernels read it element-wise: an out at an odd offset would be refused, not read.
  const at::Tensor out = with_16B_rows(out_in);

  // Outputs contiguous like q, k, v. Packed dk/dv start at zero: rows outside every sequence
  // are never written by the kernel (dq's are, by the preprocessing and conversion kernels).
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = packed ? at::zeros(k.sizes(), k.options()) : at::empty(k.sizes(), k.options());
  at::Tensor dv = packed ? at::zeros(v.sizes(), v.options()) : at::empty(v.sizes(), v.options());
  // No query (Sq = 0, total_q = 0 or Hq = 0, whose GQA group 0 the launchers refuse) or no key:
  // nothing depends on the other side, every gradient is 0.
  if (batch == 0 || q.numel() == 0 || k.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const int64_t rows_q = packed ? q.size(0) : batch * sq;
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq_accum = at::empty({rows_q * heads_q * head_dim}, f32);
  at::Tensor stats = at::empty({2, rows_q * heads_q}, f32);  // lse_log2, delta

  thinkfuse::FlashAttnParams p;
  p.out = const_cast<void*>(out.const_data_ptr());  // read only by the backward
  p.lse = const_cast<float*>(lse.const_data_ptr<float>());  // read only by the backward
  set_out_lse_strides(p, out, lse, packed);
  set_problem(p, dims, heads_q, heads_kv, head_dim, q, k, cu_seqlens_q, cu_seqlens_k, softmax_scale,
              causal, window);

  thinkfuse::FlashAttnBwdArgs a;
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
  auto set_inputs = [&]() {
    set_qkv(p, q, k, v, packed);
    const TokenStrides ds = token_strides(dout, packed);
    a.dout = dout.const_data_ptr();
    a.do_batch_stride = ds.b;
    a.do_seq_stride = ds.s;
    a.do_head_stride = ds.h;
  };
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  set_inputs();
  if (!sm90) {
    check_launch(thinkfuse::flash_attention_backward(p, a, dtype, stream), op);
    return {dq, dk, dv};
  }
  cudaError_t err = thinkfuse::flash_attention_backward_sm90(p, a, dtype, stream);
  if (err == cudaErrorInvalidPitchValue) {
    // The driver refused a tensor map for these strides: contiguous copies always encode.
    q = q.contiguous();
    k = k.contiguous();
    v = v.contiguous();
    dout = dout.contiguous();
    set_inputs();
    err = thinkfuse::flash_attention_backward_sm90(p, a, dtype, stream);
  }
  check_hopper_launch(err, op);
  return {dq, dk, dv};
}

// The registered ops: the schema's arguments, the kernel fixed.
template <Kernel kKernel>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal,
    int64_t window) {
  return backward(kKernel, dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k,
                  max_seqlen_q, max_seqlen_k, softmax_scale, causal, window);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(thinkfuse_C, m) {
  m.def(
      "flash_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? dlse, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float softmax_scale, bool causal, int window) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "flash_attention_bwd_sm90(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? dlse, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float softmax_scale, bool causal, int window) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(thinkfuse_C, CUDA, m) {
  m.impl("flash_attention_bwd", &backward_op<Kernel::kSm80>);
  m.impl("flash_attention_bwd_sm90", &backward_op<Kernel::kSm90>);
}
