// Torch bindings of the thinkfuse CUDA kernels: argument checks, device guard and stream, and
// registration as torch.ops.thinkfuse_C.*. The only translation unit that includes torch (the
// kernels are compiled without it, see csrc/include/thinkfuse/ops.h).
//
// The checks here are a second line of defence: python/thinkfuse/ops validates arguments first,
// with friendlier messages. They still name the argument, and raise ValueError / TypeError like
// the Python checks do.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "thinkfuse/ops.h"

namespace {

using thinkfuse::DType;

DType kernel_dtype(const at::Tensor& t, const char* name) {
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, name,
                   " must be float32, float16 or bfloat16, got ", type);
  return type == at::kFloat ? DType::kFloat32
         : type == at::kHalf ? DType::kFloat16
                             : DType::kBFloat16;
}

void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on ", device, " like the other inputs, got ",
                    t.device());
}

// [rows, cols] whose elements are contiguous within a row; rows may be any stride apart.
void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name,
                    " must have shape [", rows, ", ", cols, "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.stride(1) == 1 || cols <= 1, name,
                    " must have unit stride along its last dimension, got strides ", t.strides());
}

void check_vector(const at::Tensor& t, const char* name, int64_t size) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == size, name, " must have shape [", size,
                    "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void check_width(int64_t cols) {
  TORCH_CHECK_VALUE(cols <= thinkfuse::kRmsNormMaxCols, "rows wider than ",
                    thinkfuse::kRmsNormMaxCols, " elements are not supported, got ", cols);
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual,
    double eps) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D [rows, cols], got shape ", x.sizes());
  const int64_t rows = x.size(0);
  const int64_t cols = x.size(1);
  check_device(x, "x", x.device());
  check_rows(x, "x", rows, cols);
  check_width(cols);
  const DType x_dtype = kernel_dtype(x, "x");
  check_device(weight, "weight", x.device());
  check_vector(weight, "weight", cols);
  const DType w_dtype = kernel_dtype(weight, "weight");
  if (residual.has_value()) {
    check_device(*residual, "residual", x.device());
    check_rows(*residual, "residual", rows, cols);
    TORCH_CHECK_TYPE(residual->scalar_type() == x.scalar_type(), "residual must have x's dtype ",
                     x.scalar_type(), ", got ", residual->scalar_type());
  }

  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType y_type = at::promote_types(x.scalar_type(), weight.scalar_type());
  at::Tensor y = at::empty({rows, cols}, x.options().dtype(y_type));
  at::Tensor h = residual.has_value() ? at::empty({rows, cols}, x.options())
                                      : at::empty({0}, x.options());
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  check_launch(
      thinkfuse::rms_norm_forward(
          x.const_data_ptr(), x.stride(0),
          residual.has_value() ? residual->const_data_ptr() : nullptr,
          residual.has_value() ? residual->stride(0) : 0, weight.const_data_ptr(),
          y.mutable_data_ptr(), residual.has_value() ? h.mutable_data_ptr() : nullptr,
          rstd.mutable_data_ptr<float>(), rows, cols, static_cast<float>(eps), x_dtype, w_dtype,
          c10::cuda::getCurrentCUDAStream().stream()),
      "rms_norm_fwd");
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& h,
                                                const at::Tensor& weight, const at::Tensor& rstd,
                                                const std::optional<at::Tensor>& dh) {
  TORCH_CHECK_VALUE(h.dim() == 2, "h must be 2-D [rows, cols], got shape ", h.sizes());
  const int64_t rows = h.size(0);
  const int64_t cols = h.size(1);
  check_device(h, "h", h.device());
  check_rows(h, "h", rows, cols);
  check_width(cols);
  const DType x_dtype = kernel_dtype(h, "h");
  check_device(weight, "weight", h.device());
  check_vector(weight, "weight", cols);
  const DType w_dtype = kernel_dtype(weight, "weight");
  check_device(dy, "dy", h.device());
  check_rows(dy, "dy", rows, cols);
  const at::ScalarType y_type = at::promote_types(h.scalar_type(), weight.scalar_type());
  TORCH_CHECK_TYPE(dy.scalar_type() == y_type, "dy must have the forward output's dtype ", y_type,
                   ", got ", dy.scalar_type());
  check_device(rstd, "rstd", h.device());
  check_vector(rstd, "rstd", rows);
  TORCH_CHECK_TYPE(rstd.scalar_type() == at::kFloat, "rstd must be float32, got ",
                   rstd.scalar_type());
  if (dh.has_value()) {
    check_device(*dh, "dh", h.device());
    check_rows(*dh, "dh", rows, cols);
    TORCH_CHECK_VALUE(dh->is_contiguous(), "dh must be contiguous");
    TORCH_CHECK_TYPE(dh->scalar_type() == h.scalar_type(), "dh must have h's dtype ",
                     h.scalar_type(), ", got ", dh->scalar_type());
  }

  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t workspace_floats =
      thinkfuse::rms_norm_backward_workspace_floats(cols, h.device().index());
  TORCH_CHECK(workspace_floats >= 0, "rms_norm_bwd: cannot query the SM count of ", h.device());
  at::Tensor workspace = at::empty({workspace_floats}, h.options().dtype(at::kFloat));
  at::Tensor dx = at::empty({rows, cols}, h.options());
  at::Tensor dw = at::empty({cols}, weight.options());
  check_launch(
      thinkfuse::rms_norm_backward(
          dy.const_data_ptr(), dy.stride(0), h.const_data_ptr(), h.stride(0),
          weight.const_data_ptr(), rstd.const_data_ptr<float>(),
          dh.has_value() ? dh->const_data_ptr() : nullptr, dx.mutable_data_ptr(),
          dw.mutable_data_ptr(), workspace.mutable_data_ptr<float>(), rows, cols, x_dtype, w_dtype,
          c10::cuda::getCurrentCUDAStream().stream()),
      "rms_norm_bwd");
  return {dx, dw};
}

std::string cuda_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
}

}  // namespace

TORCH_LIBRARY(thinkfuse_C, m) {
  m.def(
      "rms_norm_fwd(Tensor x, Tensor weight, Tensor? residual, float eps) "
      "-> (Tensor y, Tensor h, Tensor rstd)");
  m.def(
      "rms_norm_bwd(Tensor dy, Tensor h, Tensor weight, Tensor rstd, Tensor? dh) "
      "-> (Tensor dx, Tensor dw)");
}

TORCH_LIBRARY_IMPL(thinkfuse_C, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
}

// Importing thinkfuse._C loads this library, which registers the ops above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "thinkfuse CUDA kernels, registered as torch.ops.thinkfuse_C.*";
  m.def("cuda_version", &cuda_version, "CUDA toolkit version the extension was built with");
}
