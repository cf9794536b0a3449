// Warp-level tensor-core and async-copy primitives for sm80+ (Ampere mma.sync; they run
// unchanged on Hopper): 16-byte cp.async global->shared copies, ldmatrix fragment loads and
// the m16n8k16 half/bfloat16 MMA with float32 accumulators. Kernels build their tiles from
// these; nothing here knows about attention.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4 * group + quad:
//   A (16x16, row-major): 4 x 32-bit registers; a[0] = (row group,   cols 2q..2q+1),
//     a[1] = (row group+8, cols 2q..), a[2] = (row group, cols 8+2q..), a[3] = (row group+8, 8+2q..)
//   B (16x8, "col-major", i.e. B^T row-major [n][k]): 2 registers; b[0] = (k 2q..2q+1, n group),
//     b[1] = (k 8+2q.., n group)
//   C/D (16x8 float): c[0..1] = (row group, cols 2q, 2q+1), c[2..3] = (row group+8, cols 2q, 2q+1)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#if defined(THINKFUSE_HOST_EMULATION)
// Host emulation (tests/cuda_emulation, built with g++): the same functions with the semantics
// above, implemented by the emulator; the device code below is not compiled there.
#include "thinkfuse_emu/mma_sm80.h"
#else

namespace thinkfuse::mma {

__device__ __forceinline__ uint32_t smem_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// ---------------------------------------------------------------------------------------------
// cp.async: 16-byte global -> shared copies that bypass registers (and L1: .cg).

// Copies 16 bytes, or writes 16 zero bytes when !valid (src_bytes = 0 reads nothing, so `src`
// may point anywhere mapped; pass a valid base pointer).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem_dst)),
               "l"(gmem_src), "r"(src_bytes));
}

// Copies 4 bytes (both addresses 4-byte aligned), or writes 4 zero bytes when !valid (same
// contract as cp_async_16). 4-byte copies need the .ca (L1-allocating) form. For small float
// vectors whose start is not 16-byte aligned (per-row softmax statistics of a query block).
__device__ __forceinline__ void cp_async_4(void* smem_dst, const void* gmem_src, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_address(smem_dst)),
               "l"(gmem_src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most `kPending` committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// ---------------------------------------------------------------------------------------------
// ldmatrix: each of the 32 lanes supplies the shared address of one 16-byte row (lanes 0-7:
// matrix 0, 8-15: matrix 1, 16-23: matrix 2, 24-31: matrix 3); each lane receives one 32-bit
// register per matrix, in the mma fragment layout. .trans transposes each 8x8 matrix.

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(smem_row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(smem_row)));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_address(smem_row)));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_address(smem_row)));
}

// ---------------------------------------------------------------------------------------------
// D = A * B + C, m16n8k16, float32 accumulate, in place on `c`.

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                            const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                     const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two floats packed into one 32-bit register of T (the low half holds `lo`): turns float
// accumulators (e.g. softmax probabilities) into the next MMA's A fragment without shared memory.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

}  // namespace thinkfuse::mma

#endif  // THINKFUSE_HOST_EMULATION
