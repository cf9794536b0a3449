// Flash attention forward entry point: dtype / head-dim dispatch onto the templates of
// thinkfuse/flash_attention_fwd.cuh.
#include "thinkfuse/common.cuh"
#include "thinkfuse/flash_attention_fwd.cuh"
#include "thinkfuse/flash_attention_params.cuh"
#include "thinkfuse/ops.h"

namespace thinkfuse {
namespace {

template <typename T>
cudaError_t dispatch_head_dim(const FlashAttnParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 16:
      return flash_fwd::launch<T, 16>(p, stream);
    case 32:
      return flash_fwd::launch<T, 32>(p, stream);
    case 64:
      return flash_fwd::launch<T, 64>(p, stream);
    case 96:
      return flash_fwd::launch<T, 96>(p, stream);
    case 128:
      return flash_fwd::launch<T, 128>(p, stream);
    case 256:
      return flash_fwd::launch<T, 256>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

bool valid_params(const FlashAttnParams& p) {
  return flash_attention_forward_head_dim_supported(p.head_dim) && p.forward_problem_in_range() &&
         p.rows_16B_aligned(2);
}

}  // namespace

cudaError_t flash_attention_forward(const FlashAttnParams& params, DType dtype,
                                    cudaStream_t stream) {
  if (params.batch == 0 || params.max_seqlen_q == 0) return cudaSuccess;  // nothing to write
  if (!valid_params(params)) return cudaErrorInvalidValue;
  static_assert(flash_fwd::kMaxSeqlen == kFlashAttnMaxSeqlen, "one limit");
  FlashAttnParams p = params;
  // A window at least as long as every key range changes nothing (a row sits at key position
  // <= k_len - 1, so keys j > pos - window >= -1 are all visible): drop it.
  if (p.window >= p.max_seqlen_k) p.window = 0;
  switch (dtype) {
    case DType::kFloat16:
      return dispatch_head_dim<__half>(p, stream);
    case DType::kBFloat16:
      return dispatch_head_dim<__nv_bfloat16>(p, stream);
    case DType::kFloat32:
      break;
  }
  return cudaErrorInvalidValue;  // float32 has no tensor-core kernel
}

}  // namespace thinkfuse
