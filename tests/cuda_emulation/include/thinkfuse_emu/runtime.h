// Host emulation of the CUDA execution model for thinkfuse's kernels: the emulator's API.
//
// Used by cuda_emu.h (the stand-ins for CUDA's device built-ins, force-included into every kernel
// translation unit), by mma_sm80.h (the emulated tensor-core / async-copy primitives behind
// thinkfuse/mma_sm80.cuh) and by the harness (options, memory registration). Implemented in
// src/runtime.cpp. See ../../README.md for what is and is not emulated.
//
// Execution model: a launch runs its blocks one after another (or on `workers` OS threads, one
// block per thread at a time); inside a block every CUDA thread is a fiber with its own stack,
// switched cooperatively at synchronisation points (__syncthreads, warp collectives, cp.async
// operations, atomics, fences, global stores), in an order drawn from a seeded random generator.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <type_traits>
#include <vector>

namespace emu {

// ---------------------------------------------------------------------------------------------
// Options (set by the harness before a launch; read by every launch).

enum class CopyPolicy {
  kLate,    // a cp.async lands at the cp.async.wait_group that retires it (the latest legal time)
  kEarly,   // it lands when issued
  kRandom,  // it lands at a random point between the two
};

enum class Sched {
  kWarp,    // run the lanes of one warp in turn, switching warps at random now and then
  kRandom,  // any runnable thread at every switch
};

struct Options {
  uint64_t seed = 1;
  CopyPolicy copies = CopyPolicy::kLate;
  Sched sched = Sched::kWarp;
  int workers = 1;             // OS threads running blocks concurrently (each one block at a time)
  bool shuffle_blocks = true;  // run the blocks of a grid in a random order (else linear order)
  double yield_prob = 0.05;    // chance of a switch at every non-blocking emulated operation
  bool verbose = false;        // one line per launch on stderr
  // Registers per thread cudaFuncGetAttributes reports (numRegs): what ptxas gives the sm_90a
  // flash attention kernel (__launch_bounds__(384, 1): `nvcc -Xptxas -v` prints 168); also the
  // starting per-thread count of setmaxnreg's register accounting.
  int kernel_regs = 168;
  // Shared-window address of dynamic shared memory byte 0: -1 draws a 16-byte multiple in
  // [1024, 2048) per block (kernels that round their base up to 1024 bytes see both cases).
  int smem_window_base = -1;
};
Options& options();

// Emulated devices, selected by cudaSetDevice (cudaGetDevice reports the index, so the kernels'
// per-device caches see distinct devices). 0: H100 SXM (132 SMs, 227 KB opt-in shared memory),
// 1: A100 (108 SMs, 163 KB), 2: an sm_86 part (84 SMs, 99 KB), 3: a hypothetical 90 KB part.
constexpr int kNumDevices = 4;
struct DeviceProfile {
  const char* name;
  int sms;
  int cc_major, cc_minor;
  int smem_optin;          // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int smem_per_sm;         // cudaDevAttrMaxSharedMemoryPerMultiprocessor
  int max_threads_per_sm;
  int max_blocks_per_sm;
  int regs_per_sm;
  int l2_bytes;
};
const DeviceProfile& device_profile(int device);
int current_device();

// Prints "EMU FAILURE: ..." with the current launch / block / thread and exits with status 3.
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// ---------------------------------------------------------------------------------------------
// Memory. The harness registers its buffers; emulated global accesses (cp.async sources,
// __stwb / __ldcg, atomics, memset) must fall inside one of them.

void register_global(const void* ptr, size_t bytes, const char* name);
void clear_globals();
void check_global(const void* ptr, size_t bytes, const char* what);

// Dynamic shared memory: a kernel's `extern __shared__ T name[]` becomes an `extern
// thread_local` array in its namespace, defined with EMU_DYNAMIC_SMEM (dynamic_smem.cpp). Each
// registered array is filled with 0xFF (NaN in every float format) before every block.
constexpr size_t kMaxDynamicSmem = 232448 + 4096;  // the largest opt-in, and a canary
struct SmemRegistrar {
  SmemRegistrar(unsigned char* (*address)(), const char* name);
};

// ---------------------------------------------------------------------------------------------
// Launch (the expansion of TF_LAUNCH_KERNEL, see cuda_emu.h).

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t smem;
  cudaStream_t stream;
  const char* kernel;  // the kernel expression, as written at the launch site
  const char* file;
  int line;
  const void* id;  // the kernel's address when the launch site names one specialization
  LaunchConfig(dim3 g, dim3 b, size_t s, cudaStream_t st, const char* k, const char* f, int l,
               const void* kernel_id)
      : grid(g), block(b), smem(s), stream(st), kernel(k), file(f), line(l), id(kernel_id) {}
};

// Every launch that ran, in order (the harness reports them).
struct LaunchRecord {
  const char* kernel;
  dim3 grid, block;
  size_t smem;
};
const std::vector<LaunchRecord>& launches();

// Runs body() once per CUDA thread of every block; returns the launch error (also recorded for
// cudaGetLastError) without running anything when the configuration is invalid.
cudaError_t launch(const LaunchConfig& config, const std::function<void()>& body);

template <typename Body>
void operator*(const LaunchConfig& config, Body body) {
  launch(config, std::function<void()>(std::move(body)));
}

// kernel_id(tag, kernel) for a launch site naming one function (or a pointer to one); SFINAE
// leaves launch sites whose template arguments are deduced from the call without an id.
template <typename Tag, typename F>
const void* kernel_id(Tag, F* kernel) {
  return reinterpret_cast<const void*>(kernel);
}
template <typename L>
const void* kernel_id_of(L get) {
  if constexpr (std::is_invocable_v<L&, int>) {
    return get(0);
  } else {
    return nullptr;
  }
}

// ---------------------------------------------------------------------------------------------
// Device side (only inside a launch).

extern thread_local uint3 t_thread_idx;
extern thread_local uint3 t_block_idx;
extern thread_local dim3 t_block_dim;
extern thread_local dim3 t_grid_dim;

void syncthreads();
void syncwarp(unsigned mask);
// Shuffle of `bytes` (<= 8) at `value` (in place). mode: 0 idx, 1 up, 2 down, 3 xor.
void shfl(unsigned mask, void* value, int bytes, int mode, int arg, int width);
// 0 ballot, 1 any, 2 all.
unsigned vote(unsigned mask, bool pred, int mode);
// A switch to another thread with probability options().yield_prob.
void maybe_yield();
void threadfence();
bool in_kernel();

// Emulated sm80 primitives (mma_sm80.h).
void cp_async(void* smem_dst, const void* gmem_src, int bytes, bool valid);
void cp_async_commit();
void cp_async_wait(int pending);
void ldmatrix(uint32_t* regs, int matrices, bool trans, const void* smem_row);
void mma_m16n8k16(float* c, const uint32_t* a, const uint32_t* b, bool bf16);

// Emulated sm90 primitives (sm90.h, implemented in src/sm90.cpp). Shared-memory operands are
// 32-bit shared-window addresses (smem_window_address of a pointer into dynamic shared memory).
uint32_t smem_window_address(const void* p);
void mbar_init(uint32_t bar, uint32_t count);
void fence_mbarrier_init();
// mbarrier.arrive (expect_tx: mbarrier.arrive.expect_tx with tx_bytes).
void mbar_arrive(uint32_t bar, bool expect_tx, uint32_t tx_bytes);
bool mbar_try_wait_parity(uint32_t bar, uint32_t parity);
void prefetch_tensormap(const void* map);
// cp.async.bulk.tensor.<rank>d.shared::cluster.global.tile.mbarrier::complete_tx::bytes
void tma_load(uint32_t dst, const void* map, uint32_t bar, const int32_t* coords, int rank);
void cp_async_shared(uint32_t dst, const void* src, int bytes, bool valid);
void cp_async_wait_all();
void fence_proxy_async();
void setmaxnreg(int regs, bool inc);
void named_barrier(int id, int threads, bool sync);
void wgmma_fence();
void wgmma_commit();
void wgmma_wait(int pending);
// wgmma.mma_async m64nNk16 .f32 accumulators, .f16 / .bf16 inputs. a_regs: the four A-fragment
// registers (register A operand) or nullptr (A from shared memory via desc_a).
void wgmma_mma_async(float* d, int n, const uint32_t* const* a_regs, uint64_t desc_a,
                     uint64_t desc_b, bool scale_d, int scale_a, int scale_b, int trans_a,
                     int trans_b, bool bf16);
// The kernel's compiler-level fence on wgmma operand registers: they must not belong to a wgmma
// still in flight.
void wgmma_fence_operands(const void* regs, size_t bytes);
// Named-barrier instances left partially arrived at the exit of a block, summed over the run
// (bar.arrive without the matching syncs; harmless on a GPU, reported to the harness).
long named_barrier_leftovers();

}  // namespace emu
