// The thinkfuse CUDA extension's library and Python module. Importing thinkfuse._C loads the
// shared object, whose static initialisers register every op as torch.ops.thinkfuse_C.*.
//
// The ops themselves live in csrc/bindings/, one file per op group, each adding its schemas and
// CUDA implementations with TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL; their shared argument
// checks are in csrc/bindings/common.h. Only binding files include torch (the kernels are
// compiled without it, see csrc/include/thinkfuse/ops.h).
//
// The binding checks are a second line of defence: python/thinkfuse/ops validates arguments
// first, with friendlier messages. They still name the argument, and raise ValueError /
// TypeError like the Python checks do.
#include <cuda_runtime_api.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

namespace {

std::string cuda_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
}

}  // namespace

// The namespace's one TORCH_LIBRARY block; the schemas are defined beside their implementations.
TORCH_LIBRARY(thinkfuse_C, m) { (void)m; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "thinkfuse CUDA kernels, registered as torch.ops.thinkfuse_C.*";
  m.def("cuda_version", &cuda_version, "CUDA toolkit version the extension was built with");
}
