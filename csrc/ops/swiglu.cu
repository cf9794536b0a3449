// SwiGLU entry points: dtype dispatch onto the templates of thinkfuse/swiglu.cuh. The fused
// gate_up form needs no entry point of its own: the binding passes the two column halves.
#include "thinkfuse/common.cuh"
#include "thinkfuse/ops.h"
#include "thinkfuse/swiglu.cuh"

namespace thinkfuse {
namespace {

bool valid_shape(int64_t rows, int64_t cols) {
  return rows >= 0 && cols >= 0 && cols <= kSwigluMaxCols;
}

}  // namespace

cudaError_t swiglu_forward(const void* gate, int64_t gate_row_stride, const void* up,
                           int64_t up_row_stride, void* y, int64_t y_row_stride, int64_t rows,
                           int64_t cols, DType dtype, cudaStream_t stream) {
  if (!valid_shape(rows, cols)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    swiglu::FwdParams<T> p;
    p.gate = static_cast<const T*>(gate);
    p.gate_stride = gate_row_stride;
    p.up = static_cast<const T*>(up);
    p.up_stride = up_row_stride;
    p.y = static_cast<T*>(y);
    p.y_stride = y_row_stride;
    p.rows = rows;
    p.cols = static_cast<int>(cols);
    return swiglu::forward(p, stream);
  });
}

cudaError_t swiglu_backward(const void* dy, int64_t dy_row_stride, const void* gate,
                            int64_t gate_row_stride, const void* up, int64_t up_row_stride,
                            void* dgate, int64_t dgate_row_stride, void* dup,
                            int64_t dup_row_stride, int64_t rows, int64_t cols, DType dtype,
                            cudaStream_t stream) {
  if (!valid_shape(rows, cols)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    swiglu::BwdParams<T> p;
    p.dy = static_cast<const T*>(dy);
    p.dy_stride = dy_row_stride;
    p.gate = static_cast<const T*>(gate);
    p.gate_stride = gate_row_stride;
    p.up = static_cast<const T*>(up);
    p.up_stride = up_row_stride;
    p.dgate = static_cast<T*>(dgate);
    p.dgate_stride = dgate_row_stride;
    p.dup = static_cast<T*>(dup);
    p.dup_stride = dup_row_stride;
    p.rows = rows;
    p.cols = static_cast<int>(cols);
    return swiglu::backward(p, stream);
  });
}

}  // namespace thinkfuse
