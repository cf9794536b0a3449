#!/usr/bin/env bash
# Compile-only check of the CUDA extension sources; needs nvcc and a torch install (a CPU wheel
# is enough: it ships the ATen/c10 CUDA headers), no GPU.
#   - every csrc/ops/*.cu with nvcc for sm_80 and sm_90a (the archs setup.py builds), warnings
#     as errors, with torch's half/bfloat16 restrictions defined so the kernels cannot rely on
#     implicit conversions either way;
#   - csrc/torch_bindings.cpp and csrc/bindings/*.cpp with the host compiler, against torch's and CUDA's headers.
# Uses `python` from PATH (CI activates a venv). Exits non-zero on the first failure.
# Usage: bash scripts/check_cuda.sh   (NVCC, CUDA_HOME and CXX override the tools)
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [[ -z "${NVCC:-}" ]]; then
  NVCC=$(command -v nvcc || true)
  [[ -n "$NVCC" ]] || NVCC="$CUDA_HOME/bin/nvcc"
fi
[[ -x "$NVCC" ]] || { echo "check_cuda: nvcc not found (set NVCC or CUDA_HOME)" >&2; exit 1; }
CXX=${CXX:-g++}

read -r TORCH_ABI PYTHON_INCLUDE < <(python - <<'PY'
import sysconfig
import torch
print(int(torch._C._GLIBCXX_USE_CXX11_ABI), sysconfig.get_paths()["include"])
PY
)
mapfile -t TORCH_INCLUDES < <(python -c \
  "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
TORCH_ISYSTEM=()
for dir in "${TORCH_INCLUDES[@]}"; do TORCH_ISYSTEM+=(-isystem "$dir"); done

NVCC_FLAGS=(
  -std=c++17 -O3 --use_fast_math --expt-relaxed-constexpr
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -Werror all-warnings -Xcompiler -Wall,-Wextra
  -I csrc/include
)
# One nvcc per (arch, source), in batches of JOBS (default: the CPU count); each is waited for by
# pid, so every failure is seen.
JOBS=${JOBS:-$(nproc)}
failed=0
batch=()
wait_batch() {
  local pid
  for pid in "${batch[@]}"; do wait "$pid" || failed=1; done
  batch=()
}
for arch in sm_80 sm_90a; do
  for src in csrc/ops/*.cu; do
    echo "nvcc -arch=$arch $src"
    "$NVCC" -c -arch="$arch" "${NVCC_FLAGS[@]}" "$src" -o /dev/null &
    batch+=($!)
    [[ ${#batch[@]} -lt $JOBS ]] || wait_batch
  done
done
wait_batch
[[ $failed -eq 0 ]] || { echo "check_cuda: an nvcc compile failed (see above)" >&2; exit 1; }

# The CPU wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h (it only matters for
# Windows DLL exports); C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips its include.
for src in csrc/torch_bindings.cpp csrc/bindings/*.cpp; do
  [[ -e "$src" ]] || continue
  echo "$CXX -fsyntax-only $src"
  "$CXX" -fsyntax-only -std=c++17 -Wall -Wextra -Werror \
    -D_GLIBCXX_USE_CXX11_ABI="$TORCH_ABI" -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
    -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
    -I csrc/include "${TORCH_ISYSTEM[@]}" -isystem "$CUDA_HOME/include" -isystem "$PYTHON_INCLUDE" \
    "$src"
done

echo "check_cuda: all CUDA sources compile"
