// Torch bindings of RMSNorm forward/backward (thinkfuse/ops.h): argument checks, the dweight
// workspace, device guard and stream; registered as torch.ops.thinkfuse_C.rms_norm_{fwd,bwd}.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "common.h"
#include "thinkfuse/ops.h"

namespace {

using namespace thinkfuse::bindings;

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual,
    double eps) {
  const auto [rows, cols] = check_row_matrix(x, "x", thinkfuse::kRmsNormMaxCols);
  const DType x_dtype = kernel_dtype(x, "x");
  check_device(weight, "weight", x.device());
  check_vector(weight, "weight", cols);
  const DType w_dtype = kernel_dtype(weight, "weight");
  if (residual.has_value()) check_like_rows(*residual, "residual", x, "x", rows, cols);

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
  const auto [rows, cols] = check_row_matrix(h, "h", thinkfuse::kRmsNormMaxCols);
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
    check_like_rows(*dh, "dh", h, "h", rows, cols);
    TORCH_CHECK_VALUE(dh->is_contiguous(), "dh must be contiguous");
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(thinkfuse_C, m) {
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
