// Stand-ins for the CUDA language and device built-ins, so that the kernel sources of csrc/
// compile unchanged with a host C++ compiler (g++ -x c++ -include thinkfuse_emu/cuda_emu.h
// -DTHINKFUSE_HOST_EMULATION). Force-included before anything else in every kernel translation
// unit; everything device-side forwards to the emulator (runtime.h).
#pragma once

#if !defined(THINKFUSE_HOST_EMULATION)
#error "cuda_emu.h is the host emulation shim: build with -DTHINKFUSE_HOST_EMULATION"
#endif

// The CUDA headers first (their include guards keep the kernels' own includes from undoing the
// definitions below).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "thinkfuse_emu/runtime.h"

// ---------------------------------------------------------------------------------------------
// Execution-space and launch-bound qualifiers: plain host functions.
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __noinline__
#define __noinline__ __attribute__((noinline))
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __constant__
#define __constant__
// Kernel parameters are copies on every emulated thread's stack; __grid_constant__ (their
// address may be taken, e.g. a TMA tensor map) needs nothing more.
#undef __grid_constant__
#define __grid_constant__
// __shared__ variables are per block. A block runs on one OS thread at a time (its CUDA threads
// are fibers of that OS thread), so thread_local storage is exactly per block: a static
// `__shared__ T x;` becomes a function-local thread_local, and `extern __shared__ T name[];`
// (dynamic shared memory) an `extern thread_local` array of the enclosing namespace, defined by
// EMU_DYNAMIC_SMEM in dynamic_smem.cpp.
#undef __shared__
#define __shared__ thread_local

// ---------------------------------------------------------------------------------------------
// Kernel launch: TF_LAUNCH_KERNEL(grid, block, smem, stream, kernel)(args...) (common.cuh; on
// the device it is kernel<<<grid, block, smem, stream>>>(args...)). The trailing (args...) calls
// a generic lambda that returns the deferred call kernel(args...) (template arguments deduced
// from the arguments, as <<< >>> does), which `config * body` hands to the emulator.
#define TF_LAUNCH_KERNEL(grid, block, smem, stream, ...)                                         \
  ::emu::LaunchConfig((grid), (block), (smem), (stream), #__VA_ARGS__, __FILE__, __LINE__,        \
                      ::emu::kernel_id_of(                                                        \
                          [&](auto emu_tag_) -> decltype(::emu::kernel_id(emu_tag_, __VA_ARGS__)) { \
                            return ::emu::kernel_id(emu_tag_, __VA_ARGS__);                       \
                          })) *                                                                   \
      [&](auto... emu_args_) { return [=]() { __VA_ARGS__(emu_args_...); }; }

// The runtime API's C++ overloads (cuda_runtime.h declares them for nvcc only).
template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <typename T>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T* kernel) {
  return ::cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(kernel));
}

// ---------------------------------------------------------------------------------------------
// Built-in variables.
#define threadIdx (::emu::t_thread_idx)
#define blockIdx (::emu::t_block_idx)
#define blockDim (::emu::t_block_dim)
#define gridDim (::emu::t_grid_dim)

// ---------------------------------------------------------------------------------------------
// Synchronisation and warp collectives (full-warp masks only).
inline void __syncthreads() { ::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::syncwarp(mask); }
inline void __threadfence() { ::emu::threadfence(); }
inline void __threadfence_block() { ::emu::threadfence(); }
[[noreturn]] inline void __trap() { ::emu::fail("__trap() executed by a kernel"); }

namespace emu {
template <typename T>
inline T shfl_as(unsigned mask, T value, int mode, int arg, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move <= 8 bytes");
  ::emu::shfl(mask, &value, static_cast<int>(sizeof(T)), mode, arg, width);
  return value;
}
}  // namespace emu

template <typename T>
inline T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
  return ::emu::shfl_as(mask, value, 0, src_lane, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return ::emu::shfl_as(mask, value, 1, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return ::emu::shfl_as(mask, value, 2, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return ::emu::shfl_as(mask, value, 3, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return ::emu::vote(mask, pred != 0, 0); }
inline int __any_sync(unsigned mask, int pred) { return static_cast<int>(::emu::vote(mask, pred != 0, 1)); }
inline int __all_sync(unsigned mask, int pred) { return static_cast<int>(::emu::vote(mask, pred != 0, 2)); }

// ---------------------------------------------------------------------------------------------
// Atomics (sequentially consistent host atomics on the global address; a possible switch first).
namespace emu {
template <typename T>
inline T* atomic_target(T* address) {
  ::emu::check_global(address, sizeof(T), "atomic");
  ::emu::maybe_yield();
  return address;
}
// Read-modify-write by compare-and-swap on the bits of a 4- or 8-byte T.
template <typename T, typename F>
inline T atomic_update(T* address, F f) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "4- or 8-byte atomics");
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  Bits* bits = reinterpret_cast<Bits*>(atomic_target(address));
  Bits old_bits = __atomic_load_n(bits, __ATOMIC_SEQ_CST);
  for (;;) {
    T old;
    std::memcpy(&old, &old_bits, sizeof(T));
    const T updated = f(old);
    Bits new_bits;
    std::memcpy(&new_bits, &updated, sizeof(T));
    if (__atomic_compare_exchange_n(bits, &old_bits, new_bits, false, __ATOMIC_SEQ_CST,
                                    __ATOMIC_SEQ_CST)) {
      return old;
    }
  }
}
}  // namespace emu

inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(::emu::atomic_target(a), v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return __atomic_fetch_add(::emu::atomic_target(a), v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return __atomic_fetch_add(::emu::atomic_target(a), v, __ATOMIC_SEQ_CST);
}
inline float atomicAdd(float* a, float v) {
  return ::emu::atomic_update(a, [v](float x) { return x + v; });
}
inline double atomicAdd(double* a, double v) {
  return ::emu::atomic_update(a, [v](double x) { return x + v; });
}
inline int atomicSub(int* a, int v) { return __atomic_fetch_sub(::emu::atomic_target(a), v, __ATOMIC_SEQ_CST); }
inline int atomicExch(int* a, int v) { return __atomic_exchange_n(::emu::atomic_target(a), v, __ATOMIC_SEQ_CST); }
inline unsigned atomicExch(unsigned* a, unsigned v) { return __atomic_exchange_n(::emu::atomic_target(a), v, __ATOMIC_SEQ_CST); }
inline int atomicMax(int* a, int v) { return ::emu::atomic_update(a, [v](int x) { return x < v ? v : x; }); }
inline int atomicMin(int* a, int v) { return ::emu::atomic_update(a, [v](int x) { return v < x ? v : x; }); }
inline unsigned atomicMax(unsigned* a, unsigned v) { return ::emu::atomic_update(a, [v](unsigned x) { return x < v ? v : x; }); }
inline unsigned atomicMin(unsigned* a, unsigned v) { return ::emu::atomic_update(a, [v](unsigned x) { return v < x ? v : x; }); }
inline int atomicCAS(int* a, int expected, int desired) {
  __atomic_compare_exchange_n(::emu::atomic_target(a), &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;
}
inline unsigned atomicCAS(unsigned* a, unsigned expected, unsigned desired) {
  __atomic_compare_exchange_n(::emu::atomic_target(a), &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;
}

// ---------------------------------------------------------------------------------------------
// Cache-hinted global loads / stores: checked plain accesses.
template <typename T>
inline void __stwb(T* address, T value) {
  ::emu::check_global(address, sizeof(T), "__stwb");
  ::emu::maybe_yield();
  *address = value;
}
template <typename T>
inline void __stcg(T* address, T value) { __stwb(address, value); }
template <typename T>
inline void __stcs(T* address, T value) { __stwb(address, value); }
template <typename T>
inline T __ldcg(const T* address) {
  ::emu::check_global(address, sizeof(T), "__ldcg");
  ::emu::maybe_yield();
  T value;
  std::memcpy(&value, address, sizeof(T));  // the memory may be written by other blocks
  return value;
}
template <typename T>
inline T __ldg(const T* address) { return __ldcg(address); }
template <typename T>
inline T __ldca(const T* address) { return __ldcg(address); }
template <typename T>
inline T __ldcs(const T* address) { return __ldcg(address); }

// ---------------------------------------------------------------------------------------------
// Float intrinsics. The _rn forms are IEEE on the host too. The fast-math approximations
// (__expf = ex2.approx(x * log2 e), exp2f under --use_fast_math, approximate '/') are NOT
// reproduced: the host computes them with libm / IEEE accuracy.
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
// rsqrtf: 1 / sqrt(x), maximum error 2 ulp per the CUDA math API (an approximate instruction on
// the device, with or without --use_fast_math); rsqrtf(+-0) = +-inf, rsqrtf(+inf) = +0, NaN for
// x < 0. The host computes it in double and rounds to float (within 1 ulp of the true value), so
// the device's extra error is not reproduced.
inline float rsqrtf(float x) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(x))); }
inline float __expf(float x) { return exp2f(x * 1.44269504088896341f); }
inline float __exp2f(float x) { return exp2f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }

// CUDA's min / max overloads for the integer and float types (device code calls them
// unqualified).
#define EMU_MIN_MAX(T)                                   \
  inline T min(T a, T b) { return b < a ? b : a; }       \
  inline T max(T a, T b) { return a < b ? b : a; }
EMU_MIN_MAX(int)
EMU_MIN_MAX(unsigned)
EMU_MIN_MAX(long)
EMU_MIN_MAX(unsigned long)
EMU_MIN_MAX(long long)
EMU_MIN_MAX(unsigned long long)
EMU_MIN_MAX(float)
EMU_MIN_MAX(double)
#undef EMU_MIN_MAX
