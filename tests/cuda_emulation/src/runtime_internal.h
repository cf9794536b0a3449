// The emulator's internal state, shared by src/runtime.cpp (fibers, scheduler, barriers, warp
// collectives, cp.async / ldmatrix / mma.sync, launches) and src/sm90.cpp (the Hopper primitives:
// mbarriers, TMA, named barriers, setmaxnreg, wgmma, proxy fences). Not part of the API the
// kernels see (that is runtime.h).
#pragma once

#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <cuda_fp16.h>

#include "thinkfuse_emu/runtime.h"

// EMU_USE_UCONTEXT forces the portable (slower) context switch on x86-64 too.
#if defined(__x86_64__) && !defined(EMU_USE_UCONTEXT)
#define EMU_ASM_SWITCH 1
#else
#define EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

namespace emu {
namespace detail {

// A float16 (or, with bf16, bfloat16) bit pattern as float: the operands of mma.sync and wgmma.
inline float half_bits_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

constexpr size_t kStackBytes = 256 * 1024;  // kernel frames are < 2 KB at -O2
// Bytes after the dynamic shared memory of a launch checked for stray writes after each block.
constexpr size_t kSmemCanary = 4096;
constexpr int kMaxThreads = 1024;
// mbarrier objects per block the emulator tracks (the sm90 kernel uses 9).
constexpr int kMaxMbarriers = 32;
// Hardware named barriers per CTA (PTX ISA, "bar / barrier": 16, numbered 0..15).
constexpr int kNamedBarriers = 16;
// Index of thread 0's clock in a knowledge vector (after the mbarrier phase entries).
constexpr int kClock0 = kMaxMbarriers;

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int bytes;
  bool valid;
  int group;  // number of commits before it was issued
  int fiber;  // the issuing thread
};

enum FiberState : uint8_t {
  kRunnable,
  kAtBarrier,      // __syncthreads
  kInWarpOp,       // a warp collective
  kAtMbarrier,     // mbarrier.try_wait on a phase that has not completed
  kAtNamedBarrier, // bar.sync on a named barrier that has not completed
  kInWgOp,         // a warpgroup-wide operation (wgmma.*, setmaxnreg)
  kDone,
};

// One wgmma.mma_async of one thread between its issue and the wait_group that retires it.
struct WgInflight {
  int group;          // commit-group index (the thread's commit count at issue)
  float* acc;         // the thread's accumulator registers (the kernel's array)
  int n;              // accumulator floats per thread (N / 2)
  int record;         // index into Worker::wg_records (the shared-memory operand reads)
  bool rs;            // A from registers
  const uint32_t* a_ptr[4];
  uint32_t a_val[4];
  float result[128];  // D of this thread, written to acc when retired
};

struct Fiber {
  void* sp = nullptr;
  unsigned char* stack = nullptr;  // mmap'd, lowest page a guard
#if !EMU_ASM_SWITCH
  ucontext_t ctx;
#endif
  uint3 tid{};
  int linear = 0;
  FiberState state = kRunnable;
  int runq_pos = -1;
  int commits = 0;
  std::vector<Copy> copies;  // in flight
  // --- sm90 (src/sm90.cpp) ---
  std::vector<WgInflight> wg_inflight;  // wgmma issued, not retired
  int wg_commits = 0;                   // wgmma.commit_group count
  bool wg_fenced = false;               // a wgmma.fence since the last wait_group
  std::vector<std::pair<long, int>> unfenced;  // landed cp.async (offset, bytes), no proxy fence yet
  // What this thread knows happened before its current point (a vector clock, see sm90.cpp):
  // know[b] for b < kMaxMbarriers: the phases < know[b] of mbarrier b completed; know[kClock0 +
  // t]: thread t's events up to that clock value.
  std::vector<uint32_t> know;
};

// One warp collective in progress: the lanes deposit their operands, the last one to arrive
// computes every lane's result.
enum OpKind : int { kOpNone, kOpShfl, kOpSyncwarp, kOpVote, kOpLdmatrix, kOpMma, kOpNamedBarrier };
const char* op_name(int k);

struct Warp {
  int lanes = 0;  // threads of the block in this warp
  int live = 0;   // not exited
  int arrived = 0;
  int kind = kOpNone;
  int common[3] = {0, 0, 0};  // operation parameters that every lane must agree on
  uint32_t present = 0;
  int arg[32];
  alignas(16) unsigned char in[32][48];
  alignas(16) unsigned char out[32][32];
  std::vector<int> waiters;
};

// --- sm90 block state (src/sm90.cpp) --------------------------------------------------------

struct Mbarrier {
  long off = -1;           // byte offset in the block's dynamic shared memory
  uint32_t expected = 0;   // arrivals per phase (the init count)
  uint32_t pending = 0;    // arrivals still missing in the current phase
  int64_t tx = 0;          // tx-count of the current phase
  uint32_t phase = 0;      // index of the current phase = phases completed
  int init_thread = -1;
  bool init_fenced = false;  // fence.mbarrier_init by the initialising thread
  std::vector<int> waiters;
  std::vector<uint32_t> release_acc;   // knowledge of the current phase's arrivals
  std::vector<uint32_t> release_done;  // ... of the last completed phase (what a waiter acquires)
};

struct NamedBarrier {
  int expected = 0;        // thread count of the current instance (0: idle)
  int arrived = 0;         // threads (warp-size units) arrived
  uint64_t warps = 0;      // warps arrived in the current instance
  uint64_t generation = 0; // completed instances
  std::vector<int> waiters;
  std::vector<uint32_t> acc;       // knowledge of the current instance's participants
  std::vector<uint32_t> last_acc;  // ... of the last completed instance (for its syncers)
};

struct TmaCopy {
  long off;         // destination offset in dynamic shared memory
  uint32_t bytes;   // box bytes (what complete_tx signals)
  int mbar;         // barrier index
  int issuer;
  unsigned char map[128];
  int32_t coords[5];
  int rank;
};

// The shared-memory words one wgmma reads, with a hash of their contents at issue.
struct WgRecord {
  std::vector<uint32_t> words;
  uint64_t hash = 0;
  bool done = false;  // retired by a thread of the warpgroup: the reads have completed
};

struct WgSlot {
  uint64_t desc_a, desc_b;
  int32_t scale_d;
  uint32_t a[4];
  const uint32_t* a_ptr[4];
  float* acc;
  int record;  // the wgmma's WgRecord (set by the last arriver for every thread)
  float c[128];
  float d[128];
};

struct Warpgroup {
  int lanes = 0;
  int live = 0;
  int arrived = 0;
  int kind = 0;
  int64_t common[6] = {0, 0, 0, 0, 0, 0};
  std::vector<int> waiters;
  int regs = 0;         // per-thread register count (setmaxnreg)
  int pending_inc = 0;  // setmaxnreg.inc waiting for registers (target count), 0 none
  std::vector<WgSlot> slots;
};

// The state of one OS thread running blocks.
struct Worker {
  int index = 0;
  std::mt19937_64 rng;
  std::vector<Fiber> fibers;
  void* sched_sp = nullptr;
#if !EMU_ASM_SWITCH
  ucontext_t sched_ctx;
#endif
  int current = -1;
  int nthreads = 0;
  int live = 0;
  std::vector<int> runq;
  std::vector<Warp> warps;
  int cta_arrived = 0;
  std::vector<int> cta_waiters;
  // dynamic shared memory of the running block
  std::vector<unsigned char*> smem_bases;
  size_t smem_bytes = 0;
  std::vector<uint16_t> pending;  // per 4 bytes of dynamic smem: cp.async / TMA writes in flight
  const std::function<void()>* body = nullptr;
  const LaunchConfig* launch = nullptr;
  bool active = false;

  // --- sm90 (src/sm90.cpp); `sm90` is set by the first Hopper primitive of a block ---
  bool sm90 = false;
  uint32_t window_base = 0;            // shared-window address of dynamic smem byte 0
  unsigned char* window_array = nullptr;  // the extern __shared__ array the kernel addresses
  std::vector<Mbarrier> mbars;
  NamedBarrier nbars[kNamedBarriers];
  std::vector<TmaCopy> tma_inflight;
  std::vector<int16_t> unfenced_writer;  // per word: cp.async writer thread + 1, no proxy fence yet
  std::vector<int16_t> pub_thread;       // per word: cp.async writer + 1 whose fence covered it
  std::vector<uint32_t> pub_clock;       // ... and that writer's clock at the fence
  std::vector<uint32_t> tma_tag;         // per word: (mbar + 1) << 24 | phase of the TMA that wrote it
  std::vector<uint16_t> wg_reading;      // per word: in-flight wgmma reading it
  std::vector<int8_t> mbar_word;         // per word: part of an mbarrier object
  std::vector<WgRecord> wg_records;
  std::vector<Warpgroup> wgs;
  int64_t reg_pool = 0;                  // registers released by setmaxnreg.dec, not yet taken
  int prefer = -1;                       // the scheduler's next pick if runnable (a woken waiter)

  ~Worker() {
    for (Fiber& f : fibers) {
      if (f.stack) munmap(f.stack, kStackBytes);
    }
  }
};

extern thread_local Worker* t_worker;

double uniform(Worker& w);
int uniform_int(Worker& w, int n);

long smem_offset(const Worker& w, const void* p, size_t bytes);
long check_smem(const Worker& w, const void* p, size_t bytes, size_t align, const char* what);
void runq_add(Worker& w, int f);
void runq_remove(Worker& w, int f);
void suspend(Worker& w);
void land(Worker& w, const Copy& c);
void land_some(Worker& w, Fiber& f);
void yield_now(Worker& w);

using Compute = void (*)(Worker&, Warp&);
// Deposits `in` (<= 48 bytes) and waits for the warp; returns with the lane's result in `out`.
// allow_exited: the operation may run after lanes of the warp exited (bar.sync / bar.arrive).
void warp_op(int kind, const int (&common)[3], const void* in, size_t in_bytes, int arg, void* out,
             size_t out_bytes, Compute compute, bool allow_exited = false);

// Hooks of src/sm90.cpp into the scheduler and the sm80-era primitives.
void sm90_block_begin(Worker& w);      // before the block's threads start
void sm90_block_end(Worker& w);        // after the last thread exited
bool sm90_progress(Worker& w);         // nobody can run: complete an async operation if any
void sm90_schedule_point(Worker& w);   // between two thread switches (random completions)
std::string sm90_describe(Worker& w);  // the sm90 waits, for a deadlock report
void sm90_thread_exit(Worker& w, int fiber);
void sm90_landed(Worker& w, const Copy& c);  // a cp.async landed (generic-proxy write)
// Participants of a completed barrier / __syncwarp learn what each other knew (mbarrier phases).
void sm90_merge_knowledge(Worker& w, const int* fibers, int n);

}  // namespace detail
}  // namespace emu
