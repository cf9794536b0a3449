// Host emulation of thinkfuse/sm90.cuh (included from there when THINKFUSE_HOST_EMULATION is
// defined): the same functions with the same contracts, implemented by the emulator
// (src/sm90.cpp) from the PTX ISA, not from the kernel's comments:
//   mbarrier init / arrive / arrive.expect_tx / try_wait.parity with phases, arrival and tx
//     counts; a wait that can never complete is a reported deadlock;
//   cp.async.bulk.tensor tile loads through tensor maps encoded by the emulated
//     cuTensorMapEncodeTiled: box reads with zero fill out of bounds, the 128-byte swizzle, the
//     full box bytes signalled to the mbarrier, completing asynchronously;
//   wgmma.mma_async as a warpgroup collective reading shared memory through the matrix
//     descriptors, completing at the wgmma.wait_group that retires its group (the accumulators
//     hold NaN in between); wgmma.fence / commit_group / wait_group, setmaxnreg and bar.sync /
//     bar.arrive as warpgroup / warp collectives with their PTX constraints checked.
// The wgmma A-fragment registers are taken by reference (the device version takes them by value)
// so that the emulator can check they are left alone until the wgmma completes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "thinkfuse_emu/runtime.h"

namespace thinkfuse::sm90 {

inline void mbar_init(uint32_t bar, uint32_t count) { ::emu::mbar_init(bar, count); }

inline void fence_barrier_init() { ::emu::fence_mbarrier_init(); }

inline void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) { ::emu::mbar_arrive(bar, true, bytes); }

inline void mbar_arrive(uint32_t bar) { ::emu::mbar_arrive(bar, false, 0); }

inline bool mbar_try_wait(uint32_t bar, uint32_t parity) { return ::emu::mbar_try_wait_parity(bar, parity); }

inline void prefetch_tensormap(const void* desc) { ::emu::prefetch_tensormap(desc); }

inline void tma_load_4d(uint32_t dst, const void* desc, uint32_t bar, int c0, int c1, int c2,
                        int c3) {
  const int32_t coords[4] = {c0, c1, c2, c3};
  ::emu::tma_load(dst, desc, bar, coords, 4);
}

inline void cp_async_16(uint32_t dst, const void* src, bool valid) {
  ::emu::cp_async_shared(dst, src, 16, valid);
}

inline void cp_async_wait_all() { ::emu::cp_async_wait_all(); }

inline void fence_proxy_async() { ::emu::fence_proxy_async(); }

template <int kRegs>
inline void setmaxnreg_dec() {
  ::emu::setmaxnreg(kRegs, false);
}

template <int kRegs>
inline void setmaxnreg_inc() {
  ::emu::setmaxnreg(kRegs, true);
}

inline void named_barrier_sync(int id, int threads) { ::emu::named_barrier(id, threads, true); }

inline void named_barrier_arrive(int id, int threads) { ::emu::named_barrier(id, threads, false); }

inline void wgmma_fence() { ::emu::wgmma_fence(); }

inline void wgmma_commit() { ::emu::wgmma_commit(); }

template <int kPending>
inline void wgmma_wait() {
  ::emu::wgmma_wait(kPending);
}

template <int N>
inline void fence_operands(float (&r)[N]) {
  ::emu::wgmma_fence_operands(r, sizeof r);
}

template <int N>
inline void fence_operands(uint32_t (&r)[N]) {
  ::emu::wgmma_fence_operands(r, sizeof r);
}

template <typename T>
inline constexpr bool kIsBf16 = std::is_same_v<T, __nv_bfloat16>;

template <typename T>
inline void wgmma_ss_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  static_assert(std::is_same_v<T, __half> || kIsBf16<T>, "f16 or bf16 inputs");
  // the device version: scale-d = (scale_d != 0), imm-scale-a = imm-scale-b = 1, trans 0, 0
  ::emu::wgmma_mma_async(d, 128, nullptr, desc_a, desc_b, scale_d != 0, 1, 1, 0, 0, kIsBf16<T>);
}

template <typename T, int kTransA, int kTransB>
inline void wgmma_ss_m64n64k16(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  static_assert(std::is_same_v<T, __half> || kIsBf16<T>, "f16 or bf16 inputs");
  // the device version: scale-d = (scale_d != 0), imm-scale-a = imm-scale-b = 1, trans kTransA,
  // kTransB
  ::emu::wgmma_mma_async(d, 64, nullptr, desc_a, desc_b, scale_d != 0, 1, 1, kTransA, kTransB,
                         kIsBf16<T>);
}

template <typename T, int kN>
inline void wgmma_rs_impl(float (&d)[kN / 2], const uint32_t& a0, const uint32_t& a1,
                          const uint32_t& a2, const uint32_t& a3, uint64_t desc_b, int scale_d) {
  static_assert(std::is_same_v<T, __half> || kIsBf16<T>, "f16 or bf16 inputs");
  const uint32_t* a[4] = {&a0, &a1, &a2, &a3};
  // the device version: imm-scale-a = imm-scale-b = 1, imm-trans-b = 1
  ::emu::wgmma_mma_async(d, kN, a, 0, desc_b, scale_d != 0, 1, 1, 0, 1, kIsBf16<T>);
}

template <typename T>
inline void wgmma_rs(float (&d)[64], const uint32_t& a0, const uint32_t& a1, const uint32_t& a2,
                     const uint32_t& a3, uint64_t desc_b, int scale_d) {
  wgmma_rs_impl<T, 128>(d, a0, a1, a2, a3, desc_b, scale_d);
}

template <typename T>
inline void wgmma_rs(float (&d)[32], const uint32_t& a0, const uint32_t& a1, const uint32_t& a2,
                     const uint32_t& a3, uint64_t desc_b, int scale_d) {
  wgmma_rs_impl<T, 64>(d, a0, a1, a2, a3, desc_b, scale_d);
}

}  // namespace thinkfuse::sm90
