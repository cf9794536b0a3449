// Host side of the Hopper kernels (flash_attention_{fwd,bwd}_sm90): the driver's TMA tensor-map
// encoder, the tensor maps of [batch][tokens][heads][head_dim] tensors, and the device check.
//
// Tensor maps: cuTensorMapEncodeTiled is a driver API entry point; it is fetched through the
// runtime (cudaGetDriverEntryPointByVersion), so the extension does not link libcuda. Each map
// is 4-D, innermost first: (head_dim, head, token, batch) with the tensor's own byte strides,
// box (64, 1, rows, 1) (64 elements = 128 bytes: the 128-byte swizzle's widest box), 128-byte
// swizzle, out-of-bounds elements filled with zeros. Padded layout: token = position in the
// sequence (max_seqlen), batch = B. Packed layout: token = row of the packed tensor (total), a
// single batch entry. A dimension of one element gets a placeholder stride (its index is always
// 0), so broadcast / size-1 strides never reach the driver.
//
// TMA needs a 16-byte aligned base and 16-byte multiple strides: other inputs get
// cudaErrorInvalidPitchValue, and so does a layout the driver refuses to encode (the bindings
// then retry with contiguous copies); another driver error (no current context, say) comes back
// as itself. THINKFUSE_DEBUG_TMA=1 prints each refusal of the driver (its CUresult, dims,
// strides) to stderr.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "thinkfuse/common.cuh"
#include "thinkfuse/flash_attention_fwd_sm90.cuh"  // TmaDescriptor
#include "thinkfuse/ops.h"

namespace thinkfuse {
namespace sm90_host {

using flash_fwd_sm90::TmaDescriptor;
static_assert(sizeof(CUtensorMap) == sizeof(TmaDescriptor), "TmaDescriptor mirrors CUtensorMap");
static_assert(alignof(CUtensorMap) <= alignof(TmaDescriptor), "TmaDescriptor mirrors CUtensorMap");

// A driver API entry point (ABI of CUDA 12.0), fetched through the runtime; nullptr if the
// driver lacks it.
inline void* driver_entry_point(const char* symbol) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
  const cudaError_t err =
      cudaGetDriverEntryPointByVersion(symbol, &fn, 12000, cudaEnableDefault, &status);
#else
  const cudaError_t err = cudaGetDriverEntryPoint(symbol, &fn, cudaEnableDefault, &status);
#endif
  if (err != cudaSuccess || status != cudaDriverEntryPointSuccess) {
    (void)cudaGetLastError();  // not sticky; do not leak it into the next launch check
    return nullptr;
  }
  return fn;
}

// The driver's cuTensorMapEncodeTiled, or nullptr if the driver lacks it.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const auto encoder = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(
      driver_entry_point("cuTensorMapEncodeTiled"));
  return encoder;
}

// Makes the current device's primary context current on the calling thread when no context is
// (cuTensorMapEncodeTiled, a driver call, needs one). Autograd runs backward on its own device
// thread, and there the backward's first call was refused with CUDA_ERROR_INVALID_CONTEXT (H100
// run of 2026-11-23) while the same call encoded on the main thread. A context the caller made
// current (a green context, cuCtxPushCurrent) is left alone.
inline cudaError_t ensure_current_context(int device) {
  static const auto get_current =
      reinterpret_cast<PFN_cuCtxGetCurrent_v4000>(driver_entry_point("cuCtxGetCurrent"));
  CUcontext current = nullptr;
  if (get_current != nullptr && get_current(&current) == CUDA_SUCCESS && current != nullptr) {
    return cudaSuccess;
  }
  return cudaSetDevice(device);  // CUDA >= 12: binds the device's primary context here
}

// Tensor map of a [batch][tokens][heads][head_dim] tensor addressed by element strides (unit
// stride on head_dim), boxes of (64, 1, box_rows, 1). See the file comment.
inline cudaError_t encode_map(TmaDescriptor* map, const void* base, DType dtype, int head_dim, int heads,
                       int64_t tokens, int batch, int64_t head_stride, int64_t token_stride,
                       int64_t batch_stride, int box_rows) {
  constexpr uint64_t kMaxStride = uint64_t{1} << 40;
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return cudaErrorInvalidPitchValue;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(tokens), static_cast<cuuint64_t>(batch)};
  const int64_t element_strides[3] = {head_stride, token_stride, batch_stride};
  cuuint64_t strides[3];
  uint64_t extent = static_cast<uint64_t>(head_dim) * 2;  // bytes the inner dims span
  for (int i = 0; i < 3; ++i) {
    const uint64_t dim = dims[i + 1];
    uint64_t stride;
    if (dim == 1) {
      stride = (extent + 15) / 16 * 16;  // placeholder: the index is always 0
    } else {
      if (element_strides[i] <= 0) return cudaErrorInvalidPitchValue;
      stride = static_cast<uint64_t>(element_strides[i]) * 2;
    }
    if (stride % 16 != 0 || stride >= kMaxStride) return cudaErrorInvalidPitchValue;
    strides[i] = stride;
    extent = std::max(extent, stride * dim);
  }
  const cuuint32_t box[4] = {64, 1, static_cast<cuuint32_t>(box_rows), 1};
  const cuuint32_t steps[4] = {1, 1, 1, 1};
  CUtensorMap encoded;
  const CUresult res = tensor_map_encoder()(
      &encoded,
      dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
      4, const_cast<void*>(base), dims, strides, box, steps, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS) {
    if (std::getenv("THINKFUSE_DEBUG_TMA") != nullptr) {
      std::fprintf(stderr,
                   "thinkfuse: cuTensorMapEncodeTiled refused (CUresult %d): dims %llu %llu %llu "
                   "%llu, byte strides %llu %llu %llu, box rows %d, base %p\n",
                   static_cast<int>(res), (unsigned long long)dims[0], (unsigned long long)dims[1],
                   (unsigned long long)dims[2], (unsigned long long)dims[3],
                   (unsigned long long)strides[0], (unsigned long long)strides[1],
                   (unsigned long long)strides[2], box_rows, base);
    }
    // CUDA_ERROR_INVALID_VALUE: the layout is refused (the bindings retry with contiguous
    // copies); anything else is not about the layout and is reported as it is.
    if (res == CUDA_ERROR_INVALID_VALUE) return cudaErrorInvalidPitchValue;
    return res == CUDA_ERROR_INVALID_CONTEXT ? cudaErrorDeviceUninitialized : cudaErrorUnknown;
  }
  std::memcpy(map, &encoded, sizeof(encoded));
  return cudaSuccess;
}

// Whether the current device is compute capability 9.0 (the only one sm_90a code runs on), with
// a context current on the calling thread for the tensor-map encoder (ensure_current_context).
inline cudaError_t check_device() {
  int device = 0;
  TF_CUDA_TRY(cudaGetDevice(&device));
  TF_CUDA_TRY(ensure_current_context(device));
  int major = 0;
  int minor = 0;
  TF_CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  TF_CUDA_TRY(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return major == 9 && minor == 0 ? cudaSuccess : cudaErrorNotSupported;
}

// Whether the image the runtime picked for `kernel` holds its sm_90a body. Other images hold a
// stub that traps (a sticky error that kills the context): an extension built without 9.0a JITs
// the compute_80 PTX, and one built for plain 9.0 has ptx / binary version 90 like the real one.
// The stub uses a handful of registers, while the real kernels are built to own the whole
// register file (threads x numRegs >= register_file) that setmaxnreg then moves between their
// warpgroups; this also guards against a compiler that allocates fewer, where setmaxnreg.inc
// would wait forever. cudaErrorNotSupported when it does not.
template <typename Kernel>
inline cudaError_t check_sm90a_image(Kernel* kernel, int threads, int register_file) {
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    (void)cudaGetLastError();  // leave no error behind for torch's next launch check
    return cudaErrorNotSupported;
  }
  if (attr.ptxVersion < 90 || attr.binaryVersion < 90 || attr.numRegs * threads < register_file) {
    return cudaErrorNotSupported;
  }
  return cudaSuccess;
}

}  // namespace sm90_host
}  // namespace thinkfuse
