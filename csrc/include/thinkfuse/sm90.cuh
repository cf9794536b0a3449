// Hopper (sm_90a) PTX primitives: mbarriers, TMA tile loads, cp.async with wait_all, proxy
// fences, setmaxnreg, named barriers and wgmma (warpgroup MMA with shared-memory descriptors and
// a register A operand), each wrapped in a small __device__ function. Shared-memory operands are
// 32-bit shared-window addresses (mma::smem_address); tensor maps are CUtensorMap objects (128
// bytes, opaque) passed by address. Used by flash_attention_{fwd,bwd}_sm90.cuh; the semantics are the
// PTX ISA's (sections "mbarrier", "cp.async.bulk.tensor", "wgmma", "setmaxnreg", "bar").
//
// Host emulation (tests/cuda_emulation, THINKFUSE_HOST_EMULATION): the same functions come from
// thinkfuse_emu/sm90.h, implemented by the emulator from the PTX ISA; the inline PTX below is the
// device code and is not compiled there.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#if defined(THINKFUSE_HOST_EMULATION)
#include "thinkfuse_emu/sm90.h"
#else

namespace thinkfuse {
namespace sm90 {

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Makes the barrier inits visible to the async proxy (TMA complete_tx) and the other threads.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

__device__ __forceinline__ void prefetch_tensormap(const void* desc) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(desc)) : "memory");
}

// 4-D tiled TMA load global -> shared (box given by the tensor map), completing `bar`'s
// transaction bytes. Coordinates (innermost first): element of head_dim, head, token, batch.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void* desc, uint32_t bar,
                                            int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(desc)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

// 16-byte cp.async (zero-fill when !valid: src-size 0 reads nothing).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// Orders this thread's generic-proxy shared-memory accesses with later async-proxy ones (wgmma,
// TMA) and vice versa.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Compiler-level fences on wgmma operand registers (no instruction): keeps the compiler from
// moving their reads / writes across the asynchronous window between a wgmma's issue and the
// wait_group that completes it.
template <int N>
__device__ __forceinline__ void fence_operands(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

template <int N>
__device__ __forceinline__ void fence_operands(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// wgmma operand lists: the accumulator registers %0 .. %(N-1) and their "+f" constraints.
#define TF_SM90_ACC32_REGS \
  "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31" \
  "}"

#define TF_SM90_ACC32_OPS(d) \
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), \
      "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), \
      "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), \
      "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
      "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])

#define TF_SM90_ACC64_REGS \
  "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" \
  "}"

#define TF_SM90_ACC64_OPS(d) \
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), \
      "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), \
      "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), \
      "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
      "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), \
      "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), \
      "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), \
      "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), \
      "+f"(d[63])

// D (+)= A B, m64n128k16, A and B from shared memory, both K-major (trans-a = trans-b = 0).
// scale_d == 0: D = A B (the accumulators' old values are ignored).
template <typename T>
__device__ __forceinline__ void wgmma_ss_m64n128k16(float (&d)[64], uint64_t desc_a,
                                                    uint64_t desc_b, int scale_d) {
#define TF_SM90_SS_N128(TYPE)                                                              \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "            \
               TF_SM90_ACC64_REGS ", %64, %65, p, 1, 1, 0, 0;\n}\n"                        \
               : TF_SM90_ACC64_OPS(d)                                                      \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d))
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    TF_SM90_SS_N128("bf16");
  } else {
    TF_SM90_SS_N128("f16");
  }
#undef TF_SM90_SS_N128
}

// D (+)= A B, m64n64k16, A and B from shared memory; kTransA / kTransB = 1 reads that operand
// MN-major (its M / N elements contiguous), 0 K-major. Used by the backward
// (flash_attention_bwd_sm90.cuh): S^T = K Q^T and dP^T = V dO^T (both K-major), dQ = dS K (both
// MN-major).
template <typename T, int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_ss_m64n64k16(float (&d)[32], uint64_t desc_a,
                                                   uint64_t desc_b, int scale_d) {
  static_assert((kTransA == 0 || kTransA == 1) && (kTransB == 0 || kTransB == 1), "trans 0 / 1");
#define TF_SM90_SS_N64(TYPE)                                                               \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "             \
               TF_SM90_ACC32_REGS ", %32, %33, p, 1, 1, %35, %36;\n}\n"                   \
               : TF_SM90_ACC32_OPS(d)                                                      \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB))
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    TF_SM90_SS_N64("bf16");
  } else {
    TF_SM90_SS_N64("f16");
  }
#undef TF_SM90_SS_N64
}

// D (+)= A B, m64nNk16 for N = 64 / 128: A from registers (the 4-word A fragment), B from shared
// memory, MN-major (trans-b = 1).
template <typename T>
__device__ __forceinline__ void wgmma_rs(float (&d)[64], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint64_t desc_b, int scale_d) {
#define TF_SM90_RS_N128(TYPE)                                                              \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "            \
               TF_SM90_ACC64_REGS ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"          \
               : TF_SM90_ACC64_OPS(d)                                                      \
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(scale_d))
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    TF_SM90_RS_N128("bf16");
  } else {
    TF_SM90_RS_N128("f16");
  }
#undef TF_SM90_RS_N128
}

template <typename T>
__device__ __forceinline__ void wgmma_rs(float (&d)[32], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint64_t desc_b, int scale_d) {
#define TF_SM90_RS_N64(TYPE)                                                               \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "             \
               TF_SM90_ACC32_REGS ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"          \
               : TF_SM90_ACC32_OPS(d)                                                      \
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(scale_d))
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    TF_SM90_RS_N64("bf16");
  } else {
    TF_SM90_RS_N64("f16");
  }
#undef TF_SM90_RS_N64
}

#undef TF_SM90_ACC32_REGS
#undef TF_SM90_ACC32_OPS
#undef TF_SM90_ACC64_REGS
#undef TF_SM90_ACC64_OPS

}  // namespace sm90
}  // namespace thinkfuse

#endif  // THINKFUSE_HOST_EMULATION

namespace thinkfuse {
namespace sm90 {

// Waits until the phase of parity `parity` of the barrier has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}

}  // namespace sm90
}  // namespace thinkfuse
