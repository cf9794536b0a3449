// RMSNorm entry points: dtype dispatch onto the templates of thinkfuse/rms_norm.cuh, for every
// (x, weight) pair of float32 / float16 / bfloat16.
#include <type_traits>

#include "thinkfuse/common.cuh"
#include "thinkfuse/ops.h"
#include "thinkfuse/rms_norm.cuh"

namespace thinkfuse {
namespace {

// y's storage type: torch promotes any mixed pair of these three dtypes to float32.
template <typename XT, typename WT>
using RmsNormOut = std::conditional_t<std::is_same_v<XT, WT>, XT, float>;

// Column indices are int in the kernels; the bound leaves headroom for index arithmetic.
bool valid_shape(int64_t rows, int64_t cols) {
  return rows >= 0 && cols >= 0 && cols <= kRmsNormMaxCols;
}

float reciprocal(int64_t cols) { return cols > 0 ? 1.0f / static_cast<float>(cols) : 0.0f; }

}  // namespace

cudaError_t rms_norm_forward(const void* x, int64_t x_row_stride, const void* residual,
                             int64_t res_row_stride, const void* weight, void* y, void* h_out,
                             float* rstd, int64_t rows, int64_t cols, float eps, DType x_dtype,
                             DType w_dtype, cudaStream_t stream) {
  if (!valid_shape(rows, cols) || (residual == nullptr) != (h_out == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(x_dtype, [&](auto x_tag) {
    return dispatch_dtype(w_dtype, [&](auto w_tag) {
      using XT = typename decltype(x_tag)::type;
      using WT = typename decltype(w_tag)::type;
      using OutT = RmsNormOut<XT, WT>;
      rms_norm::FwdParams<XT, WT, OutT> p;
      p.x = static_cast<const XT*>(x);
      p.x_row_stride = x_row_stride;
      p.residual = static_cast<const XT*>(residual);
      p.res_row_stride = res_row_stride;
      p.weight = static_cast<const WT*>(weight);
      p.y = static_cast<OutT*>(y);
      p.h_out = static_cast<XT*>(h_out);
      p.rstd = rstd;
      p.rows = rows;
      p.cols = static_cast<int>(cols);
      p.eps = eps;
      p.inv_cols = reciprocal(cols);
      return rms_norm::forward(p, stream);
    });
  });
}

int64_t rms_norm_backward_workspace_floats(int64_t cols, int device) {
  int sms = 0;
  if (sm_count(device, &sms) != cudaSuccess) return -1;
  return rms_norm::bwd_max_partials(cols, sms) * cols;
}

cudaError_t rms_norm_backward(const void* dy, int64_t dy_row_stride, const void* h,
                              int64_t h_row_stride, const void* weight, const float* rstd,
                              const void* dh, void* dx, void* dw, float* workspace, int64_t rows,
                              int64_t cols, DType x_dtype, DType w_dtype, cudaStream_t stream) {
  if (!valid_shape(rows, cols)) return cudaErrorInvalidValue;
  // The grid size must match the one rms_norm_backward_workspace_floats assumed: both use the
  // SM count of the current device.
  int device = 0;
  int sms = 0;
  TF_CUDA_TRY(current_device_sms(&device, &sms));
  return dispatch_dtype(x_dtype, [&](auto x_tag) {
    return dispatch_dtype(w_dtype, [&](auto w_tag) {
      using XT = typename decltype(x_tag)::type;
      using WT = typename decltype(w_tag)::type;
      using OutT = RmsNormOut<XT, WT>;
      rms_norm::BwdParams<XT, WT, OutT> p;
      p.dy = static_cast<const OutT*>(dy);
      p.dy_row_stride = dy_row_stride;
      p.h = static_cast<const XT*>(h);
      p.h_row_stride = h_row_stride;
      p.weight = static_cast<const WT*>(weight);
      p.rstd = rstd;
      p.dh = static_cast<const XT*>(dh);
      p.dx = static_cast<XT*>(dx);
      p.dw_partial = workspace;
      p.rows = rows;
      p.cols = static_cast<int>(cols);
      p.inv_cols = reciprocal(cols);
      return rms_norm::backward(p, static_cast<WT*>(dw), sms, stream);
    });
  });
}

}  // namespace thinkfuse
