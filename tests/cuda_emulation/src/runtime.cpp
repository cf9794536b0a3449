// The emulator: fibers, the block scheduler, barriers and warp collectives, cp.async / ldmatrix /
// mma.sync semantics, memory checks, launches and the CUDA runtime API stand-ins. The Hopper
// primitives are in sm90.cpp (hooked in where noted: sm90_*); the shared state in
// runtime_internal.h.
//
// Mutations (compile this file with one of them to check that the sweeps can fail; see
// tests/test_cuda_emulation.py): EMU_MUTATE_LDMATRIX (lane 4g+3 of matrix 1 of a non-transposed
// ldmatrix reads row g^1), EMU_MUTATE_MMA (B element k = 15 of column 7 reads as 0),
// EMU_MUTATE_CP_ASYNC_WAIT (cp.async.wait_group N leaves N + 1 groups in flight),
// EMU_MUTATE_SHFL_XOR (lane 0 of __shfl_xor_sync with lane mask 1 reads lane 2: the last step of
// every butterfly reduction goes wrong in lane 0). sm90.cpp has its own.
#include "runtime_internal.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace emu {

using namespace detail;

Options& options() {
  static Options o;
  return o;
}

// ---------------------------------------------------------------------------------------------
// Devices.

namespace {
const DeviceProfile kDevices[kNumDevices] = {
    {"H100-SXM (emulated)", 132, 9, 0, 232448, 233472, 2048, 32, 65536, 50 << 20},
    {"A100 (emulated)", 108, 8, 0, 166912, 167936, 2048, 32, 65536, 40 << 20},
    {"sm_86 (emulated)", 84, 8, 6, 101376, 102400, 1536, 16, 65536, 6 << 20},
    // hypothetical: 90 KB per block, below the flash backward's 8-warp configuration at every
    // head dim (its 4-warp one still fits)
    {"90 KB part (emulated)", 84, 8, 6, 92160, 102400, 1536, 16, 65536, 6 << 20},
};
int g_device = 0;
cudaError_t g_last_error = cudaSuccess;
std::mutex g_api_mutex;

struct FuncAttr {
  const void* fn;
  int device;
  int max_dynamic_smem;
};
std::vector<FuncAttr> g_func_attrs;  // guarded by g_api_mutex
}  // namespace

const DeviceProfile& device_profile(int device) { return kDevices[device]; }
int current_device() { return g_device; }

// ---------------------------------------------------------------------------------------------
// Context switching: x86-64 hand-written (callee-saved registers, MXCSR and the x87 control
// word), elsewhere ucontext (slower: a signal-mask system call per switch).

#if EMU_ASM_SWITCH
extern "C" void emu_switch_context(void** save_sp, void* load_sp);
extern "C" void emu_fiber_trampoline();
extern "C" void emu_fiber_entry();
asm(R"(
  .text
  .p2align 4
  .globl emu_switch_context
  .type emu_switch_context,@function
emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_context,.-emu_switch_context
  .p2align 4
  .globl emu_fiber_trampoline
  .type emu_fiber_trampoline,@function
emu_fiber_trampoline:
  call emu_fiber_entry
  ud2
  .size emu_fiber_trampoline,.-emu_fiber_trampoline
)");
#else
extern "C" void emu_fiber_entry();
#endif

namespace detail {

const char* op_name(int k) {
  switch (k) {
    case kOpShfl: return "__shfl_*_sync";
    case kOpSyncwarp: return "__syncwarp";
    case kOpVote: return "__ballot/__any/__all_sync";
    case kOpLdmatrix: return "ldmatrix";
    case kOpMma: return "mma.sync";
    case kOpNamedBarrier: return "bar.sync / bar.arrive";
    default: return "?";
  }
}

thread_local Worker* t_worker = nullptr;

double uniform(Worker& w) { return std::uniform_real_distribution<double>(0.0, 1.0)(w.rng); }
int uniform_int(Worker& w, int n) { return std::uniform_int_distribution<int>(0, n - 1)(w.rng); }

}  // namespace detail

namespace {

struct SmemArray {
  unsigned char* (*address)();
  const char* name;
};
std::vector<SmemArray>& smem_registry() {
  static std::vector<SmemArray> r;
  return r;
}

struct GlobalRange {
  uintptr_t lo, hi;
  std::string name;
};
std::vector<GlobalRange> g_globals;

std::vector<Worker*> g_workers;  // persistent, one per worker index

}  // namespace

thread_local uint3 t_thread_idx;
thread_local uint3 t_block_idx;
thread_local dim3 t_block_dim;
thread_local dim3 t_grid_dim;

bool in_kernel() { return t_worker != nullptr && t_worker->current >= 0; }

void fail(const char* fmt, ...) {
  char msg[2048];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  std::string where;
  if (t_worker != nullptr && t_worker->launch != nullptr) {
    const LaunchConfig& l = *t_worker->launch;
    char buf[1024];
    std::snprintf(buf, sizeof buf, "\n  in launch of %s (%s:%d), grid (%u,%u,%u) x block (%u,%u,%u), %zu B smem",
                  l.kernel, l.file, l.line, l.grid.x, l.grid.y, l.grid.z, l.block.x, l.block.y,
                  l.block.z, l.smem);
    where += buf;
    if (t_worker->active) {
      std::snprintf(buf, sizeof buf, "\n  block (%u,%u,%u)", t_block_idx.x, t_block_idx.y, t_block_idx.z);
      where += buf;
    }
    if (t_worker->current >= 0) {
      std::snprintf(buf, sizeof buf, ", thread %d (warp %d, lane %d)", t_worker->current,
                    t_worker->current / 32, t_worker->current % 32);
      where += buf;
    }
  }
  std::fprintf(stderr, "EMU FAILURE: %s%s\n", msg, where.c_str());
  std::fflush(stderr);
  std::_Exit(3);
}

// ---------------------------------------------------------------------------------------------
// Memory registries and checks.

void register_global(const void* ptr, size_t bytes, const char* name) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(ptr);
  g_globals.push_back({lo, lo + bytes, name});
}

void clear_globals() { g_globals.clear(); }

void check_global(const void* ptr, size_t bytes, const char* what) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
  for (const GlobalRange& r : g_globals) {
    if (a >= r.lo && a + bytes <= r.hi) return;
  }
  std::string near;
  for (const GlobalRange& r : g_globals) {
    char buf[256];
    const long long off = static_cast<long long>(a) - static_cast<long long>(r.lo);
    if (a + bytes > r.lo - 4096 && a < r.hi + 4096) {
      std::snprintf(buf, sizeof buf, " (%lld bytes from the start of %s, %zu bytes long)", off,
                    r.name.c_str(), static_cast<size_t>(r.hi - r.lo));
      near += buf;
    }
  }
  fail("%s: global access of %zu bytes at %p outside every buffer%s", what, bytes, ptr, near.c_str());
}

SmemRegistrar::SmemRegistrar(unsigned char* (*address)(), const char* name) {
  smem_registry().push_back({address, name});
}

namespace detail {

// Offset of [p, p + bytes) in the running block's dynamic shared memory, or -1.
long smem_offset(const Worker& w, const void* p, size_t bytes) {
  const unsigned char* a = static_cast<const unsigned char*>(p);
  for (unsigned char* base : w.smem_bases) {
    if (a >= base && a + bytes <= base + w.smem_bytes) return static_cast<long>(a - base);
  }
  return -1;
}

long check_smem(const Worker& w, const void* p, size_t bytes, size_t align, const char* what) {
  const long off = smem_offset(w, p, bytes);
  if (off < 0) {
    fail("%s: %zu bytes at %p are not inside the block's %zu bytes of dynamic shared memory", what,
         bytes, p, w.smem_bytes);
  }
  if (off % static_cast<long>(align) != 0) {
    fail("%s: shared address at offset %ld is not %zu-byte aligned", what, off, align);
  }
  return off;
}

// ---------------------------------------------------------------------------------------------
// Scheduling.

void runq_add(Worker& w, int f) {
  Fiber& fb = w.fibers[f];
  fb.runq_pos = static_cast<int>(w.runq.size());
  w.runq.push_back(f);
}

void runq_remove(Worker& w, int f) {
  Fiber& fb = w.fibers[f];
  const int pos = fb.runq_pos;
  const int last = w.runq.back();
  w.runq[pos] = last;
  w.fibers[last].runq_pos = pos;
  w.runq.pop_back();
  fb.runq_pos = -1;
}

// Back to the scheduler; returns when this fiber is picked again.
void suspend(Worker& w) {
  Fiber& f = w.fibers[w.current];
#if EMU_ASM_SWITCH
  emu_switch_context(&f.sp, w.sched_sp);
#else
  swapcontext(&f.ctx, &w.sched_ctx);
#endif
}

void land(Worker& w, const Copy& c) {
  if (c.valid) {
    std::memcpy(c.dst, c.src, c.bytes);
  } else {
    std::memset(c.dst, 0, c.bytes);
  }
  const long off = smem_offset(w, c.dst, c.bytes);
  for (long i = off / 4; i < (off + c.bytes) / 4; ++i) --w.pending[i];
  if (w.sm90) sm90_landed(w, c);
}

// Random policy: every copy in flight of the running thread lands with probability 1/4.
void land_some(Worker& w, Fiber& f) {
  if (options().copies != CopyPolicy::kRandom || f.copies.empty()) return;
  size_t kept = 0;
  for (size_t i = 0; i < f.copies.size(); ++i) {
    if (uniform(w) < 0.25) {
      land(w, f.copies[i]);
    } else {
      f.copies[kept++] = f.copies[i];
    }
  }
  f.copies.resize(kept);
}

// The running thread stays runnable but lets the scheduler pick (possibly itself).
void yield_now(Worker& w) {
  land_some(w, w.fibers[w.current]);
  suspend(w);
}

int pick(Worker& w) {
  if (w.prefer >= 0) {  // a thread just woken by the running one (sm90.cpp), if it can run
    const int f = w.prefer;
    w.prefer = -1;
    if (w.fibers[f].state == kRunnable) return f;
  }
  if (options().sched == Sched::kWarp && w.current >= 0 && uniform(w) >= 1.0 / 16) {
    // next runnable lane of the same warp, cyclically
    const int warp = w.current / 32;
    const int base = warp * 32;
    const int n = std::min(32, w.nthreads - base);
    const int lane = w.current % 32;
    for (int k = 1; k <= n; ++k) {
      const int f = base + (lane + k) % n;
      if (w.fibers[f].state == kRunnable) return f;
    }
  }
  return w.runq[uniform_int(w, static_cast<int>(w.runq.size()))];
}

std::string describe_waits(Worker& w) {
  std::string s;
  char buf[256];
  std::snprintf(buf, sizeof buf, "%d threads at __syncthreads (of %d live)", w.cta_arrived, w.live);
  s += buf;
  for (size_t i = 0; i < w.warps.size(); ++i) {
    const Warp& wp = w.warps[i];
    if (wp.arrived > 0) {
      std::snprintf(buf, sizeof buf, "; warp %zu: %d of %d live lanes in %s", i, wp.arrived, wp.live,
                    op_name(wp.kind));
      s += buf;
    }
  }
  if (w.sm90) s += sm90_describe(w);
  return s;
}

void fiber_finished(Worker& w);

}  // namespace detail
}  // namespace emu

extern "C" void emu_fiber_entry() {
  emu::detail::Worker& w = *emu::detail::t_worker;
  (*w.body)();
  emu::detail::fiber_finished(w);
  std::abort();  // not reached
}

namespace emu {
namespace detail {

void release_cta(Worker& w) {
  if (w.sm90) {  // bar.sync 0: every participant learns what the others knew
    std::vector<int> all(w.cta_waiters);
    if (w.current >= 0) all.push_back(w.current);
    sm90_merge_knowledge(w, all.data(), static_cast<int>(all.size()));
  }
  w.cta_arrived = 0;
  for (int f : w.cta_waiters) {
    w.fibers[f].state = kRunnable;
    runq_add(w, f);
  }
  w.cta_waiters.clear();
}

void fiber_finished(Worker& w) {
  Fiber& f = w.fibers[w.current];
  // Copies never waited for still land (their results are unobservable after the exit).
  for (const Copy& c : f.copies) land(w, c);
  f.copies.clear();
  if (w.sm90) sm90_thread_exit(w, w.current);
  f.state = kDone;
  runq_remove(w, w.current);
  --w.live;
  Warp& wp = w.warps[w.current / 32];
  --wp.live;
  if (wp.arrived > 0) {
    fail("a thread exited while %d other lanes of its warp wait in %s (full-warp mask)",
         wp.arrived, op_name(wp.kind));
  }
  // Exited threads do not take part in later barriers.
  if (w.cta_arrived > 0 && w.cta_arrived == w.live) release_cta(w);
  suspend(w);
}

void init_fiber_stack(Worker& w, Fiber& f) {
  if (f.stack == nullptr) {
    void* m = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) fail("mmap of a fiber stack failed");
    f.stack = static_cast<unsigned char*>(m);
    mprotect(f.stack, 4096, PROT_NONE);  // overflow faults instead of corrupting a neighbour
  }
#if EMU_ASM_SWITCH
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t{15};
  // Frame popped by emu_switch_context: [fpcw, mxcsr] (16 bytes), r15 r14 r13 r12 rbx rbp, and
  // the return address (the trampoline); rsp is 16-byte aligned after the ret, so the
  // trampoline's call enters emu_fiber_entry with the ABI's alignment.
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 88);
  std::memset(sp, 0, 88);
  uint16_t fpcw = 0x037F;
  uint32_t mxcsr = 0x1F80;
  std::memcpy(reinterpret_cast<unsigned char*>(sp), &fpcw, 2);
  std::memcpy(reinterpret_cast<unsigned char*>(sp) + 8, &mxcsr, 4);
  sp[8] = reinterpret_cast<uint64_t>(&emu_fiber_trampoline);
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack + 4096;
  f.ctx.uc_stack.ss_size = kStackBytes - 4096;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&emu_fiber_entry), 0);
#endif
  (void)w;
}

void run_block(Worker& w, uint3 block_idx) {
  const LaunchConfig& l = *w.launch;
  const int n = static_cast<int>(l.block.x * l.block.y * l.block.z);
  w.nthreads = n;
  w.live = n;
  t_block_idx = block_idx;
  if (static_cast<int>(w.fibers.size()) < n) w.fibers.resize(n);
  w.runq.clear();
  w.warps.assign((n + 31) / 32, Warp{});
  for (size_t i = 0; i < w.warps.size(); ++i) {
    w.warps[i].lanes = std::min(32, n - static_cast<int>(i) * 32);
    w.warps[i].live = w.warps[i].lanes;
  }
  w.cta_arrived = 0;
  w.cta_waiters.clear();
  for (unsigned char* base : w.smem_bases) std::memset(base, 0xFF, w.smem_bytes + kSmemCanary);
  std::fill(w.pending.begin(), w.pending.end(), 0);
  for (int i = 0; i < n; ++i) {
    Fiber& f = w.fibers[i];
    f.linear = i;
    f.tid = make_uint3(i % l.block.x, (i / l.block.x) % l.block.y, i / (l.block.x * l.block.y));
    f.state = kRunnable;
    f.commits = 0;
    f.copies.clear();
    f.wg_inflight.clear();
    f.wg_commits = 0;
    f.wg_fenced = false;
    f.unfenced.clear();
    f.know.clear();
    init_fiber_stack(w, f);
    runq_add(w, i);
  }
  sm90_block_begin(w);
  w.prefer = -1;
  w.active = true;
  w.current = -1;
  while (w.live > 0) {
    if (w.sm90) sm90_schedule_point(w);
    if (w.runq.empty()) {
      // asynchronous operations (TMA) still in flight complete before anything can be a deadlock
      if (w.sm90 && sm90_progress(w)) continue;
      fail("deadlock: no thread can run; %s", describe_waits(w).c_str());
    }
    const int f = pick(w);
    w.current = f;
    t_thread_idx = w.fibers[f].tid;
#if EMU_ASM_SWITCH
    emu_switch_context(&w.sched_sp, w.fibers[f].sp);
#else
    swapcontext(&w.sched_ctx, &w.fibers[f].ctx);
#endif
  }
  w.current = -1;
  if (w.sm90) sm90_block_end(w);
  // The bytes after the launch's dynamic shared memory must still hold the poison.
  for (unsigned char* base : w.smem_bases) {
    for (size_t i = w.smem_bytes; i < w.smem_bytes + kSmemCanary; ++i) {
      if (base[i] != 0xFF) {
        fail("a thread wrote shared memory at offset %zu, past the block's %zu bytes of dynamic "
             "shared memory", i, w.smem_bytes);
      }
    }
  }
  w.active = false;
}

Worker& worker(int index) {
  while (static_cast<int>(g_workers.size()) <= index) {
    g_workers.push_back(new Worker);
    g_workers.back()->index = static_cast<int>(g_workers.size()) - 1;
  }
  return *g_workers[index];
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Barriers and collectives.

void syncthreads() {
  Worker& w = *t_worker;
  ++w.cta_arrived;
  if (w.cta_arrived == w.live) {
    release_cta(w);
    yield_now(w);  // the last arriver does not get to run first
    return;
  }
  Fiber& f = w.fibers[w.current];
  land_some(w, f);
  f.state = kAtBarrier;
  runq_remove(w, w.current);
  w.cta_waiters.push_back(w.current);
  suspend(w);
}

namespace detail {

void warp_op(int kind, const int (&common)[3], const void* in, size_t in_bytes, int arg, void* out,
             size_t out_bytes, Compute compute, bool allow_exited) {
  Worker& w = *t_worker;
  const int lane = w.current % 32;
  Warp& wp = w.warps[w.current / 32];
  if (wp.arrived == 0) {
    wp.kind = kind;
    std::memcpy(wp.common, common, sizeof common);
    wp.present = 0;
  } else if (wp.kind != kind || std::memcmp(wp.common, common, sizeof common) != 0) {
    fail("lanes of one warp are in different warp collectives (%s [%d %d %d] and %s [%d %d %d])",
         op_name(wp.kind), wp.common[0], wp.common[1], wp.common[2], op_name(kind), common[0],
         common[1], common[2]);
  }
  std::memcpy(wp.in[lane], in, in_bytes);
  wp.arg[lane] = arg;
  wp.present |= 1u << lane;
  ++wp.arrived;
  if (wp.arrived == wp.live) {
    if (wp.live != wp.lanes && !allow_exited) {
      fail("%s with a full-warp mask after %d lanes of the warp exited", op_name(kind),
           wp.lanes - wp.live);
    }
    compute(w, wp);
    wp.arrived = 0;
    for (int f : wp.waiters) {
      w.fibers[f].state = kRunnable;
      runq_add(w, f);
    }
    wp.waiters.clear();
    yield_now(w);
  } else {
    Fiber& f = w.fibers[w.current];
    land_some(w, f);
    f.state = kInWarpOp;
    runq_remove(w, w.current);
    wp.waiters.push_back(w.current);
    suspend(w);
  }
  std::memcpy(out, wp.out[lane], out_bytes);
}

void check_mask(unsigned mask, const char* what) {
  Worker& w = *t_worker;
  const Warp& wp = w.warps[w.current / 32];
  const uint32_t full = wp.lanes == 32 ? 0xffffffffu : ((1u << wp.lanes) - 1u);
  if ((mask & full) != full) fail("%s with mask 0x%08x: partial-warp masks are not emulated", what, mask);
}

}  // namespace detail

void syncwarp(unsigned mask) {
  check_mask(mask, "__syncwarp");
  const int common[3] = {0, 0, 0};
  char dummy = 0;
  warp_op(kOpSyncwarp, common, &dummy, 1, 0, &dummy, 1, [](Worker& w, Warp& wp) {
    if (!w.sm90) return;
    int lanes[32];
    const int base = w.current / 32 * 32;
    for (int i = 0; i < wp.lanes; ++i) lanes[i] = base + i;
    sm90_merge_knowledge(w, lanes, wp.lanes);
  });
}

void shfl(unsigned mask, void* value, int bytes, int mode, int arg, int width) {
  check_mask(mask, "__shfl_*_sync");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) fail("shuffle width %d", width);
  const int common[3] = {mode, bytes, width};
  unsigned char buf[8] = {};
  std::memcpy(buf, value, bytes);
  warp_op(kOpShfl, common, buf, 8, arg, value, bytes, [](Worker&, Warp& wp) {
    const int mode = wp.common[0];
    const int width = wp.common[2];
    for (int lane = 0; lane < wp.lanes; ++lane) {
      const int seg = lane & ~(width - 1);
      const int a = wp.arg[lane];
      int src = lane;
      switch (mode) {
        case 0: src = seg + (a & (width - 1)); break;
        case 1: src = lane - a >= seg ? lane - a : lane; break;
        case 2: src = lane + a < seg + width ? lane + a : lane; break;
        case 3: src = lane ^ a; if (src < seg || src >= seg + width) src = lane; break;
      }
#if defined(EMU_MUTATE_SHFL_XOR)
      if (mode == 3 && a == 1 && lane == 0) src = 2;  // the last butterfly step of lane 0
#endif
      if (src >= wp.lanes) src = lane;
      std::memcpy(wp.out[lane], wp.in[src], 8);
    }
  });
}

unsigned vote(unsigned mask, bool pred, int mode) {
  check_mask(mask, "__ballot/__any/__all_sync");
  const int common[3] = {mode, 0, 0};
  const unsigned char in = pred ? 1 : 0;
  unsigned result = 0;
  warp_op(kOpVote, common, &in, 1, 0, &result, sizeof result, [](Worker&, Warp& wp) {
    unsigned ballot = 0;
    for (int lane = 0; lane < wp.lanes; ++lane) ballot |= wp.in[lane][0] ? (1u << lane) : 0u;
    const uint32_t full = wp.lanes == 32 ? 0xffffffffu : ((1u << wp.lanes) - 1u);
    const unsigned r = wp.common[0] == 0 ? ballot : wp.common[0] == 1 ? (ballot != 0) : (ballot == full);
    for (int lane = 0; lane < wp.lanes; ++lane) std::memcpy(wp.out[lane], &r, sizeof r);
  });
  return result;
}

void maybe_yield() {
  Worker* w = t_worker;
  if (w == nullptr || w->current < 0) return;
  if (uniform(*w) < options().yield_prob) yield_now(*w);
}

void threadfence() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  maybe_yield();
}

// ---------------------------------------------------------------------------------------------
// cp.async

void cp_async(void* smem_dst, const void* gmem_src, int bytes, bool valid) {
  Worker& w = *t_worker;
  Fiber& f = w.fibers[w.current];
  const long off = check_smem(w, smem_dst, bytes, bytes, "cp.async destination");
  if (valid) {
    check_global(gmem_src, bytes, "cp.async source");
    if (reinterpret_cast<uintptr_t>(gmem_src) % bytes != 0) {
      fail("cp.async: global source %p is not %d-byte aligned", gmem_src, bytes);
    }
  }
  Copy c{static_cast<unsigned char*>(smem_dst), static_cast<const unsigned char*>(gmem_src), bytes,
         valid, f.commits, w.current};
  for (long i = off / 4; i < (off + bytes) / 4; ++i) ++w.pending[i];
  if (options().copies == CopyPolicy::kEarly ||
      (options().copies == CopyPolicy::kRandom && uniform(w) < 0.25)) {
    land(w, c);
  } else {
    f.copies.push_back(c);
  }
  maybe_yield();
}

void cp_async_commit() {
  Worker& w = *t_worker;
  ++w.fibers[w.current].commits;
  maybe_yield();
}

void cp_async_wait(int pending) {
  Worker& w = *t_worker;
  Fiber& f = w.fibers[w.current];
#if defined(EMU_MUTATE_CP_ASYNC_WAIT)
  pending += 1;
#endif
  // Groups [0, commits - pending) must have landed.
  const int retire_below = f.commits - pending;
  size_t kept = 0;
  for (size_t i = 0; i < f.copies.size(); ++i) {
    if (f.copies[i].group < retire_below) {
      land(w, f.copies[i]);
    } else {
      f.copies[kept++] = f.copies[i];
    }
  }
  f.copies.resize(kept);
  maybe_yield();
}

// ---------------------------------------------------------------------------------------------
// ldmatrix / mma.sync

void ldmatrix(uint32_t* regs, int matrices, bool trans, const void* smem_row) {
  Worker& w = *t_worker;
  const int lane = w.current % 32;
  if (lane < 8 * matrices) check_smem(w, smem_row, 16, 16, "ldmatrix row address");
  const int common[3] = {matrices, trans ? 1 : 0, 0};
  const uintptr_t addr = reinterpret_cast<uintptr_t>(smem_row);
  warp_op(kOpLdmatrix, common, &addr, sizeof addr, 0, regs, 4 * matrices, [](Worker& w, Warp& wp) {
    const int matrices = wp.common[0];
    const bool trans = wp.common[1] != 0;
    const unsigned char* rows[32];
    for (int r = 0; r < 8 * matrices; ++r) {
      uintptr_t a;
      std::memcpy(&a, wp.in[r], sizeof a);
      rows[r] = reinterpret_cast<const unsigned char*>(a);
      const long off = smem_offset(w, rows[r], 16);
      for (long i = off / 4; i < off / 4 + 4; ++i) {
        if (w.pending[i] != 0) {
          fail("ldmatrix reads shared memory (row %d of the warp, offset %ld) that a cp.async still "
               "in flight writes: missing cp.async.wait_group or __syncthreads", r, off);
        }
      }
    }
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      uint32_t out[4];
      for (int m = 0; m < matrices; ++m) {
        uint16_t lo, hi;
        if (!trans) {
          int row = 8 * m + g;
#if defined(EMU_MUTATE_LDMATRIX)
          if (m == 1 && t == 3) row = 8 * m + (g ^ 1);
#endif
          std::memcpy(&lo, rows[row] + 2 * (2 * t), 2);
          std::memcpy(&hi, rows[row] + 2 * (2 * t + 1), 2);
        } else {
          std::memcpy(&lo, rows[8 * m + 2 * t] + 2 * g, 2);
          std::memcpy(&hi, rows[8 * m + 2 * t + 1] + 2 * g, 2);
        }
        out[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
      }
      std::memcpy(wp.out[lane], out, 4 * matrices);
    }
  });
}

void mma_m16n8k16(float* c, const uint32_t* a, const uint32_t* b, bool bf16) {
  unsigned char in[40];
  std::memcpy(in, a, 16);
  std::memcpy(in + 16, b, 8);
  std::memcpy(in + 24, c, 16);
  const int common[3] = {bf16 ? 1 : 0, 0, 0};
  warp_op(kOpMma, common, in, sizeof in, 0, c, 16, [](Worker&, Warp& wp) {
    const bool bf16 = wp.common[0] != 0;
    float A[16][16], B[16][8], C[16][8];
    // Fragments (PTX ISA, mma.m16n8k16 .f16/.bf16), lane = 4 g + t:
    //   a[i] holds A(g + 8 (i & 1), 2t + 8 (i >> 1) + {0, 1}); b[i] holds B(2t + 8 i + {0, 1}, g);
    //   c[i] holds C(g + 8 (i >> 1), 2t + (i & 1)).
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      uint32_t ra[4], rb[2];
      float rc[4];
      std::memcpy(ra, wp.in[lane], 16);
      std::memcpy(rb, wp.in[lane] + 16, 8);
      std::memcpy(rc, wp.in[lane] + 24, 16);
      for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i & 1), col = 2 * t + 8 * (i >> 1);
        A[row][col] = half_bits_to_float(static_cast<uint16_t>(ra[i] & 0xFFFF), bf16);
        A[row][col + 1] = half_bits_to_float(static_cast<uint16_t>(ra[i] >> 16), bf16);
      }
      for (int i = 0; i < 2; ++i) {
        const int k = 2 * t + 8 * i;
        B[k][g] = half_bits_to_float(static_cast<uint16_t>(rb[i] & 0xFFFF), bf16);
        B[k + 1][g] = half_bits_to_float(static_cast<uint16_t>(rb[i] >> 16), bf16);
      }
      for (int i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = rc[i];
    }
#if defined(EMU_MUTATE_MMA)
    B[15][7] = 0.0f;
#endif
    // Products of 16-bit values are exact in float; the sum of 16 products and C is formed in
    // double and rounded once (the tensor core's internal order and width are not modelled).
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      float d[4];
      for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
        double acc = C[row][col];
        for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[row][k]) * B[k][col];
        d[i] = static_cast<float>(acc);
      }
      std::memcpy(wp.out[lane], d, 16);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Launch.

namespace {

std::atomic<uint64_t> g_launch_counter{0};
std::vector<LaunchRecord> g_launch_log;

cudaError_t launch_error(const LaunchConfig& l, cudaError_t err, const char* why) {
  std::fprintf(stderr, "EMU: launch of %s (%s:%d) refused: %s\n", l.kernel, l.file, l.line, why);
  std::lock_guard<std::mutex> lock(g_api_mutex);
  g_last_error = err;
  return err;
}

void run_worker(int index, const LaunchConfig& l, const std::function<void()>& body,
                const std::vector<uint3>& blocks, std::atomic<size_t>& next, uint64_t seed) {
  Worker& w = worker(index);
  t_worker = &w;
  w.rng.seed(seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(index) + 1);
  w.launch = &l;
  w.body = &body;
  w.smem_bases.clear();
  for (const SmemArray& a : smem_registry()) w.smem_bases.push_back(a.address());
  w.smem_bytes = l.smem;
  w.pending.assign((l.smem + 3) / 4, 0);
  t_block_dim = l.block;
  t_grid_dim = l.grid;
  for (;;) {
    const size_t i = next.fetch_add(1);
    if (i >= blocks.size()) break;
    run_block(w, blocks[i]);
  }
  w.launch = nullptr;
  t_worker = nullptr;
}

}  // namespace

const std::vector<LaunchRecord>& launches() { return g_launch_log; }

cudaError_t launch(const LaunchConfig& l, const std::function<void()>& body) {
  if (in_kernel()) fail("kernel launch from inside a kernel (dynamic parallelism) is not emulated");
  const DeviceProfile& dev = kDevices[g_device];
  const uint64_t threads = uint64_t{l.block.x} * l.block.y * l.block.z;
  if (l.grid.x == 0 || l.grid.y == 0 || l.grid.z == 0) {
    return launch_error(l, cudaErrorInvalidConfiguration, "a grid dimension is 0");
  }
  if (l.grid.x > 0x7fffffffu || l.grid.y > 65535 || l.grid.z > 65535) {
    return launch_error(l, cudaErrorInvalidConfiguration, "grid dimension above the limit");
  }
  if (threads == 0 || threads > 1024 || l.block.z > 64) {
    return launch_error(l, cudaErrorInvalidConfiguration, "block size outside [1, 1024]");
  }
  int allowed = 48 * 1024;
  if (l.id != nullptr) {
    std::lock_guard<std::mutex> lock(g_api_mutex);
    for (const FuncAttr& a : g_func_attrs) {
      if (a.fn == l.id && a.device == g_device) allowed = std::max(allowed, a.max_dynamic_smem);
    }
  }
  if (l.smem > static_cast<size_t>(allowed)) {
    char why[256];
    std::snprintf(why, sizeof why,
                  "%zu bytes of dynamic shared memory, above the %d the kernel is allowed on device "
                  "%d (cudaFuncSetAttribute(MaxDynamicSharedMemorySize) not called or too small%s)",
                  l.smem, allowed, g_device,
                  l.id == nullptr ? "; or the launch site does not name one kernel specialization" : "");
    return launch_error(l, cudaErrorInvalidValue, why);
  }
  if (l.smem > static_cast<size_t>(dev.smem_optin)) {
    return launch_error(l, cudaErrorInvalidValue, "dynamic shared memory above the device's opt-in limit");
  }
  if (l.smem + kSmemCanary > kMaxDynamicSmem) fail("the emulator's dynamic shared memory arrays are too small");

  {
    std::lock_guard<std::mutex> lock(g_api_mutex);
    g_launch_log.push_back({l.kernel, l.grid, l.block, l.smem});
  }
  const uint64_t launch_index = g_launch_counter.fetch_add(1);
  const uint64_t seed = options().seed * 1000003ull + launch_index;
  std::vector<uint3> blocks;
  blocks.reserve(static_cast<size_t>(l.grid.x) * l.grid.y * l.grid.z);
  for (unsigned z = 0; z < l.grid.z; ++z)
    for (unsigned y = 0; y < l.grid.y; ++y)
      for (unsigned x = 0; x < l.grid.x; ++x) blocks.push_back(make_uint3(x, y, z));
  if (options().shuffle_blocks) {
    std::mt19937_64 rng(seed);
    std::shuffle(blocks.begin(), blocks.end(), rng);
  }
  if (options().verbose) {
    std::fprintf(stderr, "EMU: launch %s grid (%u,%u,%u) block (%u,%u,%u) smem %zu\n", l.kernel,
                 l.grid.x, l.grid.y, l.grid.z, l.block.x, l.block.y, l.block.z, l.smem);
  }
  std::atomic<size_t> next{0};
  const int workers = std::max(1, std::min<int>(options().workers, static_cast<int>(blocks.size())));
  if (workers == 1) {
    run_worker(0, l, body, blocks, next, seed);
  } else {
    for (int i = 0; i < workers; ++i) worker(i);  // create before the threads start
    std::vector<std::thread> pool;
    for (int i = 0; i < workers; ++i) {
      pool.emplace_back([&, i] { run_worker(i, l, body, blocks, next, seed); });
    }
    for (std::thread& t : pool) t.join();
  }
  return cudaSuccess;
}

}  // namespace emu

// ---------------------------------------------------------------------------------------------
// CUDA runtime API stand-ins (the launchers' host calls).

extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = emu::g_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= emu::kNumDevices) return cudaErrorInvalidDevice;
  emu::g_device = device;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = emu::kNumDevices;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= emu::kNumDevices) return cudaErrorInvalidDevice;
  const emu::DeviceProfile& d = emu::kDevices[device];
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d.sms; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_optin; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = d.smem_per_sm; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; break;
    case cudaDevAttrComputeCapabilityMajor: *value = d.cc_major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = d.cc_minor; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = d.max_threads_per_sm; break;
    case cudaDevAttrMaxBlocksPerMultiprocessor: *value = d.max_blocks_per_sm; break;
    case cudaDevAttrMaxRegistersPerMultiprocessor: *value = d.regs_per_sm; break;
    case cudaDevAttrMaxRegistersPerBlock: *value = 65536; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrL2CacheSize: *value = d.l2_bytes; break;
    case cudaDevAttrMaxGridDimX: *value = 0x7fffffff; break;
    case cudaDevAttrMaxGridDimY:
    case cudaDevAttrMaxGridDimZ: *value = 65535; break;
    default:
      std::fprintf(stderr, "EMU: cudaDeviceGetAttribute(%d) is not emulated\n", static_cast<int>(attr));
      return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > emu::kDevices[emu::g_device].smem_optin) return cudaErrorInvalidValue;
    std::lock_guard<std::mutex> lock(emu::g_api_mutex);
    for (emu::FuncAttr& a : emu::g_func_attrs) {
      if (a.fn == func && a.device == emu::g_device) {
        a.max_dynamic_smem = value;
        return cudaSuccess;
      }
    }
    emu::g_func_attrs.push_back({func, emu::g_device, value});
  }
  return cudaSuccess;
}

// The launchers read numRegs / ptxVersion / binaryVersion (the sm90 one checks that the image is
// the sm_90a body): an sm_90a image with options().kernel_regs registers per thread.
cudaError_t cudaFuncGetAttributes(struct cudaFuncAttributes* attr, const void* func) {
  if (attr == nullptr || func == nullptr) return cudaErrorInvalidValue;
  std::memset(attr, 0, sizeof *attr);
  attr->maxThreadsPerBlock = 1024;
  attr->numRegs = emu::options().kernel_regs;
  attr->ptxVersion = 90;
  attr->binaryVersion = 90;
  attr->maxDynamicSharedSizeBytes = 48 * 1024;
  std::lock_guard<std::mutex> lock(emu::g_api_mutex);
  for (const emu::FuncAttr& a : emu::g_func_attrs) {
    if (a.fn == func && a.device == emu::g_device) attr->maxDynamicSharedSizeBytes = a.max_dynamic_smem;
  }
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void*,
                                                                   int block_size,
                                                                   size_t dynamic_smem, unsigned) {
  // Threads and shared memory only (registers are unknown on the host): a plausible upper bound.
  const emu::DeviceProfile& d = emu::kDevices[emu::g_device];
  if (block_size <= 0) return cudaErrorInvalidValue;
  const int warps = (block_size + 31) / 32;
  int n = std::min(d.max_blocks_per_sm, d.max_threads_per_sm / (32 * warps));
  if (dynamic_smem > 0) n = std::min<int>(n, static_cast<int>(d.smem_per_sm / (dynamic_smem + 1024)));
  *blocks = std::max(n, 0);
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* func,
                                                          int block_size, size_t dynamic_smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(blocks, func, block_size,
                                                                dynamic_smem, 0);
}

cudaError_t cudaGetLastError(void) {
  std::lock_guard<std::mutex> lock(emu::g_api_mutex);
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) {
  std::lock_guard<std::mutex> lock(emu::g_api_mutex);
  return emu::g_last_error;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error (emulated)";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
    default: return "error (emulated)";
  }
}

const char* cudaGetErrorName(cudaError_t error) { return cudaGetErrorString(error); }

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  emu::check_global(ptr, count, "cudaMemsetAsync");
  std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t cudaMemset(void* ptr, int value, size_t count) {
  return cudaMemsetAsync(ptr, value, count, nullptr);
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }

}  // extern "C"
