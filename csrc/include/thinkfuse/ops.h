// C-style entry points of the thinkfuse CUDA kernels.
//
// Plain C++: callers (torch_bindings.cpp) need neither nvcc nor torch to include it. Pointers
// are device pointers; row strides count elements; every function only enqueues work on
// `stream` and returns the launch status (cudaSuccess, or the error to report).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace thinkfuse {

// Storage dtypes the kernels are instantiated for.
enum class DType { kFloat32, kFloat16, kBFloat16 };

// ---------------------------------------------------------------------------------------------
// RMSNorm (Hugging Face semantics), optionally fused with the residual add:
//   h = x + residual (rounded to x's dtype)          or h = x without residual
//   rstd = rsqrt(mean(float(h)^2) + eps)              float32
//   y = float(weight) * float(to_x_dtype(float(h) * rstd)), stored in y's dtype
// y's dtype is x_dtype when x_dtype == w_dtype, else float32 (torch's type promotion).
// Invalid shapes (negative sizes, cols > kRmsNormMaxCols) return cudaErrorInvalidValue.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kRmsNormMaxCols = int64_t{1} << 30;

// x, residual: [rows, cols], unit column stride, any row stride. residual has x's dtype.
// weight: [cols]. y, h_out: contiguous [rows, cols]. rstd: [rows].
// residual and h_out are both nullptr (plain norm) or both given (fused add; h_out receives h).
cudaError_t rms_norm_forward(const void* x, int64_t x_row_stride, const void* residual,
                             int64_t res_row_stride, const void* weight, void* y, void* h_out,
                             float* rstd, int64_t rows, int64_t cols, float eps, DType x_dtype,
                             DType w_dtype, cudaStream_t stream);

// Number of floats of workspace rms_norm_backward needs for rows of `cols` elements on
// `device` (the device that will run the backward). Returns -1 if the device cannot be queried.
int64_t rms_norm_backward_workspace_floats(int64_t cols, int device);

// dy: [rows, cols] in y's dtype, unit column stride. h: [rows, cols] (x_dtype), unit column
// stride: the normalised input (x, or x + residual). rstd: [rows] from the forward.
// dh: nullptr, or a contiguous [rows, cols] gradient (x_dtype) flowing into the h output of the
// fused-residual forward; it is added to dx. dx: contiguous [rows, cols] (x_dtype).
// dw: [cols] (w_dtype). workspace: rms_norm_backward_workspace_floats(cols, current device)
// floats, no initialisation needed (16-byte alignment enables the vectorised kernels).
// rows == 0 is valid (dw becomes zeros).
cudaError_t rms_norm_backward(const void* dy, int64_t dy_row_stride, const void* h,
                              int64_t h_row_stride, const void* weight, const float* rstd,
                              const void* dh, void* dx, void* dw, float* workspace, int64_t rows,
                              int64_t cols, DType x_dtype, DType w_dtype, cudaStream_t stream);

}  // namespace thinkfuse
