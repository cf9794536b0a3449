// Flash attention forward for Hopper (flash_attention_fwd_sm90.cuh): argument checks, the TMA
// tensor maps of q / k / v, and the dtype / head-dim dispatch.
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
// cudaErrorInvalidPitchValue, and so does a layout the driver refuses to encode (the binding
// then retries with contiguous copies).
#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>

#include "thinkfuse/common.cuh"
#include "thinkfuse/flash_attention_fwd_sm90.cuh"
#include "thinkfuse/flash_attention_params.cuh"
#include "thinkfuse/ops.h"

namespace thinkfuse {
namespace {

using flash_fwd_sm90::TmaDescriptor;
static_assert(sizeof(CUtensorMap) == sizeof(TmaDescriptor), "TmaDescriptor mirrors CUtensorMap");
static_assert(alignof(CUtensorMap) <= alignof(TmaDescriptor), "TmaDescriptor mirrors CUtensorMap");

// The driver's cuTensorMapEncodeTiled (ABI of CUDA 12.0), or nullptr if the driver lacks it.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encoder = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                             cudaEnableDefault, &status);
#else
    const cudaError_t err =
        cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &status);
#endif
    if (err != cudaSuccess || status != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();  // not sticky; do not leak it into the next launch check
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encoder;
}

// Tensor map of a [batch][tokens][heads][head_dim] tensor addressed by element strides (unit
// stride on head_dim), boxes of (64, 1, box_rows, 1). See the file comment.
cudaError_t encode_map(TmaDescriptor* map, const void* base, DType dtype, int head_dim, int heads,
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
  if (res != CUDA_SUCCESS) return cudaErrorInvalidPitchValue;
  std::memcpy(map, &encoded, sizeof(encoded));
  return cudaSuccess;
}

bool valid_params(const FlashAttnParams& p) {
  if (!flash_attention_forward_sm90_head_dim_supported(p.head_dim) || !p.forward_problem_in_range()) {
    return false;
  }
  // TMA coordinates are int32: packed row indices (+ one tile) must fit.
  constexpr int64_t kMaxRows = INT_MAX - 1024;
  return p.cu_seqlens_q == nullptr ||
         (p.total_q >= 0 && p.total_q <= kMaxRows && p.total_k >= 0 && p.total_k <= kMaxRows);
}

// Whether the current device is compute capability 9.0 (the only one sm_90a code runs on).
cudaError_t check_device() {
  int device = 0;
  TF_CUDA_TRY(cudaGetDevice(&device));
  int major = 0;
  int minor = 0;
  TF_CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  TF_CUDA_TRY(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return major == 9 && minor == 0 ? cudaSuccess : cudaErrorNotSupported;
}

template <typename T, int D>
cudaError_t launch(const FlashAttnParams& p, const TmaDescriptor& tma_q,
                   const TmaDescriptor& tma_k, const TmaDescriptor& tma_v, cudaStream_t stream) {
  using Cfg = flash_fwd_sm90::Config<D>;
  auto* kernel = &flash_fwd_sm90::forward_kernel<T, D>;
  // The image the runtime picked must hold the sm_90a kernel body. Other images hold a stub that
  // traps (a sticky error that kills the context): an extension built without 9.0a JITs the
  // compute_80 PTX, and one built for plain 9.0 has ptx/binary version 90 like the real one. The
  // stub uses a handful of registers, while the real kernel is built to own the whole register
  // file that setmaxnreg then moves between its warpgroups (also guards against a compiler that
  // allocates fewer, where setmaxnreg.inc would wait forever).
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // leave no error behind for torch's next launch check
    return cudaErrorNotSupported;
  }
  constexpr int kRegisterFile =
      128 * Cfg::kProducerRegs + 128 * Cfg::kConsumerWarpgroups * Cfg::kConsumerRegs;
  if (attr.ptxVersion < 90 || attr.binaryVersion < 90 ||
      attr.numRegs * Cfg::kThreads < kRegisterFile) {
    return cudaErrorNotSupported;
  }
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return err;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(p.max_seqlen_q, Cfg::kBlockM)),
                  static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch));
  TF_LAUNCH_KERNEL(grid, Cfg::kThreads, Cfg::kSmemBytes, stream, kernel)(p, tma_q, tma_k, tma_v);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_head_dim(const FlashAttnParams& p, const TmaDescriptor& q,
                              const TmaDescriptor& k, const TmaDescriptor& v, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64:
      return launch<T, 64>(p, q, k, v, stream);
    case 128:
      return launch<T, 128>(p, q, k, v, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t flash_attention_forward_sm90(const FlashAttnParams& params, DType dtype,
                                         cudaStream_t stream) {
  if (params.batch == 0 || params.max_seqlen_q == 0) return cudaSuccess;  // nothing to write
  if (!valid_params(params)) return cudaErrorInvalidValue;
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  TF_CUDA_TRY(check_device());
  if (tensor_map_encoder() == nullptr) return cudaErrorNotSupported;
  if (!params.rows_16B_aligned(2)) return cudaErrorInvalidPitchValue;  // fp16 / bf16 rows
  FlashAttnParams p = params;
  // A window at least as long as every key range changes nothing (as flash_attention_forward).
  if (p.window >= p.max_seqlen_k) p.window = 0;

  const bool packed = p.cu_seqlens_q != nullptr;
  const int64_t q_tokens = packed ? p.total_q : p.max_seqlen_q;
  const int64_t k_tokens = packed ? p.total_k : p.max_seqlen_k;
  const int map_batch = packed ? 1 : p.batch;
  using Cfg = flash_fwd_sm90::Config<128>;  // kBlockM / kBlockN do not depend on D
  static_assert(flash_fwd_sm90::Config<64>::kBlockM == Cfg::kBlockM &&
                    flash_fwd_sm90::Config<64>::kBlockN == Cfg::kBlockN,
                "tile rows shared by every head dim");
  TmaDescriptor tma_q{};
  TmaDescriptor tma_k{};
  TmaDescriptor tma_v{};
  if (q_tokens == 0) return cudaSuccess;  // packed q without rows: nothing to write
  TF_CUDA_TRY(encode_map(&tma_q, p.q, dtype, p.head_dim, p.heads_q, q_tokens, map_batch,
                         p.q_head_stride, p.q_seq_stride, p.q_batch_stride, Cfg::kBlockM));
  // No key at all: every tile has k_len = 0 and loads no K / V, so the maps stay unused.
  if (k_tokens > 0) {
    TF_CUDA_TRY(encode_map(&tma_k, p.k, dtype, p.head_dim, p.heads_kv, k_tokens, map_batch,
                           p.k_head_stride, p.k_seq_stride, p.k_batch_stride, Cfg::kBlockN));
    TF_CUDA_TRY(encode_map(&tma_v, p.v, dtype, p.head_dim, p.heads_kv, k_tokens, map_batch,
                           p.v_head_stride, p.v_seq_stride, p.v_batch_stride, Cfg::kBlockN));
  }
  return dtype == DType::kFloat16 ? dispatch_head_dim<__half>(p, tma_q, tma_k, tma_v, stream)
                                  : dispatch_head_dim<__nv_bfloat16>(p, tma_q, tma_k, tma_v, stream);
}

}  // namespace thinkfuse
