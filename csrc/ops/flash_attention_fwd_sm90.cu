// Flash attention forward for Hopper (flash_attention_fwd_sm90.cuh): argument checks, the TMA
// tensor maps of q / k / v, and the dtype / head-dim dispatch.
//
// Tensor maps and the device check: thinkfuse/sm90_host.cuh. Inputs the TMA cannot take get
// cudaErrorInvalidPitchValue (the binding then retries with contiguous copies).
#include <algorithm>
#include <climits>
#include <cstdint>

#include "thinkfuse/common.cuh"
#include "thinkfuse/flash_attention_fwd_sm90.cuh"
#include "thinkfuse/flash_attention_params.cuh"
#include "thinkfuse/ops.h"
#include "thinkfuse/sm90_host.cuh"

namespace thinkfuse {
namespace {

using sm90_host::check_device;
using sm90_host::check_sm90a_image;
using sm90_host::encode_map;
using sm90_host::tensor_map_encoder;
using sm90_host::TmaDescriptor;

bool valid_params(const FlashAttnParams& p) {
  if (!flash_attention_forward_sm90_head_dim_supported(p.head_dim) || !p.forward_problem_in_range()) {
    return false;
  }
  // TMA coordinates are int32: packed row indices (+ one tile) must fit.
  constexpr int64_t kMaxRows = INT_MAX - 1024;
  return p.cu_seqlens_q == nullptr ||
         (p.total_q >= 0 && p.total_q <= kMaxRows && p.total_k >= 0 && p.total_k <= kMaxRows);
}

template <typename T, int D>
cudaError_t launch(const FlashAttnParams& p, const TmaDescriptor& tma_q,
                   const TmaDescriptor& tma_k, const TmaDescriptor& tma_v, cudaStream_t stream) {
  using Cfg = flash_fwd_sm90::Config<D>;
  auto* kernel = &flash_fwd_sm90::forward_kernel<T, D>;
  constexpr int kRegisterFile =
      128 * Cfg::kProducerRegs + 128 * Cfg::kConsumerWarpgroups * Cfg::kConsumerRegs;
  cudaError_t err = check_sm90a_image(kernel, Cfg::kThreads, kRegisterFile);
  if (err != cudaSuccess) return err;
  static std::atomic<uint64_t> smem_configured{0};
  err = set_max_dynamic_smem_once(kernel, Cfg::kSmemBytes, smem_configured);
  if (err != cudaSuccess) return err;
  const int64_t ctas =
      flash_fwd_sm90::tile_order_ctas(ceil_div(p.max_seqlen_q, Cfg::kBlockM), p.heads_q, p.batch);
  if (ctas < 0) return cudaErrorInvalidValue;
  TF_LAUNCH_KERNEL(static_cast<unsigned>(ctas), Cfg::kThreads, Cfg::kSmemBytes, stream, kernel)(
      p, tma_q, tma_k, tma_v);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_head_dim(const FlashAttnParams& p, const TmaDescriptor& q,
                              const TmaDescriptor& k, const TmaDescriptor& v, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64:
      return launch<T, 64>(p, q, k, v, stream);
    case 128:
      return launch<T, 128>(p, q, k, v, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t flash_attention_forward_sm90(const FlashAttnParams& params, DType dtype,
                                         cudaStream_t stream) {
  if (params.batch == 0 || params.max_seqlen_q == 0) return cudaSuccess;  // nothing to write
  if (!valid_params(params)) return cudaErrorInvalidValue;
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  TF_CUDA_TRY(check_device());
  if (tensor_map_encoder() == nullptr) return cudaErrorNotSupported;
  if (!params.rows_16B_aligned(2)) return cudaErrorInvalidPitchValue;  // fp16 / bf16 rows
  FlashAttnParams p = params;
  // A window at least as long as every key range changes nothing (as flash_attention_forward).
  if (p.window >= p.max_seqlen_k) p.window = 0;

  const bool packed = p.cu_seqlens_q != nullptr;
  const int64_t q_tokens = packed ? p.total_q : p.max_seqlen_q;
  const int64_t k_tokens = packed ? p.total_k : p.max_seqlen_k;
  const int map_batch = packed ? 1 : p.batch;
  using Cfg = flash_fwd_sm90::Config<128>;  // kBlockM / kBlockN do not depend on D
  static_assert(flash_fwd_sm90::Config<64>::kBlockM == Cfg::kBlockM &&
                    flash_fwd_sm90::Config<64>::kBlockN == Cfg::kBlockN,
                "tile rows shared by every head dim");
  TmaDescriptor tma_q{};
  TmaDescriptor tma_k{};
  TmaDescriptor tma_v{};
  if (q_tokens == 0) return cudaSuccess;  // packed q without rows: nothing to write
  TF_CUDA_TRY(encode_map(&tma_q, p.q, dtype, p.head_dim, p.heads_q, q_tokens, map_batch,
                         p.q_head_stride, p.q_seq_stride, p.q_batch_stride, Cfg::kBlockM));
  // No key at all: every tile has k_len = 0 and loads no K / V, so the maps stay unused.
  if (k_tokens > 0) {
    TF_CUDA_TRY(encode_map(&tma_k, p.k, dtype, p.head_dim, p.heads_kv, k_tokens, map_batch,
                           p.k_head_stride, p.k_seq_stride, p.k_batch_stride, Cfg::kBlockN));
    TF_CUDA_TRY(encode_map(&tma_v, p.v, dtype, p.head_dim, p.heads_kv, k_tokens, map_batch,
                           p.v_head_stride, p.v_seq_stride, p.v_batch_stride, Cfg::kBlockN));
  }
  return dtype == DType::kFloat16 ? dispatch_head_dim<__half>(p, tma_q, tma_k, tma_v, stream)
                                  : dispatch_head_dim<__nv_bfloat16>(p, tma_q, tma_k, tma_v, stream);
}

}  // namespace thinkfuse
