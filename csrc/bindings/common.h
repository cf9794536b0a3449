// Argument checks shared by the binding translation units (csrc/bindings/*.cpp). Torch-facing;
// never include it from a kernel file.
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstdint>

#include "thinkfuse/ops.h"

namespace thinkfuse::bindings {

using thinkfuse::DType;

inline DType kernel_dtype(at::ScalarType type, const char* name) {
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, name,
                   " must be float32, float16 or bfloat16, got ", type);
  return type == at::kFloat ? DType::kFloat32
         : type == at::kHalf ? DType::kFloat16
                             : DType::kBFloat16;
}

inline DType kernel_dtype(const at::Tensor& t, const char* name) {
  return kernel_dtype(t.scalar_type(), name);
}

inline void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on ", device, " like the other inputs, got ",
                    t.device());
}

// [rows, cols] whose elements are contiguous within a row; rows may be any stride apart.
inline void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name,
                    " must have shape [", rows, ", ", cols, "], got ", t.sizes());
  // An empty tensor's strides mean nothing (an expanded empty gradient has stride 0).
  TORCH_CHECK_VALUE(t.stride(1) == 1 || cols <= 1 || rows == 0, name,
                    " must have unit stride along its last dimension, got strides ", t.strides());
}

struct RowsShape {
  int64_t rows;
  int64_t cols;
};

// A 2-D [rows, cols] CUDA tensor with a unit column stride and at most max_cols columns (the
// kernel's limit); returns its shape.
inline RowsShape check_row_matrix(const at::Tensor& t, const char* name, int64_t max_cols) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D [rows, cols], got shape ", t.sizes());
  const RowsShape shape{t.size(0), t.size(1)};
  check_device(t, name, t.device());
  check_rows(t, name, shape.rows, shape.cols);
  TORCH_CHECK_VALUE(shape.cols <= max_cols, "rows wider than ", max_cols,
                    " elements are not supported, got ", shape.cols);
  return shape;
}

// [rows, cols] with a unit column stride, on like's device and with like's dtype.
inline void check_like_rows(const at::Tensor& t, const char* name, const at::Tensor& like,
                            const char* like_name, int64_t rows, int64_t cols) {
  check_device(t, name, like.device());
  check_rows(t, name, rows, cols);
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, " must have ", like_name,
                   "'s dtype ", like.scalar_type(), ", got ", t.scalar_type());
}

inline void check_vector(const at::Tensor& t, const char* name, int64_t size) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == size, name, " must have shape [", size,
                    "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

// The stride of `dim`, or 0 where that dim has one element (its stride is then meaningless and
// may be anything, e.g. after an expand).
inline int64_t stride_or_zero(const at::Tensor& t, int64_t dim) {
  return t.size(dim) == 1 ? 0 : t.stride(dim);
}

// [B, S, H, D] view for the kernels, with stride_or_zero's strides: an arbitrary stride on a dim
// of one element must not block the vectorised (16-byte) paths, and a [1, S, ...] tensor then
// broadcasts over the batch.
inline thinkfuse::HeadsView heads_view(const at::Tensor& t) {
  return {t.const_data_ptr(), t.size(2), stride_or_zero(t, 0), stride_or_zero(t, 1),
          stride_or_zero(t, 2)};
}

}  // namespace thinkfuse::bindings
