// The Hopper (sm_90a) primitives of thinkfuse/sm90.cuh on the emulator: shared-window addresses,
// mbarriers, TMA tile loads through emulated tensor maps (cuTensorMapEncodeTiled), cp.async with
// wait_all, proxy fences, setmaxnreg, named barriers, and wgmma (fence, commit_group, wait_group,
// mma_async with shared-memory matrix descriptors and a register A operand).
//
// Sources of truth (implemented from these, not from the kernel's own comments):
//   [PTX-mbarrier]  PTX ISA, "Parallel Synchronization and Communication Instructions: mbarrier":
//                   phases, pending arrival count, tx-count (range +-(2^20 - 1)), a phase
//                   completes when both reach zero; init count in [1, 2^20 - 1]; init of a valid
//                   object is undefined; try_wait.parity waits for the completion of the phase
//                   of the given parity, i.e. it is true iff the current phase's parity differs
//                   (the phase before the current one is complete); try_wait may also return
//                   false when its time limit expires. Restated by libcu++ (cuda::ptx
//                   mbarrier_try_wait_parity docs) and CUTLASS cutlass/arch/barrier.h.
//   [PTX-tensor]    PTX ISA, "cp.async.bulk.tensor": tile mode loads the tensor map's box at
//                   the given coordinates, elements outside the tensor bounds are filled (zero
//                   with CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE), mbarrier::complete_tx::bytes
//                   signals the box's full size to the mbarrier; the destination is 128-byte
//                   aligned.
//   [cuda.h]        CUDA driver API cuTensorMapEncodeTiled (cuda.h of the installed toolkit):
//                   every parameter requirement checked in tensor_map_encode below; the
//                   swizzle modes "swizzle 16B chunks within a 32/64/128B span", and the box's
//                   inner dimension at most the span.
//   [PTX-wgmma]     PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate":
//                   wgmma.mma_async (D = A B (+ D), A M x K row-major = K-major, B K x N
//                   column-major = K-major, imm-trans selects the transposed (MN-major) layout,
//                   imm-scale negates; descriptor contents the same in all warps; .aligned:
//                   every thread of the warpgroup executes it), wgmma.fence (required before
//                   the first wgmma and between register accesses and a wgmma using those
//                   registers, except accumulator chains of the same shape), commit_group /
//                   wait_group N (waits until at most N of the most recent groups are pending and
//                   all earlier ones complete), the register fragments of A and D for m64nNk16,
//                   "Matrix Descriptor Format" (start address, LBO, SBO >> 4 in bits 0-13,
//                   16-29, 32-45, base offset bits 49-51, swizzle mode bits 62-63: 0 none,
//                   1 128B, 2 64B, 3 32B; matrix-descriptor-encode(x) = (x & 0x3FFFF) >> 4;
//                   base offset 0 when the swizzle pattern starts at a 1024 / 512 / 256-byte
//                   boundary) and "Shared Memory Matrix Layout" (the canonical layouts).
//   [CUTLASS]       cute/arch/mma_sm90_desc.hpp (GmmaDescriptor bit fields) and
//                   cute/atom/mma_traits_sm90_gmma.hpp: make_gmma_desc's canonical layouts in
//                   units of 16 bytes (K-major SW128 ((8,m),(8,2)):((8,SBO),(1,1)) - LBO unused;
//                   MN-major SW128 ((8,n),(8,k)):((1,LBO),(8,SBO)); no swizzle K-major
//                   ((8,m),2):((1,SBO),LBO), MN-major ((1,n),(8,k)):((X,SBO),(1,LBO))), the
//                   Swizzle<B,4,3> address permutation, and the fragment layouts CLayout_64xN
//                   ((4,8,4),(2,2,N/8)):((128,1,16),(64,8,512)) and ALayout_64x16.
//   [PTX-bar]       PTX ISA, "bar / barrier": barriers 0..15, thread count a multiple of the
//                   warp size, arrival counted per warp, bar.sync waits, bar.arrive does not,
//                   a warp must not arrive again before the barrier completes.
//   [PTX-setmaxnreg] PTX ISA, "setmaxnreg": per-CTA register pool, .inc blocks until enough
//                   registers are available, the same instruction executed by all warps of the
//                   warpgroup, count in [24, 256] and a multiple of 8, .dec needs current >=
//                   count, .inc current <= count.
//   [PTX-proxy]     PTX ISA, "Memory Consistency Model: proxies" and "fence.proxy": wgmma
//                   operand reads and TMA are async-proxy accesses; cp.async (non-bulk) writes
//                   are generic-proxy writes, which need fence.proxy.async before an async-proxy
//                   access of the same memory.
//
// Mutations (a deliberately wrong emulator; tests/test_cuda_emulation.py checks the sm90 cases
// then fail): EMU_MUTATE_TMA_SWIZZLE (TMA places chunk c of 128-byte row r at c ^ ((r + 1) % 8)),
// EMU_MUTATE_WGMMA_LBO (MN-major swizzled operands ignore the leading byte offset),
// EMU_MUTATE_TMA_TX (complete_tx signals only the in-bounds bytes of a box).
#include <cuda.h>

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "runtime_internal.h"

namespace emu {

using namespace detail;

namespace {

std::atomic<long> g_named_leftovers{0};  // blocks may run on two OS threads

// Accumulator registers of an in-flight wgmma hold this NaN until the wait_group retiring it.
constexpr uint32_t kAccPoison = 0x7FC0FEEDu;

enum WgKind : int { kWgNone, kWgFence, kWgCommit, kWgWait, kWgMma, kWgSetmaxnreg };
const char* wg_name(int k) {
  switch (k) {
    case kWgFence: return "wgmma.fence";
    case kWgCommit: return "wgmma.commit_group";
    case kWgWait: return "wgmma.wait_group";
    case kWgMma: return "wgmma.mma_async";
    case kWgSetmaxnreg: return "setmaxnreg";
    default: return "?";
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor maps: what the emulated cuTensorMapEncodeTiled stores in the 128-byte opaque object.

constexpr uint32_t kTensorMapMagic = 0x50414D54u;  // "TMAP"

struct EmuTensorMap {
  uint32_t magic;
  uint8_t dtype, rank, interleave, swizzle, l2, oob, elem_bytes, pad;
  uint32_t pad2;
  uint64_t gaddr;
  uint64_t dims[5];
  uint64_t strides[4];  // bytes, dims 1 .. rank-1 (dim 0 is contiguous)
  uint16_t box[5];
  uint8_t estride[5];
};
static_assert(sizeof(EmuTensorMap) <= 128, "fits CUtensorMap");

int dtype_bytes(int dtype) {
  switch (dtype) {
    case CU_TENSOR_MAP_DATA_TYPE_UINT8: return 1;
    case CU_TENSOR_MAP_DATA_TYPE_UINT16:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT16:
    case CU_TENSOR_MAP_DATA_TYPE_BFLOAT16: return 2;
    case CU_TENSOR_MAP_DATA_TYPE_UINT32:
    case CU_TENSOR_MAP_DATA_TYPE_INT32:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32_FTZ:
    case CU_TENSOR_MAP_DATA_TYPE_TFLOAT32:
    case CU_TENSOR_MAP_DATA_TYPE_TFLOAT32_FTZ: return 4;
    case CU_TENSOR_MAP_DATA_TYPE_UINT64:
    case CU_TENSOR_MAP_DATA_TYPE_INT64:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT64: return 8;
    default: return 0;  // the packed sub-byte types: not emulated
  }
}

// Swizzle span in bytes of a CUtensorMapSwizzle (0: none, -1: a mode not emulated).
int swizzle_span(int swizzle) {
  switch (swizzle) {
    case CU_TENSOR_MAP_SWIZZLE_NONE: return 0;
    case CU_TENSOR_MAP_SWIZZLE_32B: return 32;
    case CU_TENSOR_MAP_SWIZZLE_64B: return 64;
    case CU_TENSOR_MAP_SWIZZLE_128B: return 128;
    default: return -1;
  }
}

EmuTensorMap read_map(const void* map, const char* what) {
  EmuTensorMap m;
  std::memcpy(&m, map, sizeof m);
  if (m.magic != kTensorMapMagic) {
    fail("%s: the tensor map at %p was not encoded by cuTensorMapEncodeTiled (an all-zero or "
         "foreign CUtensorMap)", what, map);
  }
  return m;
}

}  // namespace

// The emulated driver entry point [cuda.h]: the requirements listed for cuTensorMapEncodeTiled
// return CUDA_ERROR_INVALID_VALUE, as the driver does; features the emulator does not model
// (interleave, packed types, the 128B_ATOM swizzles) fail loudly instead.
extern "C" CUresult emu_cuTensorMapEncodeTiled(
    CUtensorMap* tensorMap, CUtensorMapDataType tensorDataType, cuuint32_t tensorRank,
    void* globalAddress, const cuuint64_t* globalDim, const cuuint64_t* globalStrides,
    const cuuint32_t* boxDim, const cuuint32_t* elementStrides, CUtensorMapInterleave interleave,
    CUtensorMapSwizzle swizzle, CUtensorMapL2promotion l2Promotion,
    CUtensorMapFloatOOBfill oobFill) {
  if (reinterpret_cast<uintptr_t>(tensorMap) % 64 != 0) return CUDA_ERROR_INVALID_VALUE;
  const int elem = dtype_bytes(tensorDataType);
  if (elem == 0) fail("cuTensorMapEncodeTiled: data type %d is not emulated", tensorDataType);
  if (interleave != CU_TENSOR_MAP_INTERLEAVE_NONE) fail("cuTensorMapEncodeTiled: interleave is not emulated");
  if (tensorRank == 0 || tensorRank > 5) return CUDA_ERROR_INVALID_VALUE;
  if (reinterpret_cast<uintptr_t>(globalAddress) % 16 != 0) return CUDA_ERROR_INVALID_VALUE;
  const int span = swizzle_span(swizzle);
  if (span < 0) fail("cuTensorMapEncodeTiled: swizzle mode %d is not emulated", swizzle);
  EmuTensorMap m{};
  m.magic = kTensorMapMagic;
  m.dtype = static_cast<uint8_t>(tensorDataType);
  m.rank = static_cast<uint8_t>(tensorRank);
  m.interleave = static_cast<uint8_t>(interleave);
  m.swizzle = static_cast<uint8_t>(swizzle);
  m.l2 = static_cast<uint8_t>(l2Promotion);
  m.oob = static_cast<uint8_t>(oobFill);
  m.elem_bytes = static_cast<uint8_t>(elem);
  m.gaddr = reinterpret_cast<uintptr_t>(globalAddress);
  for (cuuint32_t i = 0; i < tensorRank; ++i) {
    if (globalDim[i] == 0 || globalDim[i] > (uint64_t{1} << 32)) return CUDA_ERROR_INVALID_VALUE;
    if (boxDim[i] == 0 || boxDim[i] > 256) return CUDA_ERROR_INVALID_VALUE;
    if (elementStrides[i] == 0 || elementStrides[i] > 8) return CUDA_ERROR_INVALID_VALUE;
    m.dims[i] = globalDim[i];
    m.box[i] = static_cast<uint16_t>(boxDim[i]);
    m.estride[i] = static_cast<uint8_t>(elementStrides[i]);
  }
  for (cuuint32_t i = 0; i + 1 < tensorRank; ++i) {
    if (globalStrides[i] % 16 != 0 || globalStrides[i] >= (uint64_t{1} << 40)) return CUDA_ERROR_INVALID_VALUE;
    m.strides[i] = globalStrides[i];
  }
  const uint64_t inner = uint64_t{boxDim[0]} * elem;
  if (inner % 16 != 0) return CUDA_ERROR_INVALID_VALUE;
  if (span > 0 && inner > static_cast<uint64_t>(span)) return CUDA_ERROR_INVALID_VALUE;
  if (oobFill == CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA &&
      (tensorDataType == CU_TENSOR_MAP_DATA_TYPE_UINT8 || tensorDataType == CU_TENSOR_MAP_DATA_TYPE_UINT16 ||
       tensorDataType == CU_TENSOR_MAP_DATA_TYPE_UINT32 || tensorDataType == CU_TENSOR_MAP_DATA_TYPE_INT32 ||
       tensorDataType == CU_TENSOR_MAP_DATA_TYPE_UINT64 || tensorDataType == CU_TENSOR_MAP_DATA_TYPE_INT64)) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  std::memset(tensorMap, 0, sizeof(CUtensorMap));
  std::memcpy(tensorMap, &m, sizeof m);
  return CUDA_SUCCESS;
}

namespace {

// ---------------------------------------------------------------------------------------------
// Block state.

void activate(Worker& w) {
  if (w.sm90) return;
  w.sm90 = true;
  w.window_array = nullptr;
  const int base = options().smem_window_base;
  // sm90 reserves the first 1 KB of a CTA's shared window; the dynamic array follows (16-byte
  // aligned at least; kernels must not assume more than they align themselves).
  w.window_base = base >= 0 ? static_cast<uint32_t>(base) : 1024u + 16u * static_cast<uint32_t>(uniform_int(w, 64));
  const size_t words = (w.smem_bytes + 3) / 4;
  w.unfenced_writer.assign(words, 0);
  w.pub_thread.assign(words, 0);
  w.pub_clock.assign(words, 0);
  w.tma_tag.assign(words, 0);
  w.wg_reading.assign(words, 0);
  w.mbar_word.assign(words, 0);
  w.mbars.clear();
  const size_t k = kClock0 + w.nthreads;
  for (NamedBarrier& b : w.nbars) {
    b = NamedBarrier{};
    b.acc.assign(k, 0);
    b.last_acc.assign(k, 0);
  }
  for (int t = 0; t < w.nthreads; ++t) {
    w.fibers[t].know.assign(k, 0);
    w.fibers[t].know[kClock0 + t] = 1;  // a thread's events before its first release: clock 1
  }
  w.tma_inflight.clear();
  w.wg_records.clear();
  w.reg_pool = 0;
  const int ngroups = (w.nthreads + 127) / 128;
  if (static_cast<int>(w.wgs.size()) < ngroups) w.wgs.resize(ngroups);
  for (int g = 0; g < ngroups; ++g) {
    Warpgroup& wg = w.wgs[g];
    wg.lanes = std::min(128, w.nthreads - 128 * g);
    wg.live = 0;
    for (int i = 0; i < wg.lanes; ++i) wg.live += w.fibers[128 * g + i].state != kDone;
    wg.arrived = 0;
    wg.kind = kWgNone;
    wg.waiters.clear();
    wg.regs = options().kernel_regs;
    wg.pending_inc = 0;
    wg.slots.resize(128);
  }
}

Fiber& me(Worker& w) { return w.fibers[w.current]; }

Worker& worker_in_kernel(const char* what) {
  Worker* w = t_worker;
  if (w == nullptr || w->current < 0) fail("%s outside a kernel", what);
  activate(*w);
  return *w;
}

// Offset in dynamic shared memory of the shared-window range [addr, addr + bytes).
long window_offset(Worker& w, uint32_t addr, size_t bytes, size_t align, const char* what) {
  const long off = static_cast<long>(addr) - static_cast<long>(w.window_base);
  if (w.window_array == nullptr) {
    fail("%s: shared address 0x%x used before any smem_address of the dynamic shared memory", what, addr);
  }
  if (off < 0 || static_cast<size_t>(off) + bytes > w.smem_bytes) {
    fail("%s: shared address 0x%x (%zu bytes) is outside the block's dynamic shared memory "
         "[0x%x, 0x%zx)", what, addr, bytes, w.window_base, w.window_base + w.smem_bytes);
  }
  if (addr % align != 0) fail("%s: shared address 0x%x is not %zu-byte aligned", what, addr, align);
  return off;
}

unsigned char* smem_at(Worker& w, long off) { return w.window_array + off; }

// ---------------------------------------------------------------------------------------------
// mbarriers [PTX-mbarrier].

int mbar_index(Worker& w, uint32_t addr, const char* what) {
  const long off = window_offset(w, addr, 8, 8, what);
  for (size_t i = 0; i < w.mbars.size(); ++i) {
    if (w.mbars[i].off == off) return static_cast<int>(i);
  }
  fail("%s: no initialised mbarrier at shared address 0x%x (missing mbarrier.init, or a wrong "
       "address)", what, addr);
}

void complete_phase(Worker& w, Mbarrier& m) {
  ++m.phase;
  m.pending = m.expected;
  m.tx = 0;
  m.release_done = m.release_acc;
  std::fill(m.release_acc.begin(), m.release_acc.end(), 0u);
  for (int f : m.waiters) {
    w.fibers[f].state = kRunnable;
    runq_add(w, f);
  }
  // the waiting threads react at once (adversarial for a stage released too early) half of the time
  if (!m.waiters.empty() && w.current >= 0 && uniform(w) < 0.5) {
    w.prefer = m.waiters[uniform_int(w, static_cast<int>(m.waiters.size()))];
  }
  m.waiters.clear();
}

// Knowledge (happens-before) as a vector clock over the mbarrier phases and the threads' clocks:
// a release (mbarrier arrive, bar.arrive / bar.sync, __syncwarp, __syncthreads) publishes the
// thread's knowledge to the synchronisation object and ticks its own clock; an acquire (a
// completed wait) joins the object's knowledge into the thread's. Plain loads / stores, shuffles
// and atomics are not synchronisation here.
void merge_into(std::vector<uint32_t>& dst, const std::vector<uint32_t>& src) {
  for (size_t i = 0; i < dst.size(); ++i) dst[i] = std::max(dst[i], src[i]);
}

void tick(Worker& w, int t) { ++w.fibers[t].know[kClock0 + t]; }

void complete_tx(Worker& w, int idx, uint32_t bytes) {
  Mbarrier& m = w.mbars[idx];
  m.tx -= bytes;
  if (m.tx < -((int64_t{1} << 20) - 1)) {
    fail("mbarrier #%d: tx-count %" PRId64 " below -(2^20 - 1) (complete_tx of %u bytes)", idx, m.tx, bytes);
  }
  if (m.pending == 0 && m.tx == 0) complete_phase(w, m);
}

// ---------------------------------------------------------------------------------------------
// TMA [PTX-tensor], [cuda.h].

// Where the byte of (unswizzled) shared-window address `addr` goes under a swizzle of `span`
// bytes: the 16-byte chunk index within each span-byte line is XORed with the line's index
// within the 8-line pattern, as a function of the shared-memory address bits (Swizzle<B,4,3>:
// address bits [4, 4 + B) ^= bits [7, 7 + B), the pattern repeating every 8 x span bytes) - for
// the TMA's writes and for the wgmma descriptors' reads alike.
uint32_t swizzle_address(uint32_t addr, int span) {
  if (span == 0) return addr;
  const uint32_t mask = static_cast<uint32_t>(span / 16 - 1);  // 1, 3, 7
  return addr ^ (((addr >> 7) & mask) << 4);
}

void tma_land(Worker& w, const TmaCopy& c) {
  EmuTensorMap m;
  std::memcpy(&m, c.map, sizeof m);
  const int rank = m.rank;
  const int elem = m.elem_bytes;
  const int span = swizzle_span(m.swizzle);
  uint32_t box[5] = {1, 1, 1, 1, 1};
  for (int i = 0; i < rank; ++i) box[i] = m.box[i];
  const uint32_t row_bytes = box[0] * elem;
  std::vector<unsigned char> row(row_bytes);
  uint64_t inbounds_bytes = 0;
  uint32_t lin = 0;  // box byte offset of the current row
  for (uint32_t i4 = 0; i4 < box[4]; ++i4)
    for (uint32_t i3 = 0; i3 < box[3]; ++i3)
      for (uint32_t i2 = 0; i2 < box[2]; ++i2)
        for (uint32_t i1 = 0; i1 < box[1]; ++i1, lin += row_bytes) {
          const uint32_t idx[5] = {0, i1, i2, i3, i4};
          bool row_in = true;
          uint64_t base = m.gaddr;
          for (int d = 1; d < rank; ++d) {
            const int64_t c_d = static_cast<int64_t>(c.coords[d]) + idx[d];
            if (c_d < 0 || static_cast<uint64_t>(c_d) >= m.dims[d]) {
              row_in = false;
              break;
            }
            base += static_cast<uint64_t>(c_d) * m.strides[d - 1];
          }
          std::fill(row.begin(), row.end(), 0);  // out of bounds: zeros (OOB_FILL_NONE)
          if (row_in) {
            // the in-bounds run of dim 0
            const int64_t c0 = c.coords[0];
            const int64_t lo = std::max<int64_t>(c0, 0);
            const int64_t hi = std::min<int64_t>(c0 + box[0], static_cast<int64_t>(m.dims[0]));
            if (hi > lo) {
              const unsigned char* src = reinterpret_cast<const unsigned char*>(base + lo * elem);
              check_global(src, (hi - lo) * elem, "TMA tile load (global source)");
              std::memcpy(row.data() + (lo - c0) * elem, src, (hi - lo) * elem);
              inbounds_bytes += (hi - lo) * elem;
            }
          }
          // place the row's 16-byte chunks
          for (uint32_t ch = 0; ch < row_bytes; ch += 16) {
            const uint32_t addr = w.window_base + static_cast<uint32_t>(c.off) + lin + ch;
            uint32_t dst = swizzle_address(addr, span);
#if defined(EMU_MUTATE_TMA_SWIZZLE)
            if (span == 128) dst = addr ^ ((((addr >> 7) + 1) & 7u) << 4);
#endif
            const long off = static_cast<long>(dst - w.window_base);
            std::memcpy(smem_at(w, off), row.data() + ch, 16);
          }
        }
  const Mbarrier& mb = w.mbars[c.mbar];
  const uint32_t tag = (static_cast<uint32_t>(c.mbar + 1) << 24) | (mb.phase & 0xFFFFFFu);
  for (long i = c.off / 4; i < (c.off + static_cast<long>(c.bytes)) / 4; ++i) {
    --w.pending[i];
    w.unfenced_writer[i] = 0;
    w.pub_thread[i] = 0;
    w.tma_tag[i] = tag;
  }
  uint32_t signalled = c.bytes;  // the full box, zero-filled elements included
#if defined(EMU_MUTATE_TMA_TX)
  signalled = static_cast<uint32_t>(inbounds_bytes);
#endif
  (void)inbounds_bytes;
  complete_tx(w, c.mbar, signalled);
}

void tma_land_one(Worker& w) {
  const int i = uniform_int(w, static_cast<int>(w.tma_inflight.size()));
  const TmaCopy c = w.tma_inflight[i];
  w.tma_inflight.erase(w.tma_inflight.begin() + i);
  tma_land(w, c);
}

// ---------------------------------------------------------------------------------------------
// Warpgroup collectives.

Warpgroup& my_warpgroup(Worker& w, const char* what) {
  Warpgroup& wg = w.wgs[w.current / 128];
  if (wg.lanes != 128) {
    fail("%s in a warpgroup of %d threads (the block's size is not a multiple of 128)", what, wg.lanes);
  }
  return wg;
}

void wg_release(Worker& w, Warpgroup& wg) {
  wg.arrived = 0;
  for (int f : wg.waiters) {
    w.fibers[f].state = kRunnable;
    runq_add(w, f);
  }
  wg.waiters.clear();
}

void wg_block(Worker& w, Warpgroup& wg) {
  Fiber& f = me(w);
  f.state = kInWgOp;
  runq_remove(w, w.current);
  wg.waiters.push_back(w.current);
  suspend(w);
}

std::string wg_common_str(int kind, const int64_t (&c)[6]) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s [%" PRId64 " %" PRId64 " %" PRId64 " %" PRId64 "]", wg_name(kind), c[0],
                c[1], c[2], c[3]);
  return buf;
}

// The warpgroup rendezvous: every thread of the warpgroup executes the same operation with the
// same parameters (.sync.aligned); the last to arrive runs `compute` for all, which returns
// false to keep the warpgroup waiting (setmaxnreg.inc without registers).
void wg_arrive(Worker& w, int kind, const int64_t (&common)[6], bool (*compute)(Worker&, Warpgroup&, int)) {
  Warpgroup& wg = my_warpgroup(w, wg_name(kind));
  if (wg.arrived == 0) {
    wg.kind = kind;
    std::memcpy(wg.common, common, sizeof common);
  } else if (wg.kind != kind || std::memcmp(wg.common, common, sizeof common) != 0) {
    fail("threads of warpgroup %d are in different warpgroup operations (%s and %s): .aligned "
         "requires all of them to execute the same one", w.current / 128,
         wg_common_str(wg.kind, wg.common).c_str(), wg_common_str(kind, common).c_str());
  }
  ++wg.arrived;
  if (wg.arrived < wg.live) {
    land_some(w, me(w));
    wg_block(w, wg);
    return;
  }
  if (wg.live != wg.lanes) {
    fail("%s executed by warpgroup %d after %d of its threads exited (.aligned: every thread of "
         "the warpgroup must execute it)", wg_name(kind), w.current / 128, wg.lanes - wg.live);
  }
  if (compute(w, wg, w.current / 128)) {
    wg_release(w, wg);
    yield_now(w);
  } else {
    wg_block(w, wg);  // released by a later setmaxnreg.dec
  }
}

bool compute_nothing(Worker&, Warpgroup&, int) { return true; }

// ---------------------------------------------------------------------------------------------
// wgmma [PTX-wgmma], [CUTLASS].

struct Desc {
  uint32_t start, lbo, sbo;
  int base_offset, mode;
};

Desc decode_desc(uint64_t d, const char* which) {
  constexpr uint64_t kReserved = (uint64_t{3} << 14) | (uint64_t{3} << 30) | (uint64_t{7} << 46) |
                                 (uint64_t{0x3FF} << 52);
  if ((d & kReserved) != 0) {
    fail("wgmma: matrix descriptor %s = 0x%016" PRIx64 " has reserved bits set (bits 14-15, 30-31, "
         "46-48, 52-61; e.g. an address offset added past the 14-bit start address field)", which, d);
  }
  Desc r;
  r.start = static_cast<uint32_t>(d & 0x3FFF) << 4;
  r.lbo = static_cast<uint32_t>((d >> 16) & 0x3FFF) << 4;
  r.sbo = static_cast<uint32_t>((d >> 32) & 0x3FFF) << 4;
  r.base_offset = static_cast<int>((d >> 49) & 7);
  r.mode = static_cast<int>(d >> 62);
  if (r.base_offset != 0) {
    fail("wgmma: matrix descriptor %s has base offset %d: only 0 (swizzle pattern starting on its "
         "repeat boundary) is emulated", which, r.base_offset);
  }
  return r;
}

// Shared-window address of element (mn, k) (mn < 64 or N, k < 16) of a 16-bit operand described
// by `d`, K-major (the K elements of one row / column contiguous) or MN-major. Canonical layouts
// in 16-byte units, W = swizzle span / 16 (CUTLASS make_gmma_desc, PTX "Shared Memory Matrix
// Layout"):
//   K-major, no swizzle  ((8,m),(2)) : ((1,SBO),(LBO))     8 rows of 16 B, core matrices along
//                                                          MN at SBO, the two K halves at LBO
//   K-major, swizzled    ((8,m),(2)) : ((W,SBO),(1))       rows of 16W bytes, K contiguous
//   MN-major, no swizzle ((1,m),(8,k)) : ((-,SBO),(1,LBO)) 8 MN elements per 16 B, K rows 16 B
//                                                          apart, MN groups at SBO, K groups LBO
//   MN-major, swizzled   ((W,m),(8,k)) : ((1,LBO),(W,SBO)) 8W MN elements contiguous, next 8W at
//                                                          LBO, K rows 16W bytes apart, next 8 K
//                                                          at SBO
// then the Swizzle<B,4,3> permutation of the address bits (W = 2^B).
uint32_t operand_address(const Desc& d, bool mn_major, int mn, int k) {
  const int span = d.mode == 0 ? 0 : d.mode == 1 ? 128 : d.mode == 2 ? 64 : 32;
  const uint32_t W = span / 16;
  uint32_t a;
  if (!mn_major) {
    if (span == 0) {
      a = d.start + (mn % 8) * 16 + (mn / 8) * d.sbo + (k % 8) * 2 + (k / 8) * d.lbo;
    } else {
      a = d.start + (mn % 8) * 16 * W + (mn / 8) * d.sbo + k * 2;  // LBO unused
    }
  } else {
    if (span == 0) {
      a = d.start + (mn % 8) * 2 + (mn / 8) * d.sbo + (k % 8) * 16 + (k / 8) * d.lbo;
    } else {
      uint32_t lbo = d.lbo;
#if defined(EMU_MUTATE_WGMMA_LBO)
      lbo = 0;
#endif
      a = d.start + (mn % (8 * W)) * 2 + (mn / (8 * W)) * lbo + (k % 8) * 16 * W + (k / 8) * d.sbo;
    }
  }
  return swizzle_address(a, span);
}

struct OperandReader {
  Worker& w;
  std::vector<uint32_t>& words;
  uint16_t read(uint32_t addr, const char* which) {
    const long off = static_cast<long>(addr) - static_cast<long>(w.window_base);
    if (off < 0 || static_cast<size_t>(off) + 2 > w.smem_bytes || addr % 2 != 0) {
      fail("wgmma: operand %s element at shared address 0x%x is outside the block's dynamic "
           "shared memory [0x%x, 0x%zx)", which, addr, w.window_base, w.window_base + w.smem_bytes);
    }
    words.push_back(static_cast<uint32_t>(off / 4));
    uint16_t v;
    std::memcpy(&v, smem_at(w, off), 2);
    return v;
  }
};

uint64_t hash_words(Worker& w, const std::vector<uint32_t>& words) {
  uint64_t h = 1469598103934665603ull;
  for (uint32_t i : words) {
    uint32_t v;
    std::memcpy(&v, smem_at(w, static_cast<long>(i) * 4), 4);
    h = (h ^ i) * 1099511628211ull;
    h = (h ^ v) * 1099511628211ull;
  }
  return h;
}

// Every word a wgmma reads must hold completed, visible data: no TMA / cp.async still writing it,
// no cp.async write without a proxy fence, and a TMA write only if every thread of the warpgroup
// has observed the completion of the mbarrier phase it signalled.
void check_operand_words(Worker& w, int g, const std::vector<uint32_t>& words) {
  // the least any thread of the warpgroup knows, per knowledge entry (computed when needed)
  std::vector<uint32_t> least(kClock0 + w.nthreads, 0xFFFFFFFFu);
  std::vector<int> who(least.size(), -1);
  auto least_known = [&](size_t e) {
    if (who[e] < 0) {
      for (int t = 0; t < 128; ++t) {
        const uint32_t v = w.fibers[128 * g + t].know[e];
        if (v < least[e]) {
          least[e] = v;
          who[e] = 128 * g + t;
        }
      }
    }
    return least[e];
  };
  for (uint32_t i : words) {
    const long off = static_cast<long>(i) * 4;
    if (w.mbar_word[i]) fail("wgmma reads shared memory offset %ld, which holds an mbarrier", off);
    if (w.pending[i] != 0) {
      fail("wgmma reads shared memory (offset %ld) that a TMA / cp.async still in flight writes: "
           "missing mbarrier wait (or cp.async.wait) before the wgmma", off);
    }
    if (w.unfenced_writer[i] != 0) {
      fail("wgmma (async proxy) reads shared memory (offset %ld) written by a cp.async of thread %d "
           "(generic proxy) that executed no fence.proxy.async after the copy completed", off,
           w.unfenced_writer[i] - 1);
    }
    const uint32_t tag = w.tma_tag[i];
    if (tag != 0) {
      const int b = static_cast<int>(tag >> 24) - 1;
      const uint32_t phase = tag & 0xFFFFFFu;
      if (least_known(b) <= phase) {
        fail("wgmma reads shared memory (offset %ld) loaded by a TMA that signalled phase %u of "
             "mbarrier #%d (smem offset %ld), which thread %d of the warpgroup has not observed "
             "complete (it knows phases < %u): missing or wrong-parity mbarrier wait", off, phase, b,
             w.mbars[b].off, who[b], least[b]);
      }
    }
    if (w.pub_thread[i] != 0) {
      const int writer = w.pub_thread[i] - 1;
      if (least_known(kClock0 + writer) < w.pub_clock[i]) {
        fail("wgmma reads shared memory (offset %ld) written by a cp.async of thread %d (completed "
             "and proxy-fenced at its clock %u), but no synchronisation orders that fence before "
             "this wgmma for thread %d of the warpgroup (it knows thread %d's events up to %u): "
             "missing __syncwarp / barrier between the copies and the mbarrier arrive?", off,
             writer, w.pub_clock[i], who[kClock0 + writer], writer, least[kClock0 + writer]);
      }
    }
  }
}

bool compute_mma(Worker& w, Warpgroup& wg, int g) {
  const int n = static_cast<int>(wg.common[0] & 0xFFFF);
  const bool bf16 = (wg.common[0] >> 16) & 1;
  const bool rs = (wg.common[0] >> 17) & 1;
  const bool trans_a = (wg.common[0] >> 18) & 1;
  const bool trans_b = (wg.common[0] >> 19) & 1;
  const double sa = static_cast<double>(wg.common[1]);
  const double sb = static_cast<double>(wg.common[2]);
  const WgSlot& s0 = wg.slots[0];
  for (int t = 1; t < 128; ++t) {
    const WgSlot& s = wg.slots[t];
    if ((!rs && s.desc_a != s0.desc_a) || s.desc_b != s0.desc_b || s.scale_d != s0.scale_d) {
      fail("wgmma.mma_async: thread %d of warpgroup %d passes descriptors / scale-d (0x%016" PRIx64
           ", 0x%016" PRIx64 ", %d) different from thread 0's (0x%016" PRIx64 ", 0x%016" PRIx64
           ", %d): descriptor contents must be the same across the warpgroup", t, g, s.desc_a,
           s.desc_b, s.scale_d, s0.desc_a, s0.desc_b, s0.scale_d);
    }
  }
  std::vector<uint32_t> words;
  words.reserve(64 * 16 + n * 16);
  OperandReader rd{w, words};
  static thread_local float A[64][16];
  static thread_local float B[16][256];
  if (rs) {
    // A fragment of m64k16 (16-bit): lane 4g + t of warp v holds in register j the elements
    // (row 16 v + g + 8 (j % 2), cols 2 t + 8 (j / 2) + {0, 1}), lower half first
    // ([PTX-wgmma] register fragment of A; CUTLASS ALayout_64x16).
    for (int t = 0; t < 128; ++t) {
      const int v = t / 32, lane = t % 32, gq = lane / 4, tq = lane % 4;
      for (int j = 0; j < 4; ++j) {
        const uint32_t r = wg.slots[t].a[j];
        const int row = 16 * v + gq + 8 * (j % 2);
        const int col = 2 * tq + 8 * (j / 2);
        A[row][col] = half_bits_to_float(static_cast<uint16_t>(r & 0xFFFF), bf16);
        A[row][col + 1] = half_bits_to_float(static_cast<uint16_t>(r >> 16), bf16);
      }
    }
  } else {
    const Desc da = decode_desc(s0.desc_a, "a-desc");
    for (int m = 0; m < 64; ++m)
      for (int k = 0; k < 16; ++k) A[m][k] = half_bits_to_float(rd.read(operand_address(da, trans_a, m, k), "A"), bf16);
  }
  const Desc db = decode_desc(s0.desc_b, "b-desc");
  for (int nn = 0; nn < n; ++nn)
    for (int k = 0; k < 16; ++k) B[k][nn] = half_bits_to_float(rd.read(operand_address(db, trans_b, nn, k), "B"), bf16);
  std::sort(words.begin(), words.end());
  words.erase(std::unique(words.begin(), words.end()), words.end());
  check_operand_words(w, g, words);
  WgRecord rec;
  rec.words = words;
  rec.hash = hash_words(w, words);
  for (uint32_t i : words) ++w.wg_reading[i];
  w.wg_records.push_back(std::move(rec));
  // per thread (the next operation's first arrival may overwrite wg.common before a thread of
  // this one resumes)
  for (WgSlot& s : wg.slots) s.record = static_cast<int>(w.wg_records.size()) - 1;
  // D: accumulator fragment of m64nNk16 (f32): lane 4g + t of warp v holds d[i] = (row 16 v + g +
  // 8 ((i / 2) % 2), col 8 (i / 4) + 2 t + i % 2) ([PTX-wgmma]; CUTLASS CLayout_64xN). Products of
  // 16-bit values are exact; the 16-term sum and C are formed in double and rounded once.
  for (int t = 0; t < 128; ++t) {
    WgSlot& s = wg.slots[t];
    const int v = t / 32, lane = t % 32, gq = lane / 4, tq = lane % 4;
    for (int i = 0; i < n / 2; ++i) {
      const int row = 16 * v + gq + 8 * ((i / 2) % 2);
      const int col = 8 * (i / 4) + 2 * tq + i % 2;
      double acc = s.scale_d ? static_cast<double>(s.c[i]) : 0.0;
      for (int k = 0; k < 16; ++k) acc += sa * sb * static_cast<double>(A[row][k]) * B[k][col];
      s.d[i] = static_cast<float>(acc);
    }
  }
  return true;
}

bool overlaps(const void* a, size_t an, const void* b, size_t bn) {
  const auto x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  return x < y + bn && y < x + an;
}

void retire(Worker& w, Fiber& f, size_t upto_group) {
  std::vector<WgInflight> keep;
  const size_t n = f.wg_inflight.size();
  for (size_t i = 0; i < n; ++i) {
    WgInflight& op = f.wg_inflight[i];
    if (static_cast<size_t>(op.group) >= upto_group) {
      keep.push_back(op);
      continue;
    }
    WgRecord& rec = w.wg_records[op.record];
    if (!rec.done) {
      if (hash_words(w, rec.words) != rec.hash) {
        fail("shared memory read by a wgmma changed before the wgmma completed (its wait_group): "
             "the stage was overwritten (TMA / cp.async / store) while the wgmma could still read it");
      }
      for (uint32_t wd : rec.words) --w.wg_reading[wd];
      rec.done = true;
    }
    if (op.rs) {
      for (int j = 0; j < 4; ++j) {
        if (*op.a_ptr[j] != op.a_val[j]) {
          fail("A-fragment register %d of an in-flight wgmma was overwritten (0x%08x -> 0x%08x) "
               "before the wgmma.wait_group that retires it", j, op.a_val[j], *op.a_ptr[j]);
        }
      }
    }
    bool superseded = false;  // a later wgmma of this thread accumulates into the same registers
    for (size_t j = i + 1; j < n; ++j) superseded |= f.wg_inflight[j].acc == op.acc;
    if (superseded) continue;
    for (int k = 0; k < op.n; ++k) {
      uint32_t bits;
      std::memcpy(&bits, &op.acc[k], 4);
      if (bits != kAccPoison) {
        fail("accumulator register %d of an in-flight wgmma was written (or the array reused) "
             "before the wgmma.wait_group that retires it", k);
      }
    }
    std::memcpy(op.acc, op.result, sizeof(float) * op.n);
  }
  f.wg_inflight.swap(keep);
}

// ---------------------------------------------------------------------------------------------
// setmaxnreg [PTX-setmaxnreg].

bool try_grant(Worker& w, Warpgroup& wg) {
  const int64_t need = static_cast<int64_t>(wg.pending_inc - wg.regs) * wg.lanes;
  if (w.reg_pool < need) return false;
  w.reg_pool -= need;
  wg.regs = wg.pending_inc;
  wg.pending_inc = 0;
  return true;
}

bool compute_setmaxnreg(Worker& w, Warpgroup& wg, int g) {
  const int regs = static_cast<int>(wg.common[0]);
  const bool inc = wg.common[1] != 0;
  if (!inc) {
    if (wg.regs < regs) {
      fail("setmaxnreg.dec %d by warpgroup %d, which owns %d registers per thread (must be >= the "
           "count)", regs, g, wg.regs);
    }
    w.reg_pool += static_cast<int64_t>(wg.regs - regs) * wg.lanes;
    wg.regs = regs;
    for (Warpgroup& other : w.wgs) {  // registers for a waiting .inc
      if (&other != &wg && other.pending_inc != 0 && other.arrived == other.live && try_grant(w, other)) {
        wg_release(w, other);
      }
    }
    return true;
  }
  if (wg.regs > regs) {
    fail("setmaxnreg.inc %d by warpgroup %d, which owns %d registers per thread (must be <= the "
         "count)", regs, g, wg.regs);
  }
  wg.pending_inc = regs;
  return try_grant(w, wg);
}

// ---------------------------------------------------------------------------------------------
// Named barriers [PTX-bar].

void named_barrier_compute(Worker& w, Warp& wp) {
  const int id = wp.common[0], threads = wp.common[1];
  const bool sync = wp.common[2] != 0;
  NamedBarrier& b = w.nbars[id];
  const int warp = w.current / 32;
  if (b.expected == 0) {
    b.expected = threads;
  } else if (b.expected != threads) {
    fail("named barrier %d: warp %d arrives with a thread count of %d, the barrier's current "
         "instance was started with %d (all participants must give the same count)", id, warp,
         threads, b.expected);
  }
  if ((b.warps >> warp) & 1) {
    fail("warp %d arrives twice at named barrier %d before the barrier completes (%d of %d "
         "threads arrived): a warp must not execute more barrier instructions on a barrier than "
         "intended before its reset", warp, id, b.arrived, b.expected);
  }
  b.warps |= uint64_t{1} << warp;
  b.arrived += 32;  // arrivals count per warp, in units of the warp size
  for (int i = 0; i < wp.lanes; ++i) {  // release
    merge_into(b.acc, w.fibers[32 * warp + i].know);
    tick(w, 32 * warp + i);
  }
  const uint64_t gen = b.generation;
  if (b.arrived == b.expected) {  // complete: the syncers learn acc (named_barrier), b resets
    for (int f : b.waiters) {
      w.fibers[f].state = kRunnable;
      runq_add(w, f);
    }
    b.waiters.clear();
    b.expected = 0;
    b.arrived = 0;
    b.warps = 0;
    b.last_acc = b.acc;
    std::fill(b.acc.begin(), b.acc.end(), 0u);
    ++b.generation;
  }
  (void)sync;
  for (int i = 0; i < 32; ++i) std::memcpy(wp.out[i], &gen, sizeof gen);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Hooks (runtime_internal.h).

namespace detail {

void sm90_block_begin(Worker& w) {
  w.sm90 = false;
  w.window_array = nullptr;
}

void sm90_block_end(Worker& w) {
  if (!w.tma_inflight.empty()) {
    fail("the block exited with %zu TMA loads in flight (their mbarrier was never waited for)",
         w.tma_inflight.size());
  }
  for (const NamedBarrier& b : w.nbars) g_named_leftovers += b.arrived > 0;
}

bool sm90_progress(Worker& w) {
  if (w.tma_inflight.empty()) return false;
  tma_land_one(w);
  return true;
}

void sm90_schedule_point(Worker& w) {
  if (options().copies == CopyPolicy::kRandom && !w.tma_inflight.empty() && uniform(w) < 0.05) {
    tma_land_one(w);
  }
}

std::string sm90_describe(Worker& w) {
  std::string s;
  char buf[512];
  for (size_t i = 0; i < w.mbars.size(); ++i) {
    const Mbarrier& m = w.mbars[i];
    if (m.waiters.empty()) continue;
    std::string who;
    for (size_t k = 0; k < m.waiters.size() && k < 8; ++k) who += (k ? "," : "") + std::to_string(m.waiters[k]);
    if (m.waiters.size() > 8) who += ",...";
    std::snprintf(buf, sizeof buf,
                  "; %zu threads (%s) wait on mbarrier #%zu (smem offset %ld) for a phase that has "
                  "not completed: current phase %u (parity %u), %u of %u arrivals pending, tx-count "
                  "%" PRId64, m.waiters.size(), who.c_str(), i, m.off, m.phase, m.phase & 1, m.pending,
                  m.expected, m.tx);
    s += buf;
  }
  for (int id = 0; id < kNamedBarriers; ++id) {
    const NamedBarrier& b = w.nbars[id];
    if (b.arrived == 0 && b.waiters.empty()) continue;
    std::snprintf(buf, sizeof buf, "; named barrier %d: %d of %d threads arrived (warp mask 0x%" PRIx64
                  "), %zu threads waiting in bar.sync", id, b.arrived, b.expected, b.warps, b.waiters.size());
    s += buf;
  }
  for (size_t g = 0; g < w.wgs.size() && 128 * g < static_cast<size_t>(w.nthreads); ++g) {
    const Warpgroup& wg = w.wgs[g];
    if (wg.arrived == 0) continue;
    std::snprintf(buf, sizeof buf, "; warpgroup %zu: %d of %d live threads in %s%s", g, wg.arrived,
                  wg.live, wg_name(wg.kind), wg.pending_inc ? " (setmaxnreg.inc waiting for registers)" : "");
    s += buf;
    if (wg.pending_inc) {
      std::snprintf(buf, sizeof buf, " (needs %d more per thread x %d threads, the CTA's pool has %" PRId64 ")",
                    wg.pending_inc - wg.regs, wg.lanes, w.reg_pool);
      s += buf;
    }
  }
  return s;
}

void sm90_thread_exit(Worker& w, int fiber) {
  Fiber& f = w.fibers[fiber];
  if (!f.wg_inflight.empty()) {
    fail("a thread exited with %zu wgmma.mma_async in flight (no wgmma.wait_group retired them)",
         f.wg_inflight.size());
  }
  Warpgroup& wg = w.wgs[fiber / 128];
  --wg.live;
  if (wg.arrived > 0) {
    fail("a thread of warpgroup %d exited while %d of its threads wait in %s (.aligned: every "
         "thread of the warpgroup must execute it)", fiber / 128, wg.arrived, wg_name(wg.kind));
  }
}

void sm90_landed(Worker& w, const Copy& c) {
  const long off = smem_offset(w, c.dst, c.bytes);
  for (long i = off / 4; i < (off + c.bytes) / 4; ++i) {
    w.unfenced_writer[i] = static_cast<int16_t>(c.fiber + 1);
    w.pub_thread[i] = 0;
    w.tma_tag[i] = 0;
  }
  w.fibers[c.fiber].unfenced.emplace_back(off, c.bytes);
}

void sm90_merge_knowledge(Worker& w, const int* fibers, int n) {
  if (n <= 0) return;
  std::vector<uint32_t> acc(kClock0 + w.nthreads, 0u);
  for (int i = 0; i < n; ++i) merge_into(acc, w.fibers[fibers[i]].know);
  for (int i = 0; i < n; ++i) {
    w.fibers[fibers[i]].know = acc;
    tick(w, fibers[i]);
  }
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// The device-side API (runtime.h).

uint32_t smem_window_address(const void* p) {
  Worker& w = worker_in_kernel("smem_address");
  const unsigned char* a = static_cast<const unsigned char*>(p);
  for (unsigned char* base : w.smem_bases) {
    if (a >= base && a <= base + w.smem_bytes) {
      if (w.window_array != nullptr && w.window_array != base) {
        fail("smem_address of two different extern __shared__ arrays in one block");
      }
      w.window_array = base;
      return w.window_base + static_cast<uint32_t>(a - base);
    }
  }
  fail("smem_address(%p): not a pointer into the block's dynamic shared memory", p);
}

void mbar_init(uint32_t bar, uint32_t count) {
  Worker& w = worker_in_kernel("mbarrier.init");
  const long off = window_offset(w, bar, 8, 8, "mbarrier.init");
  if (count < 1 || count > (1u << 20) - 1) fail("mbarrier.init with count %u (valid: 1 .. 2^20 - 1)", count);
  for (const Mbarrier& m : w.mbars) {
    if (m.off == off) {
      fail("mbarrier.init on shared offset %ld, which holds a valid mbarrier (undefined; "
           "mbarrier.inval first)", off);
    }
  }
  for (long i = off / 4; i < off / 4 + 2; ++i) {
    if (w.mbar_word[i]) fail("mbarrier.init at shared offset %ld overlaps another mbarrier", off);
    if (w.pending[i] || w.wg_reading[i]) {
      fail("mbarrier.init at shared offset %ld: an asynchronous copy or wgmma still accesses it", off);
    }
    w.mbar_word[i] = 1;
  }
  if (w.mbars.size() >= static_cast<size_t>(kMaxMbarriers)) fail("more than %d mbarriers in a block", kMaxMbarriers);
  Mbarrier m;
  m.off = off;
  m.expected = count;
  m.pending = count;
  m.init_thread = w.current;
  m.release_acc.assign(kClock0 + w.nthreads, 0u);
  m.release_done.assign(kClock0 + w.nthreads, 0u);
  w.mbars.push_back(std::move(m));
  maybe_yield();
}

void fence_mbarrier_init() {
  Worker& w = worker_in_kernel("fence.mbarrier_init");
  for (Mbarrier& m : w.mbars) {
    if (m.init_thread == w.current) m.init_fenced = true;
  }
  maybe_yield();
}

void mbar_arrive(uint32_t bar, bool expect_tx, uint32_t tx_bytes) {
  Worker& w = worker_in_kernel("mbarrier.arrive");
  const int idx = mbar_index(w, bar, "mbarrier.arrive");
  Mbarrier& m = w.mbars[idx];
  if (expect_tx) {
    m.tx += tx_bytes;
    if (m.tx > (int64_t{1} << 20) - 1) {
      fail("mbarrier #%d: tx-count %" PRId64 " above 2^20 - 1 after expect_tx(%u)", idx, m.tx, tx_bytes);
    }
  }
  if (m.pending == 0) {
    fail("mbarrier #%d (smem offset %ld): an arrival in phase %u after all %u expected arrivals "
         "(tx-count %" PRId64 " still pending): more arrivals than the init count", idx, m.off, m.phase,
         m.expected, m.tx);
  }
  --m.pending;
  merge_into(m.release_acc, me(w).know);  // release
  tick(w, w.current);
  if (m.pending == 0 && m.tx == 0) complete_phase(w, m);
  if (w.prefer >= 0) {
    yield_now(w);  // let the woken waiter run now
  } else {
    maybe_yield();
  }
}

bool mbar_try_wait_parity(uint32_t bar, uint32_t parity) {
  Worker& w = worker_in_kernel("mbarrier.try_wait.parity");
  if (parity > 1) fail("mbarrier.try_wait.parity with parity %u (valid: 0, 1)", parity);
  const int idx = mbar_index(w, bar, "mbarrier.try_wait.parity");
  for (;;) {
    Mbarrier& m = w.mbars[idx];
    if ((m.phase & 1u) != parity) {
      // the phase of this parity is the one before the current one: complete. The waiter
      // acquires what the arrivals released and knows every phase < m.phase completed.
      Fiber& f = me(w);
      f.know[idx] = std::max(f.know[idx], m.phase);
      merge_into(f.know, m.release_done);  // acquire
      return true;
    }
    if (uniform(w) < options().yield_prob) {  // the try_wait's time limit expired
      yield_now(w);
      return false;
    }
    Fiber& f = me(w);
    f.state = kAtMbarrier;
    runq_remove(w, w.current);
    m.waiters.push_back(w.current);
    suspend(w);
  }
}

void prefetch_tensormap(const void* map) {
  worker_in_kernel("prefetch.tensormap");
  read_map(map, "prefetch.tensormap");
  maybe_yield();
}

void tma_load(uint32_t dst, const void* map, uint32_t bar, const int32_t* coords, int rank) {
  Worker& w = worker_in_kernel("cp.async.bulk.tensor");
  const EmuTensorMap m = read_map(map, "cp.async.bulk.tensor");
  if (m.rank != rank) fail("cp.async.bulk.tensor.%dd with a tensor map of rank %d", rank, m.rank);
  const int span = swizzle_span(m.swizzle);
  uint32_t bytes = m.elem_bytes;
  for (int i = 0; i < rank; ++i) {
    if (m.estride[i] != 1) fail("cp.async.bulk.tensor: element strides other than 1 are not emulated");
    bytes *= m.box[i];
  }
  if (m.oob != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) fail("cp.async.bulk.tensor: NaN out-of-bounds fill is not emulated");
  if (span > 0 && static_cast<int>(m.box[0]) * m.elem_bytes != span) {
    fail("cp.async.bulk.tensor: a swizzled box whose inner dimension (%d bytes) is narrower than "
         "the swizzle span (%d) is not emulated", m.box[0] * m.elem_bytes, span);
  }
  // 128-byte aligned destination [PTX-tensor]; with a swizzle, the emulator also wants the
  // pattern's repeat boundary (8 lines of `span` bytes): where an unaligned destination's
  // pattern starts is not pinned down by the documentation it follows.
  const size_t align = span > 0 ? static_cast<size_t>(8 * span) : 128;
  const long off = window_offset(w, dst, bytes, 128, "cp.async.bulk.tensor destination");
  if (dst % align != 0) {
    fail("cp.async.bulk.tensor: destination 0x%x is not aligned to the %d-byte swizzle's pattern "
         "repeat (%zu bytes); not emulated", dst, span, align);
  }
  const int idx = mbar_index(w, bar, "cp.async.bulk.tensor (mbarrier)");
  if (!w.mbars[idx].init_fenced) {
    fail("cp.async.bulk.tensor completes on mbarrier #%d whose mbarrier.init (a generic-proxy "
         "write) was not followed by fence.mbarrier_init or fence.proxy.async by the initialising "
         "thread: the TMA (async proxy) may not see the initialisation", idx);
  }
  for (long i = off / 4; i < (off + static_cast<long>(bytes)) / 4; ++i) {
    if (w.mbar_word[i]) fail("cp.async.bulk.tensor overwrites the mbarrier at shared offset %ld", i * 4);
    if (w.wg_reading[i]) {
      fail("cp.async.bulk.tensor writes shared memory (offset %ld) that an in-flight wgmma still "
           "reads: the stage was released / refilled before wgmma.wait_group retired the wgmma", i * 4);
    }
    if (w.pending[i]) {
      fail("cp.async.bulk.tensor writes shared memory (offset %ld) that another TMA / cp.async "
           "still in flight writes", i * 4);
    }
    ++w.pending[i];
  }
  TmaCopy c;
  c.off = off;
  c.bytes = bytes;
  c.mbar = idx;
  c.issuer = w.current;
  std::memcpy(c.map, map, sizeof c.map);
  c.rank = rank;
  for (int i = 0; i < 5; ++i) c.coords[i] = i < rank ? coords[i] : 0;
  if (options().copies == CopyPolicy::kEarly) {
    tma_land(w, c);
  } else {
    w.tma_inflight.push_back(c);
  }
  maybe_yield();
}

void cp_async_shared(uint32_t dst, const void* src, int bytes, bool valid) {
  Worker& w = worker_in_kernel("cp.async");
  const long off = window_offset(w, dst, bytes, bytes, "cp.async destination");
  for (long i = off / 4; i < (off + bytes) / 4; ++i) {
    if (w.mbar_word[i]) fail("cp.async overwrites the mbarrier at shared offset %ld", i * 4);
    if (w.wg_reading[i]) {
      fail("cp.async writes shared memory (offset %ld) that an in-flight wgmma still reads", i * 4);
    }
    if (w.pending[i]) fail("cp.async writes shared memory (offset %ld) that another copy in flight writes", i * 4);
  }
  cp_async(smem_at(w, off), src, bytes, valid);
}

void cp_async_wait_all() {
  // PTX: cp.async.wait_all is cp.async.commit_group followed by cp.async.wait_group 0
  cp_async_commit();
  cp_async_wait(0);
}

void fence_proxy_async() {
  Worker& w = worker_in_kernel("fence.proxy.async");
  Fiber& f = me(w);
  const uint32_t now = f.know[kClock0 + w.current];
  for (const auto& [off, bytes] : f.unfenced) {
    for (long i = off / 4; i < (off + bytes) / 4; ++i) {
      if (w.unfenced_writer[i] == w.current + 1) {
        w.unfenced_writer[i] = 0;
        w.pub_thread[i] = static_cast<int16_t>(w.current + 1);  // visible to whoever syncs with
        w.pub_clock[i] = now;                                   // this thread after this point
      }
    }
  }
  f.unfenced.clear();
  for (Mbarrier& m : w.mbars) {  // also orders this thread's mbarrier.init before async-proxy use
    if (m.init_thread == w.current) m.init_fenced = true;
  }
  maybe_yield();
}

void setmaxnreg(int regs, bool inc) {
  Worker& w = worker_in_kernel("setmaxnreg");
  if (regs < 24 || regs > 256 || regs % 8 != 0) {
    fail("setmaxnreg.%s %d: the count must be in [24, 256] and a multiple of 8", inc ? "inc" : "dec", regs);
  }
  const int64_t common[6] = {regs, inc ? 1 : 0, 0, 0, 0, 0};
  wg_arrive(w, kWgSetmaxnreg, common, compute_setmaxnreg);
}

void named_barrier(int id, int threads, bool sync) {
  Worker& w = worker_in_kernel("bar.sync / bar.arrive");
  if (id < 1 || id >= kNamedBarriers) {
    fail("named barrier id %d: 1 .. 15 are emulated (0 is __syncthreads's)", id);
  }
  if (threads <= 0 || threads % 32 != 0) {
    fail("bar.%s %d, %d: the thread count must be a positive multiple of the warp size",
         sync ? "sync" : "arrive", id, threads);
  }
  if (threads > w.nthreads) {
    fail("bar.%s %d, %d: more threads than the block's %d", sync ? "sync" : "arrive", id, threads, w.nthreads);
  }
  const int common[3] = {id, threads, sync ? 1 : 0};
  char dummy = 0;
  uint64_t gen = 0;
  warp_op(kOpNamedBarrier, common, &dummy, 1, 0, &gen, sizeof gen, named_barrier_compute, true);
  if (!sync) return;
  NamedBarrier& b = w.nbars[id];
  while (b.generation == gen) {
    Fiber& f = me(w);
    f.state = kAtNamedBarrier;
    runq_remove(w, w.current);
    b.waiters.push_back(w.current);
    suspend(w);
  }
  merge_into(me(w).know, b.last_acc);  // acquire
}

void wgmma_fence() {
  Worker& w = worker_in_kernel("wgmma.fence");
  const int64_t common[6] = {};
  wg_arrive(w, kWgFence, common, compute_nothing);
  me(w).wg_fenced = true;
}

void wgmma_commit() {
  Worker& w = worker_in_kernel("wgmma.commit_group");
  const int64_t common[6] = {};
  wg_arrive(w, kWgCommit, common, compute_nothing);
  ++me(w).wg_commits;
}

void wgmma_wait(int pending) {
  Worker& w = worker_in_kernel("wgmma.wait_group");
  if (pending < 0) fail("wgmma.wait_group %d", pending);
  const int64_t common[6] = {pending, 0, 0, 0, 0, 0};
  wg_arrive(w, kWgWait, common, compute_nothing);
  Fiber& f = me(w);
  // groups [0, commits - pending) complete; wgmma not yet committed are in no group
  const int upto = f.wg_commits - pending;
  if (upto > 0) retire(w, f, static_cast<size_t>(upto));
  f.wg_fenced = false;  // the thread may now access the retired registers: a fence is needed again
}

void wgmma_mma_async(float* d, int n, const uint32_t* const* a_regs, uint64_t desc_a,
                     uint64_t desc_b, bool scale_d, int scale_a, int scale_b, int trans_a,
                     int trans_b, bool bf16) {
  Worker& w = worker_in_kernel("wgmma.mma_async");
  if (n < 8 || n > 256 || n % 8 != 0) fail("wgmma.mma_async m64n%dk16: N must be a multiple of 8 in [8, 256]", n);
  if ((scale_a != 1 && scale_a != -1) || (scale_b != 1 && scale_b != -1)) fail("wgmma: imm-scale must be 1 or -1");
  if (trans_a < 0 || trans_a > 1 || trans_b < 0 || trans_b > 1) fail("wgmma: imm-trans must be 0 or 1");
  if (a_regs != nullptr && trans_a != 0) fail("wgmma: imm-trans-a with a register A operand");
  Fiber& f = me(w);
  if (!f.wg_fenced) {
    fail("wgmma.mma_async without a wgmma.fence since the thread's last wgmma.wait_group (or "
         "since the start): wgmma.fence must order the thread's register accesses before the "
         "wgmma that uses those registers");
  }
  const int nacc = n / 2;
  Warpgroup& wg = my_warpgroup(w, "wgmma.mma_async");
  WgSlot& s = wg.slots[w.current % 128];
  s.desc_a = a_regs != nullptr ? 0 : desc_a;
  s.desc_b = desc_b;
  s.scale_d = scale_d ? 1 : 0;
  s.acc = d;
  // C: the latest in-flight wgmma of this thread on the same registers (chained accumulation,
  // same shape), else the registers themselves
  const WgInflight* prev = nullptr;
  for (const WgInflight& op : f.wg_inflight) {
    if (op.acc == d) {
      if (op.n != nacc) fail("wgmma chained on the same accumulators with a different shape");
      prev = &op;
    } else if (overlaps(op.acc, sizeof(float) * op.n, d, sizeof(float) * nacc)) {
      fail("wgmma accumulators overlap those of an in-flight wgmma without being the same registers");
    }
    if (op.rs) {
      for (int j = 0; j < 4; ++j) {
        if (overlaps(op.a_ptr[j], 4, d, sizeof(float) * nacc)) {
          fail("wgmma accumulates into the A-fragment registers of an in-flight wgmma");
        }
      }
    }
  }
  for (int i = 0; i < nacc; ++i) s.c[i] = prev != nullptr ? prev->result[i] : d[i];
  if (a_regs != nullptr) {
    for (int j = 0; j < 4; ++j) {
      s.a[j] = *a_regs[j];
      s.a_ptr[j] = a_regs[j];
    }
  }
  const int64_t common[6] = {n | (bf16 ? 1 << 16 : 0) | (a_regs ? 1 << 17 : 0) | (trans_a << 18) | (trans_b << 19),
                             scale_a, scale_b, 0, 0, 0};
  wg_arrive(w, kWgMma, common, compute_mma);
  WgInflight op;
  op.group = f.wg_commits;
  op.acc = d;
  op.n = nacc;
  op.record = s.record;
  op.rs = a_regs != nullptr;
  for (int j = 0; j < 4; ++j) {
    op.a_ptr[j] = op.rs ? s.a_ptr[j] : nullptr;
    op.a_val[j] = op.rs ? s.a[j] : 0;
  }
  std::memcpy(op.result, s.d, sizeof(float) * nacc);
  f.wg_inflight.push_back(op);
  // the registers are the wgmma's until the wait_group that retires it
  for (int i = 0; i < nacc; ++i) std::memcpy(&d[i], &kAccPoison, 4);
}

void wgmma_fence_operands(const void* regs, size_t bytes) {
  Worker& w = worker_in_kernel("fence_operands");
  for (const WgInflight& op : me(w).wg_inflight) {
    bool hit = overlaps(op.acc, sizeof(float) * op.n, regs, bytes);
    for (int j = 0; op.rs && j < 4; ++j) hit |= overlaps(op.a_ptr[j], 4, regs, bytes);
    if (hit) {
      fail("fence_operands on registers of a wgmma still in flight: the kernel touches them before "
           "the wgmma.wait_group that retires the wgmma (on the GPU ptxas would have to wait for "
           "the wgmma there)");
    }
  }
}

long named_barrier_leftovers() { return g_named_leftovers.load(); }

}  // namespace emu

// ---------------------------------------------------------------------------------------------
// Runtime / driver API stand-ins for the sm90 launcher.

extern "C" {

cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** funcPtr, unsigned int cudaVersion,
                                             unsigned long long, cudaDriverEntryPointQueryResult* driverStatus) {
  *funcPtr = nullptr;
  if (std::strcmp(symbol, "cuTensorMapEncodeTiled") == 0 && cudaVersion >= 12000) {
    *funcPtr = reinterpret_cast<void*>(&emu::emu_cuTensorMapEncodeTiled);
    if (driverStatus) *driverStatus = cudaDriverEntryPointSuccess;
    return cudaSuccess;
  }
  if (driverStatus) *driverStatus = cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}

}  // extern "C"
