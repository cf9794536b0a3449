// Flash attention backward for Hopper: argument checks, the TMA tensor maps of q / k / v / dout
// (thinkfuse/sm90_host.cuh), and the three launches: the preprocess and convert kernels of
// flash_attention_bwd.cuh around the Hopper dK / dV kernel of flash_attention_bwd_sm90.cuh.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>

#include "thinkfuse/common.cuh"
#include "thinkfuse/flash_attention_bwd.cuh"
#include "thinkfuse/flash_attention_bwd_sm90.cuh"
#include "thinkfuse/flash_attention_params.cuh"
#include "thinkfuse/ops.h"
#include "thinkfuse/sm90_host.cuh"

namespace thinkfuse {
namespace {

using sm90_host::TmaDescriptor;

struct Maps {
  TmaDescriptor q{}, k{}, v{}, dout{};
};

// Whether the runtime's image of the dK / dV kernel is the sm_90a one (checked before the
// preprocess kernel runs, so that a refusal launches nothing).
template <typename T, int D>
cudaError_t check_dkdv_image() {
  using Cfg = flash_bwd_sm90::Config<D>;
  constexpr int kRegisterFile =
      128 * Cfg::kProducerRegs + 128 * Cfg::kConsumerWarpgroups * Cfg::kConsumerRegs;
  return sm90_host::check_sm90a_image(&flash_bwd_sm90::dkdv_kernel<T, D>, Cfg::kThreads,
                                      kRegisterFile);
}

// The CTAs of one (sequence, kv head) pair that should be in flight together: all its key blocks
// up to this many. The H100 run of 2026-11-23 measured the backward at ~2x the time per FLOP
// with 1-2 CTAs of a pair in flight (non-causal, 16 x 1024 and 8 x 2048 tokens) as with 4 or
// more (4 x 4096 and longer), the shared Q / dO tiles and dQ rows then coming from HBM.
constexpr int kPairCtasInFlight = 8;

// (sequence, kv head) pairs per launch chunk (flash_bwd_sm90::launch_order): one chunk (the
// longest key blocks of every pair first) when that already keeps kPairCtasInFlight CTAs of each
// pair in flight on `sms` SMs; else chunks of sms / min(key blocks, kPairCtasInFlight) pairs
// (about one wave of CTAs up to 8 key blocks, key blocks / 8 waves beyond). Long sequences
// (few pairs) keep the one chunk.
// Packed sequences always keep one chunk: their pairs differ in length, and a long sequence in
// a late chunk would start its longest key blocks last. THINKFUSE_SM90_BWD_PAIRS_PER_CHUNK
// overrides the rule (<= 0 or unset: the rule), to compare orders on a GPU.
inline int pairs_per_chunk(int sms, int n_key_blocks, int pairs, bool packed) {
  int chunk = 0;
  if (const char* forced = std::getenv("THINKFUSE_SM90_BWD_PAIRS_PER_CHUNK")) {
    const long value = std::strtol(forced, nullptr, 10);
    chunk = value > 0 && value <= INT_MAX ? static_cast<int>(value) : 0;
  }
  if (chunk <= 0 && packed) chunk = pairs;
  if (chunk <= 0) {
    const int in_flight = std::max(1, std::min(n_key_blocks, kPairCtasInFlight));
    chunk = std::max(1, sms / in_flight);
  }
  return std::min(chunk, pairs);
}

template <typename T, int D>
cudaError_t launch_dkdv(flash_bwd::KernelParams<T> kp, const Maps& maps, cudaStream_t stream) {
  using Cfg = flash_bwd_sm90::Config<D>;
  auto* kernel = &flash_bwd_sm90::dkdv_kernel<T, D>;
  const int n_key_blocks = ceil_div(kp.max_seqlen_k, Cfg::kBlockN);
  const int64_t ctas = static_cast<int64_t>(n_key_blocks) * kp.batch * kp.heads_kv;
  if (ctas == 0) return cudaSuccess;
  if (ctas > INT_MAX) return cudaErrorInvalidValue;
  int device = 0;
  int sms = 0;
  TF_CUDA_TRY(current_device_sms(&device, &sms));
  kp.pairs_per_chunk =
      pairs_per_chunk(sms, n_key_blocks, kp.batch * kp.heads_kv, kp.cu_k != nullptr);
  static std::atomic<uint64_t> smem_configured{0};
  TF_CUDA_TRY(set_max_dynamic_smem_once(kernel, Cfg::kSmemBytes, smem_configured));
  TF_LAUNCH_KERNEL(static_cast<unsigned>(ctas), Cfg::kThreads, Cfg::kSmemBytes, stream, kernel)(
      kp, maps.q, maps.k, maps.v, maps.dout);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run(const FlashAttnParams& p, const FlashAttnBwdArgs& a, const Maps& maps,
                cudaStream_t stream) {
  TF_CUDA_TRY((check_dkdv_image<T, 128>()));
  const flash_bwd::KernelParams<T> kp = flash_bwd::make_kernel_params<T>(p, a);
  TF_CUDA_TRY(flash_bwd::launch_preprocess(kp, p.head_dim, stream));
  TF_CUDA_TRY((launch_dkdv<T, 128>(kp, maps, stream)));
  return flash_bwd::launch_convert(kp, p.head_dim, stream);
}

}  // namespace

cudaError_t flash_attention_backward_sm90(const FlashAttnParams& params,
                                          const FlashAttnBwdArgs& args, DType dtype,
                                          cudaStream_t stream) {
  if (!flash_attention_backward_sm90_head_dim_supported(params.head_dim) ||
      !flash_bwd::problem_in_range(params, args)) {
    return cudaErrorInvalidValue;
  }
  const bool packed = params.is_varlen();
  constexpr int64_t kMaxRows = INT_MAX - 1024;  // TMA coordinates are int32
  if (packed && (params.total_q > kMaxRows || params.total_k > kMaxRows)) {
    return cudaErrorInvalidValue;
  }
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  if (params.batch == 0 || params.heads_q == 0) return cudaSuccess;
  TF_CUDA_TRY(sm90_host::check_device());
  if (sm90_host::tensor_map_encoder() == nullptr) return cudaErrorNotSupported;

  using Cfg = flash_bwd_sm90::Config<128>;
  const int64_t q_tokens = packed ? params.total_q : params.max_seqlen_q;
  const int64_t k_tokens = packed ? params.total_k : params.max_seqlen_k;
  const int map_batch = packed ? 1 : params.batch;
  Maps maps;
  // A tensor without tokens is never read (no CTA has a query / key): its map stays unencoded.
  if (q_tokens > 0) {
    TF_CUDA_TRY(sm90_host::encode_map(&maps.q, params.q, dtype, params.head_dim, params.heads_q,
                                      q_tokens, map_batch, params.q_head_stride,
                                      params.q_seq_stride, params.q_batch_stride, Cfg::kBlockM));
    TF_CUDA_TRY(sm90_host::encode_map(&maps.dout, args.dout, dtype, params.head_dim,
                                      params.heads_q, q_tokens, map_batch, args.do_head_stride,
                                      args.do_seq_stride, args.do_batch_stride, Cfg::kBlockM));
  }
  if (k_tokens > 0) {
    TF_CUDA_TRY(sm90_host::encode_map(&maps.k, params.k, dtype, params.head_dim, params.heads_kv,
                                      k_tokens, map_batch, params.k_head_stride,
                                      params.k_seq_stride, params.k_batch_stride, Cfg::kBlockN));
    TF_CUDA_TRY(sm90_host::encode_map(&maps.v, params.v, dtype, params.head_dim, params.heads_kv,
                                      k_tokens, map_batch, params.v_head_stride,
                                      params.v_seq_stride, params.v_batch_stride, Cfg::kBlockN));
  }
  return dtype == DType::kFloat16 ? run<__half>(params, args, maps, stream)
                                  : run<__nv_bfloat16>(params, args, maps, stream);
}

}  // namespace thinkfuse
