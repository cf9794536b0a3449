// Flash-attention backward entry point: argument validation and dtype dispatch onto the
// templates of thinkfuse/flash_attention_bwd.cuh.
#include <cstdint>

#include "thinkfuse/common.cuh"
#include "thinkfuse/flash_attention_bwd.cuh"
#include "thinkfuse/flash_attention_params.cuh"
#include "thinkfuse/ops.h"

namespace thinkfuse {

cudaError_t flash_attention_backward(const FlashAttnParams& params, const FlashAttnBwdArgs& args,
                                     DType dtype, cudaStream_t stream) {
  if (!flash_attention_backward_head_dim_supported(params.head_dim) ||
      !flash_bwd::problem_in_range(params, args)) {
    return cudaErrorInvalidValue;
  }
  if (params.batch == 0 || params.heads_q == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat16:
      return flash_bwd::backward(flash_bwd::make_kernel_params<__half>(params, args),
                                 params.head_dim, stream);
    case DType::kBFloat16:
      return flash_bwd::backward(flash_bwd::make_kernel_params<__nv_bfloat16>(params, args),
                                 params.head_dim, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace thinkfuse
