// Flash-attention backward entry point: argument validation and dtype dispatch onto the
// templates of thinkfuse/flash_attention_bwd.cuh.
#include <cstdint>

#include "thinkfuse/common.cuh"
#include "thinkfuse/flash_attention_bwd.cuh"
#include "thinkfuse/flash_attention_params.cuh"
#include "thinkfuse/ops.h"

namespace thinkfuse {
namespace {

bool valid_problem(const FlashAttnParams& p) {
  if (!flash_attention_backward_head_dim_supported(p.head_dim)) return false;
  if (p.batch < 0 || p.heads_q < 0 || p.heads_kv < 0 || p.max_seqlen_q < 0 ||
      p.max_seqlen_k < 0 || p.total_q < 0 || p.total_k < 0) {
    return false;
  }
  if (p.max_seqlen_q > kFlashAttnMaxSeqlen || p.max_seqlen_k > kFlashAttnMaxSeqlen) return false;
  if (p.heads_kv > kFlashAttnMaxGridDim) return false;
  if (p.heads_kv > 0 && (p.group < 1 || p.heads_q != p.group * p.heads_kv)) return false;
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr)) return false;
  if (!p.rows_16B_aligned(2)) return false;  // both backward dtypes are 2-byte
  if (p.total_q > kFlashAttnMaxSeqlen * int64_t{1024} ||
      p.total_k > kFlashAttnMaxSeqlen * int64_t{1024}) {
    return false;
  }
  return true;
}

template <typename T>
flash_bwd::KernelParams<T> kernel_params(const FlashAttnParams& p, const FlashAttnBwdArgs& a) {
  flash_bwd::KernelParams<T> k{};
  const bool packed = p.is_varlen();
  k.q = static_cast<const T*>(p.q);
  k.k = static_cast<const T*>(p.k);
  k.v = static_cast<const T*>(p.v);
  k.out = static_cast<const T*>(p.out);
  k.dout = static_cast<const T*>(a.dout);
  // Packed layouts have no batch dim: batch strides are 0 (the sequence offset moves instead).
  k.q_bs = packed ? 0 : p.q_batch_stride;
  k.q_ss = p.q_seq_stride;
  k.q_hs = p.q_head_stride;
  k.k_bs = packed ? 0 : p.k_batch_stride;
  k.k_ss = p.k_seq_stride;
  k.k_hs = p.k_head_stride;
  k.v_bs = packed ? 0 : p.v_batch_stride;
  k.v_ss = p.v_seq_stride;
  k.v_hs = p.v_head_stride;
  k.o_bs = packed ? 0 : p.o_batch_stride;
  k.o_ss = p.o_seq_stride;
  k.o_hs = p.o_head_stride;
  k.do_bs = packed ? 0 : a.do_batch_stride;
  k.do_ss = a.do_seq_stride;
  k.do_hs = a.do_head_stride;
  k.lse = p.lse;
  k.lse_bs = packed ? 0 : p.lse_batch_stride;
  k.lse_hs = p.lse_head_stride;
  k.dlse = a.dlse;
  k.dlse_bs = packed ? 0 : a.dlse_batch_stride;
  k.dlse_hs = a.dlse_head_stride;
  k.lse_log2 = a.lse_log2;
  k.delta = a.delta;
  // Workspaces: contiguous [B, Hq, Sq] or [Hq, total_q].
  k.ws_bs = packed ? 0 : static_cast<int64_t>(p.heads_q) * p.max_seqlen_q;
  k.ws_hs = packed ? p.total_q : p.max_seqlen_q;
  k.dq_accum = a.dq_accum;
  k.dq = static_cast<T*>(a.dq);
  k.dk = static_cast<T*>(a.dk);
  k.dv = static_cast<T*>(a.dv);
  k.cu_q = p.cu_seqlens_q;
  k.cu_k = p.cu_seqlens_k;
  k.total_q = p.total_q;
  k.total_k = p.total_k;
  k.rows_q = packed ? p.total_q : static_cast<int64_t>(p.batch) * p.max_seqlen_q;
  k.batch = p.batch;
  k.heads_q = p.heads_q;
  k.heads_kv = p.heads_kv;
  k.group = p.group;
  k.max_seqlen_q = p.max_seqlen_q;
  k.max_seqlen_k = p.max_seqlen_k;
  k.window = p.window > 0 ? p.window : 0;
  k.causal = p.causal;
  k.scale = p.softmax_scale;
  k.scale_log2 = p.softmax_scale * flash_bwd::kLog2e;
  return k;
}

}  // namespace

cudaError_t flash_attention_backward(const FlashAttnParams& params, const FlashAttnBwdArgs& args,
                                     DType dtype, cudaStream_t stream) {
  if (!valid_problem(params)) return cudaErrorInvalidValue;
  if (params.batch == 0 || params.heads_q == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat16:
      return flash_bwd::backward(kernel_params<__half>(params, args), params.head_dim, stream);
    case DType::kBFloat16:
      return flash_bwd::backward(kernel_params<__nv_bfloat16>(params, args), params.head_dim,
                                 stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace thinkfuse
