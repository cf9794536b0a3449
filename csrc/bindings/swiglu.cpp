// Torch bindings of SwiGLU forward/backward (thinkfuse/ops.h), on separate gate/up tensors and
// on one fused [rows, 2N] gate_up tensor (its halves are read in place).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "common.h"
#include "thinkfuse/ops.h"

namespace {

using namespace thinkfuse::bindings;

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  const auto [rows, cols] = check_row_matrix(gate, "gate", thinkfuse::kSwigluMaxCols);
  const DType dtype = kernel_dtype(gate, "gate");
  check_like_rows(up, "up", gate, "gate", rows, cols);

  const c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor y = at::empty({rows, cols}, gate.options());
  check_launch(thinkfuse::swiglu_forward(gate.const_data_ptr(), gate.stride(0),
                                         up.const_data_ptr(), up.stride(0), y.mutable_data_ptr(),
                                         cols, rows, cols, dtype,
                                         c10::cuda::getCurrentCUDAStream().stream()),
               "swiglu_fwd");
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& gate,
                                              const at::Tensor& up) {
  const auto [rows, cols] = check_row_matrix(gate, "gate", thinkfuse::kSwigluMaxCols);
  const DType dtype = kernel_dtype(gate, "gate");
  check_like_rows(up, "up", gate, "gate", rows, cols);
  check_like_rows(dy, "dy", gate, "gate", rows, cols);

  const c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor dgate = at::empty({rows, cols}, gate.options());
  at::Tensor dup = at::empty({rows, cols}, gate.options());
  check_launch(thinkfuse::swiglu_backward(dy.const_data_ptr(), dy.stride(0),
                                          gate.const_data_ptr(), gate.stride(0),
                                          up.const_data_ptr(), up.stride(0),
                                          dgate.mutable_data_ptr(), cols, dup.mutable_data_ptr(),
                                          cols, rows, cols, dtype,
                                          c10::cuda::getCurrentCUDAStream().stream()),
               "swiglu_bwd");
  return {dgate, dup};
}

// gate_up [rows, 2N]: returns N. gate is its first column half, up the second.
int64_t check_gate_up(const at::Tensor& gate_up) {
  TORCH_CHECK_VALUE(gate_up.dim() == 2, "gate_up must be 2-D [rows, 2 * N], got shape ",
                    gate_up.sizes());
  check_device(gate_up, "gate_up", gate_up.device());
  check_rows(gate_up, "gate_up", gate_up.size(0), gate_up.size(1));
  TORCH_CHECK_VALUE(gate_up.size(1) % 2 == 0,
                    "gate_up's last dim must be even (gate and up halves), got ", gate_up.size(1));
  const int64_t cols = gate_up.size(1) / 2;
  TORCH_CHECK_VALUE(cols <= thinkfuse::kSwigluMaxCols, "rows wider than ",
                    thinkfuse::kSwigluMaxCols, " elements are not supported, got ", cols);
  return cols;
}

at::Tensor swiglu_fused_fwd(const at::Tensor& gate_up) {
  const int64_t cols = check_gate_up(gate_up);
  const int64_t rows = gate_up.size(0);
  const DType dtype = kernel_dtype(gate_up, "gate_up");

  const c10::cuda::CUDAGuard guard(gate_up.device());
  const at::Tensor gate = gate_up.narrow(1, 0, cols);
  const at::Tensor up = gate_up.narrow(1, cols, cols);
  at::Tensor y = at::empty({rows, cols}, gate_up.options());
  check_launch(thinkfuse::swiglu_forward(gate.const_data_ptr(), gate_up.stride(0),
                                         up.const_data_ptr(), gate_up.stride(0),
                                         y.mutable_data_ptr(), cols, rows, cols, dtype,
                                         c10::cuda::getCurrentCUDAStream().stream()),
               "swiglu_fused_fwd");
  return y;
}

at::Tensor swiglu_fused_bwd(const at::Tensor& dy, const at::Tensor& gate_up) {
  const int64_t cols = check_gate_up(gate_up);
  const int64_t rows = gate_up.size(0);
  const DType dtype = kernel_dtype(gate_up, "gate_up");
  check_like_rows(dy, "dy", gate_up, "gate_up", rows, cols);

  const c10::cuda::CUDAGuard guard(gate_up.device());
  const at::Tensor gate = gate_up.narrow(1, 0, cols);
  const at::Tensor up = gate_up.narrow(1, cols, cols);
  at::Tensor dgate_up = at::empty({rows, 2 * cols}, gate_up.options());
  at::Tensor dgate = dgate_up.narrow(1, 0, cols);
  at::Tensor dup = dgate_up.narrow(1, cols, cols);
  check_launch(thinkfuse::swiglu_backward(dy.const_data_ptr(), dy.stride(0),
                                          gate.const_data_ptr(), gate_up.stride(0),
                                          up.const_data_ptr(), gate_up.stride(0),
                                          dgate.mutable_data_ptr(), 2 * cols,
                                          dup.mutable_data_ptr(), 2 * cols, rows, cols, dtype,
                                          c10::cuda::getCurrentCUDAStream().stream()),
               "swiglu_fused_bwd");
  return dgate_up;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(thinkfuse_C, m) {
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor y");
  m.def("swiglu_bwd(Tensor dy, Tensor gate, Tensor up) -> (Tensor dgate, Tensor dup)");
  m.def("swiglu_fused_fwd(Tensor gate_up) -> Tensor y");
  m.def("swiglu_fused_bwd(Tensor dy, Tensor gate_up) -> Tensor dgate_up");
}

TORCH_LIBRARY_IMPL(thinkfuse_C, CUDA, m) {
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
  m.impl("swiglu_fused_fwd", &swiglu_fused_fwd);
  m.impl("swiglu_fused_bwd", &swiglu_fused_bwd);
}
