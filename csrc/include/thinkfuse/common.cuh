// Building blocks shared by every thinkfuse kernel: dtype conversions, aligned vector
// loads/stores, warp/block reductions, host-side launch helpers and dtype dispatch.
//
// Header-only and free of torch headers on purpose: torch headers cost minutes of nvcc time
// per translation unit, and the kernels only need raw pointers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstring>

#include "thinkfuse/ops.h"

// Kernel launch: TF_LAUNCH_KERNEL(grid, block, smem, stream, kernel)(args...) is
// kernel<<<grid, block, smem, stream>>>(args...). A macro because the host emulation of the
// kernels (tests/cuda_emulation, built with THINKFUSE_HOST_EMULATION by a host compiler, which
// cannot parse <<< >>>) defines it as a call into its emulated launch.
#if !defined(THINKFUSE_HOST_EMULATION)
#define TF_LAUNCH_KERNEL(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

// Evaluates a CUDA runtime call and returns its error from the enclosing function on failure.
// Launchers return cudaError_t instead of throwing: the torch binding turns it into an error.
#define TF_CUDA_TRY(expr)                      \
  do {                                         \
    const cudaError_t tf_err_ = (expr);        \
    if (tf_err_ != cudaSuccess) return tf_err_; \
  } while (0)

namespace thinkfuse {

constexpr int kWarpSize = 32;

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

template <typename T>
__host__ __device__ constexpr T round_up(T a, T multiple) {
  return ceil_div(a, multiple) * multiple;
}

// ---------------------------------------------------------------------------------------------
// dtype conversions. All arithmetic happens in float32; storage types are float, __half and
// __nv_bfloat16. Conversions to the narrow types round to nearest even, as torch does.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// The float value that storing x as T and reading it back gives: reproduces the rounding that
// an eager torch op performs when it materialises an intermediate tensor in T.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// ---------------------------------------------------------------------------------------------
// Aligned vectors in global memory. An AlignedArray moves as whole unsigned words of its
// alignment (at most 16 bytes, so a 32-byte array is two 128-bit accesses). The caller
// guarantees that the address is aligned to alignof(AlignedArray<T, N>).
// ---------------------------------------------------------------------------------------------

template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) AlignedArray {
  T v[N];
};

// Elements of T that fit in one 16-byte access.
template <typename T>
constexpr int kVecSize = 16 / static_cast<int>(sizeof(T));

template <int kBytes>
struct AccessWord;
template <>
struct AccessWord<2> {
  using type = unsigned short;
};
template <>
struct AccessWord<4> {
  using type = unsigned int;
};
template <>
struct AccessWord<8> {
  using type = uint2;
};
template <>
struct AccessWord<16> {
  using type = uint4;
};

template <typename T, int N>
__device__ __forceinline__ AlignedArray<T, N> load_aligned(const T* ptr) {
  using Array = AlignedArray<T, N>;
  using Word = typename AccessWord<alignof(Array)>::type;
  constexpr int kWords = sizeof(Array) / sizeof(Word);
  Word words[kWords];
#pragma unroll
  for (int w = 0; w < kWords; ++w) words[w] = reinterpret_cast<const Word*>(ptr)[w];
  Array out;
  memcpy(&out, words, sizeof(Array));  // a register move; punning through pointers is UB
  return out;
}

// Stores go through __stwb (st.global.wb, the default write-back policy): NVVM splits plain
// 16-byte stores into scalar ones inside nested loops (seen with CUDA 13), which the intrinsic
// cannot do. Loads stay plain C++ so the compiler keeps scheduling (and dropping) them freely.
template <typename T, int N>
__device__ __forceinline__ void store_aligned(T* ptr, const AlignedArray<T, N>& value) {
  using Array = AlignedArray<T, N>;
  using Word = typename AccessWord<alignof(Array)>::type;
  constexpr int kWords = sizeof(Array) / sizeof(Word);
  Word words[kWords];
  memcpy(words, &value, sizeof(Array));
#pragma unroll
  for (int w = 0; w < kWords; ++w) __stwb(reinterpret_cast<Word*>(ptr) + w, words[w]);
}

// Loads N consecutive elements of T at ptr as floats.
// kAligned: ptr is aligned for AlignedArray<T, N> and all N elements are in bounds; one vector
// access. Otherwise only the first `valid` elements are read, one at a time, and the rest read
// as 0: the fallback for widths that are not a multiple of N and for unaligned rows.
template <bool kAligned, int N, typename T>
__device__ __forceinline__ void load_floats(const T* ptr, int valid, float (&out)[N]) {
  if constexpr (kAligned) {
    const AlignedArray<T, N> raw = load_aligned<T, N>(ptr);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float(raw.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = i < valid ? to_float(ptr[i]) : 0.0f;
  }
}

// Rounds N floats to T and stores them at ptr; same contract as load_floats (without kAligned
// only the first `valid` elements are written).
template <bool kAligned, int N, typename T>
__device__ __forceinline__ void store_floats(T* ptr, int valid, const float (&in)[N]) {
  if constexpr (kAligned) {
    AlignedArray<T, N> raw;
#pragma unroll
    for (int i = 0; i < N; ++i) raw.v[i] = from_float<T>(in[i]);
    store_aligned<T, N>(ptr, raw);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (i < valid) ptr[i] = from_float<T>(in[i]);
    }
  }
}

// Host side: may rows of T starting at ptr, row_stride elements apart, be read as 16-byte
// vectors? (Both the base address and every row start must be 16-byte aligned.)
template <typename T>
inline bool rows_are_16B_aligned(const T* ptr, int64_t row_stride) {
  return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0 &&
         (row_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0;
}

// ---------------------------------------------------------------------------------------------
// Generic warp / block all-reduce of a small struct S (4-byte fields: floats, ints) under a
// commutative `combine`. shfl_xor_words moves S between lanes one 32-bit word at a time, so the
// reduced structs need no shuffle code of their own.
// ---------------------------------------------------------------------------------------------

template <typename S>
__device__ __forceinline__ S shfl_xor_words(const S& value, int lane_mask) {
  static_assert(sizeof(S) % sizeof(unsigned) == 0, "shfl_xor_words moves whole 32-bit words");
  constexpr int kWords = sizeof(S) / sizeof(unsigned);
  unsigned words[kWords];
  memcpy(words, &value, sizeof(S));
#pragma unroll
  for (int w = 0; w < kWords; ++w) words[w] = __shfl_xor_sync(0xffffffffu, words[w], lane_mask);
  S out;
  memcpy(&out, words, sizeof(S));
  return out;
}

// Xor butterfly over one warp: every lane combines the same sets (commutativity makes the
// operand order irrelevant). With contracted FMAs in `combine` lanes may differ in the last bit;
// callers that need one answer use one lane's.
template <typename S, typename Combine>
__device__ __forceinline__ S warp_allreduce(S x, Combine combine) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x = combine(x, shfl_xor_words(x, offset));
  }
  return x;
}

// Every thread gets bitwise the same result: each folds the per-warp partials itself in warp
// order. Block size a multiple of 32 (at most 1024); every thread must call it; it may be
// called repeatedly.
template <typename S, typename Combine>
__device__ __forceinline__ S block_allreduce(S x, Combine combine) {
  __shared__ S partials[kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  x = warp_allreduce(x, combine);
  if (lane == 0) partials[warp] = x;
  __syncthreads();
  S total = partials[0];
  for (int w = 1; w < num_warps; ++w) total = combine(total, partials[w]);
  __syncthreads();  // the next call may overwrite partials
  return total;
}

// ---------------------------------------------------------------------------------------------
// Reductions. Every participating thread gets the full sum, so the caller needs no broadcast.
// ---------------------------------------------------------------------------------------------

// Butterfly (xor) sum: after log2(32) steps every lane holds the same total. All 32 lanes of the
// warp must call it.
struct FloatAdd {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

__device__ __forceinline__ float warp_reduce_sum(float x) { return warp_allreduce(x, FloatAdd{}); }

// Sum over a 1-D block whose size is a multiple of 32 (at most 1024). Every thread of the block
// must call it (it synchronises). It may be called repeatedly, e.g. once per row in a loop:
// the trailing barrier keeps the next call from overwriting partials still being read.
__device__ __forceinline__ float block_reduce_sum(float x) {
  __shared__ float warp_sums[kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;

  x = warp_reduce_sum(x);
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  // Every warp reduces the per-warp partials itself, in the same order, so all threads end up
  // with bitwise the same total without a second broadcast through shared memory.
  x = lane < num_warps ? warp_sums[lane] : 0.0f;
  x = warp_reduce_sum(x);
  __syncthreads();
  return x;
}

// ---------------------------------------------------------------------------------------------
// Host-side dtype dispatch: calls f(TypeTag<T>{}) with the storage type named by a DType.
// ---------------------------------------------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(TypeTag<float>{});
    case DType::kFloat16:
      return f(TypeTag<__half>{});
    case DType::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------------
// Host: the SM count of a device, for the launch heuristics that size grids to fill the GPU.
// ---------------------------------------------------------------------------------------------

inline cudaError_t sm_count(int device, int* sms) {
  return cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
}

// The current device (the one the caller's stream belongs to: the bindings set it) and its SM
// count.
inline cudaError_t current_device_sms(int* device, int* sms) {
  TF_CUDA_TRY(cudaGetDevice(device));
  return sm_count(*device, sms);
}

// Raises `kernel`'s dynamic shared memory limit to `bytes` on the current device, once per device:
// `configured` is the caller's bit set of devices done (a static per kernel instantiation).
// cudaFuncSetAttribute is not a stream operation, so calling it during a CUDA graph capture is
// fine; the cache keeps it off the per-launch path. Racing threads may both set it: the same
// value, harmless. A failure (e.g. more than the device's opt-in limit, an image this device
// cannot load) is returned and cleared from the runtime's last error, so the caller can report
// it and fall back.
template <typename Kernel>
cudaError_t set_max_dynamic_smem_once(Kernel kernel, int bytes, std::atomic<uint64_t>& configured) {
  int device = 0;
  TF_CUDA_TRY(cudaGetDevice(&device));
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (configured.load(std::memory_order_relaxed) & bit) != 0) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return err;
  }
  configured.fetch_or(bit, std::memory_order_relaxed);
  return cudaSuccess;
}

}  // namespace thinkfuse
