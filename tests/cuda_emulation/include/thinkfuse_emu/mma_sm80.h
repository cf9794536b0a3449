// Host emulation of thinkfuse/mma_sm80.cuh (included from there when THINKFUSE_HOST_EMULATION is
// defined): the same functions with the same contracts, implemented by the emulator
// (src/runtime.cpp) with the PTX semantics:
//   cp.async: the copy (or zero fill) is queued per thread and lands no later than the
//     cp.async.wait_group that retires its commit group (when exactly: emu::options().copies);
//     ldmatrix reading bytes of a copy still in flight is reported as a failure.
//   ldmatrix / mma.sync: warp collectives; the last lane to arrive computes the result of every
//     lane from the fragments of all 32 (layouts in mma_sm80.cuh's header comment).
//   pack2: bit-exact (round to nearest even).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "thinkfuse_emu/runtime.h"

namespace thinkfuse::mma {

// The 32-bit shared-window address of a pointer into dynamic shared memory (__cvta_generic_to_
// shared): the emulator places the block's dynamic shared memory at a window offset of its own
// (runtime.h, Options::smem_window_base).
inline uint32_t smem_address(const void* ptr) { return ::emu::smem_window_address(ptr); }

inline void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  ::emu::cp_async(smem_dst, gmem_src, 16, valid);
}

inline void cp_async_4(void* smem_dst, const void* gmem_src, bool valid) {
  ::emu::cp_async(smem_dst, gmem_src, 4, valid);
}

inline void cp_async_commit() { ::emu::cp_async_commit(); }

template <int kPending>
inline void cp_async_wait() {
  ::emu::cp_async_wait(kPending);
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) { ::emu::ldmatrix(r, 4, false, smem_row); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) { ::emu::ldmatrix(r, 4, true, smem_row); }
inline void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) { ::emu::ldmatrix(r, 2, false, smem_row); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) { ::emu::ldmatrix(r, 2, true, smem_row); }

template <typename T>
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "mma_m16n8k16 takes __half or __nv_bfloat16");
  ::emu::mma_m16n8k16(c, a, b, std::is_same_v<T, __nv_bfloat16>);
}

template <typename T>
inline uint32_t pack2(float lo, float hi);

template <>
inline uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  std::memcpy(&r, &v, 4);
  return r;
}

template <>
inline uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  uint32_t r;
  std::memcpy(&r, &v, 4);
  return r;
}

}  // namespace thinkfuse::mma
