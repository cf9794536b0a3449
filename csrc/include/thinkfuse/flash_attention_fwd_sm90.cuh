// Flash attention forward for Hopper (sm_90a only): wgmma (warpgroup MMA), TMA tile loads
// completing on mbarriers, and warp specialisation (FlashAttention-3 structure). Same problem,
// outputs and semantics as the FA2-style kernel of flash_attention_fwd.cuh (whose helpers it
// reuses: sequence_bounds, key_blocks): GQA, bottom-right aligned causal mask, sliding window,
// packed sequences, rows without keys -> out 0 and lse -inf. float16 / bfloat16, head_dim 64 and
// 128. The host side (tensor maps, launch) is in csrc/ops/flash_attention_fwd_sm90.cu.
//
// Work decomposition
//   One CTA per (query tile of kBlockM = 128 rows, query head, sequence), the longest causal
//   tiles of all heads and sequences first (tile_order), 3 warpgroups (384 threads):
//     warpgroup 0, the producer: its warp 0 issues every load (TMA, one elected lane); the other
//       three warps exit at once. setmaxnreg gives its registers away (kProducerRegs).
//     warpgroups 1 and 2, the consumers: consumer c owns the 64 query rows
//       [64 c, 64 c + 64) of the tile (one wgmma M = 64) and raises its register budget to
//       kConsumerRegs.
//   The consumers walk the tile's key blocks of kBlockN = 128 keys (key_blocks: causal / window
//   skipping as the sm80 kernel), each: S = Q K^T (wgmma, both operands from shared memory),
//   mask (diagonal / window edge / k_len tail blocks only), online softmax in the exp2 domain on
//   the float accumulators, P rounded to T in registers, O += P V (wgmma, P as the register A
//   operand, V from shared memory, transposed descriptor).
//
// Shared memory (dynamic, base rounded up to 1024 bytes: the 128-byte swizzle repeats every
// 1024 bytes and TMA / wgmma assume pattern-aligned tiles):
//   Q [kBlockM][D] once, K and V [kBlockN][D] kStages = 2 times each, then the mbarriers.
//   A [rows][D] tile is D / 64 column panels of [rows][64 elements] (rows of 128 bytes), panel p
//   at p * rows * 128 bytes; inside a panel, 16-byte chunk c (elements 8c .. 8c + 7) of row r
//   sits at r * 128 + ((c ^ (r % 8)) * 16): the CU_TENSOR_MAP_SWIZZLE_128B pattern (16-byte
//   chunk index, address bits 4-6, XORed with the 128-byte row index mod 8, bits 7-9), which is
//   also wgmma's 128-byte swizzle mode. D = 128, bf16: 32 KiB (Q) + 128 KiB (K, V) = 160 KiB ->
//   one CTA per SM.
//
// Loads (producer warp 0; the tensor maps are built on the host, 4-D (d, head, token, batch),
//   box (64, 1, rows, 1), 128-byte swizzle, out-of-bounds elements zero-filled):
//   Q once onto q_full; then for key block it, stage s = it % kStages: wait empty_k[s], arm
//   full_k[s] with the tile's bytes (expect_tx) and issue the D / 64 panel loads of K; the same
//   for V on empty_v[s] / full_v[s]. Out-of-range rows: in the padded layout the token dim is
//   the sequence (max_seqlen), so TMA zero-fills rows past it. In the packed layout the token
//   dim is the whole packed tensor, so a tile running past its sequence reads the next
//   sequence's tokens (or zeros past total): harmless for Q (those rows are never stored) and K
//   (those keys are masked to -inf, replacing whatever was read), but not for V, where
//   0 * (non-finite junk) = NaN; so in the packed layout the V block that crosses k_len is
//   loaded by the producer warp with cp.async instead (zero-filling the rows past k_len, same
//   swizzled layout), then cp.async.wait_all + fence.proxy.async (generic-proxy writes read
//   next by wgmma) + a plain arrive on full_v[s].
//
// Barriers (mbarriers in shared memory): q_full (1 arrival + Q bytes), full_k/v[s] (1 arrival:
//   the producer's arrive.expect_tx, + the TMA bytes; or the tail path's plain arrive),
//   empty_k/v[s] (kConsumerWarps arrivals: lane 0 of every consumer warp once its wgmmas reading
//   the stage have completed). Phase parity of use it of stage s: (it / kStages) & 1; the
//   producer waits on the empty barriers with the opposite parity (a fresh barrier counts its
//   preceding phase as complete, so the first kStages waits pass at once).
//
// Consumer pipeline (intra-warpgroup overlap, FA3 section 3.2): P of block it - 1 is multiplied
//   by V while S of block it is computed and then softmaxed:
//     S_0 = Q K_0^T; wait; release K_0; softmax(S_0) -> P_0
//     for it = 1 ..: issue S_it = Q K_it^T; commit; issue O += P_{it-1} V_{it-1}; commit;
//                    wait_group 1 (S_it done); release K_it; softmax(S_it) -> new max, alpha;
//                    wait_group 0 (PV done); release V_{it-1}; O *= alpha; P_it = S_it
//     O += P_last V_last; wait; release.
//   The rescale of O by alpha = exp2((m_old - m_new) * scale_log2) is deferred until the PV that
//   used the old max has completed: O (relative to m_old) * alpha is O relative to m_new, as
//   P_it is. Registers per consumer thread: S 64 + O D/2 + P 32 floats / words.
//   Ping-pong between the two consumers (FA3 section 3.1, Config::kPingPong): each issues its
//   GEMMs of a block only in its turn (named barrier kSchedBarrier + cw, 256 threads: its own
//   128 syncing + the other's 128 arriving) and hands the turn over right after issuing, so the
//   turns alternate c0, c1, c0, ... and one consumer's softmax runs while the other's GEMMs
//   occupy the tensor cores. Arrivals and syncs balance exactly (see turn_begin / turn_end).
//
// wgmma layouts (PTX ISA "Register Fragments and Shared Memory Matrix Layouts"; checked by the
// lane-level emulator, see the report):
//   Accumulator of m64nNk16 (float, N/2 per thread), warp w of the warpgroup, lane l = 4 g + t:
//     d[i] = (row 16 w + g + 8 ((i / 2) % 2), col 8 (i / 4) + 2 t + i % 2)
//     i.e. per 8-column chunk j = i / 4: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
//   A from registers (m64k16, 4 x 32-bit, two 16-bit elements each, low half first):
//     a[0] = (row 16 w + g, k 2t..2t+1), a[1] = (row + 8, k 2t..), a[2] = (row, k 8+2t..),
//     a[3] = (row + 8, k 8+2t..)
//   so the A fragment of keys [16 kk, 16 kk + 16) of P is exactly the accumulator pairs
//   (d[8kk], d[8kk+1]), (d[8kk+2], d[8kk+3]), (d[8kk+4], d[8kk+5]), (d[8kk+6], d[8kk+7]):
//   P word j = pack(s[2j], s[2j+1]), no shuffles.
//   Shared-memory descriptor (64 bits): start address >> 4 (bits 0-13), leading byte offset >> 4
//     (16-29), stride byte offset >> 4 (32-45), base offset 0 (49-51: our tiles start on
//     1024-byte boundaries), swizzle mode 1 = 128 B (62-63).
//   K-major operand, 128-byte swizzle (Q as A, K as B of S = Q K^T): canonical layout
//     ((8, m), (T, 2k)) : ((8T, SBO), (1, T)) elements, T = 8 (16-bit): 8 rows of 128 bytes per
//     swizzle atom, SBO = 1024 bytes to the next 8 rows, LBO unused (encoded 1). The 16 K
//     elements of one wgmma are 32 bytes of a row: k-step kk of a 64-element panel starts
//     kk * 32 bytes into it (the swizzle is a function of the address bits, so the XOR pattern
//     of the atom still applies), panel kk / 4 at kk / 4 * rows * 128 bytes.
//   MN-major operand, 128-byte swizzle (V as B of O += P V, trans-b = 1; V is stored [key][d]
//     with d contiguous, so N = d is the contiguous dim): canonical layout
//     ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO)) elements: 64 contiguous N elements (one
//     128-byte row = one key), the next 64 N (the next column panel) LBO = kBlockN * 128 bytes
//     further, K (keys) rows 128 bytes apart, the next 8 keys SBO = 1024 bytes further. k-step kk
//     (keys 16 kk .. 16 kk + 15) starts 16 kk * 128 bytes in (a multiple of 1024).
//
// Online softmax, masks, epilogue: as flash_attention_fwd.cuh (running max m of raw scores,
//   quad-uniform; p = exp2(s * scale_log2 - m * scale_log2); m = -inf uses 0 as the shift; l
//   summed per thread and over the quad at the end; lse = (m scale_log2 + log2 l) ln 2; l == 0
//   -> out 0, lse -inf). O / l is staged through the consumer's own 64 rows of the Q tile (same
//   swizzled layout; conflict-free) and written with 16-byte stores, rows < q_len only.
#pragma once

#include <cstdint>
#include <type_traits>

#include "thinkfuse/common.cuh"
#include "thinkfuse/flash_attention_fwd.cuh"
#include "thinkfuse/flash_attention_params.cuh"
#include "thinkfuse/mma_sm80.cuh"
#include "thinkfuse/sm90.cuh"

// Device code needs sm_90a (wgmma, setmaxnreg); every other target compiles an empty kernel
// that traps (the launcher never starts it elsewhere). The host emulation (tests/cuda_emulation)
// compiles the sm_90a body against its emulated primitives.
#if defined(THINKFUSE_HOST_EMULATION) || \
    (defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define TF_SM90A_DEVICE 1
#else
#define TF_SM90A_DEVICE 0
#endif

// Config::kPingPong. Overridable at build time only so that the host emulation
// (tests/cuda_emulation) also runs the kernel without the ping-pong; the GPU build keeps 1.
#if !defined(THINKFUSE_SM90_PINGPONG)
#define THINKFUSE_SM90_PINGPONG 1
#endif

namespace thinkfuse {

namespace flash_fwd_sm90 {

// Bit-compatible with the driver's CUtensorMap (an opaque, 128-byte aligned 128-byte object; the
// driver needs 64-byte alignment): this header stays free of <cuda.h>, the .cu memcpys the
// encoded map into it.
struct alignas(128) TmaDescriptor {
  uint64_t opaque[16];
};

template <int D>
struct Config {
  static_assert(D == 64 || D == 128, "head dim 64 or 128");
  static constexpr int kHeadDim = D;
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kConsumerWarps = 4 * kConsumerWarpgroups;
  static constexpr int kThreads = 128 * (1 + kConsumerWarpgroups);
  static constexpr int kBlockM = 64 * kConsumerWarpgroups;  // query rows per CTA
  static constexpr int kBlockN = 128;                       // keys per block (wgmma N of S)
  static constexpr int kStages = 2;
  // Inter-warpgroup ping-pong (FA3 section 3.1): the consumers take turns issuing their GEMMs
  // (named barriers kSchedBarrier + cw), so one's softmax overlaps the other's tensor-core work.
  static constexpr bool kPingPong = THINKFUSE_SM90_PINGPONG != 0;
  static constexpr int kPanels = D / 64;  // 64-element (128-byte) column panels per row
  static constexpr int kQPanelBytes = kBlockM * 128;
  static constexpr int kKVPanelBytes = kBlockN * 128;
  static constexpr int kQBytes = kPanels * kQPanelBytes;
  static constexpr int kKVBytes = kPanels * kKVPanelBytes;
  static constexpr int kQOffset = 0;
  static constexpr int kKOffset = kQBytes;                       // stage s at + s * kKVBytes
  static constexpr int kVOffset = kKOffset + kStages * kKVBytes;  // stage s at + s * kKVBytes
  static constexpr int kBarrierOffset = kVOffset + kStages * kKVBytes;
  static constexpr int kBarriers = 1 + 4 * kStages;  // q_full, full_k, full_v, empty_k, empty_v
  static constexpr int kSmemBytes = kBarrierOffset + 8 * kBarriers + 1024;  // + base alignment
  // setmaxnreg budgets: 128 * 24 + 256 * 240 = 64512 <= 65536 registers per SM (one CTA per SM;
  // the kernel starts at 65536 / 384 -> 168 per thread).
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static constexpr int kSRegs = kBlockN / 2;  // S accumulator floats per thread
  static constexpr int kORegs = D / 2;        // O accumulator floats per thread
  static constexpr int kPRegs = kBlockN / 4;  // P words (two 16-bit values) per thread
  static_assert(kBlockN == 128, "S = Q K^T uses m64n128k16");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block on sm90");
};

// ---------------------------------------------------------------------------------------------
// PTX wrappers (sm_90a): thinkfuse/sm90.cuh. Shared-memory operands are 32-bit shared-window
// addresses.
using sm90::cp_async_16;
using sm90::cp_async_wait_all;
using sm90::fence_barrier_init;
using sm90::fence_operands;
using sm90::fence_proxy_async;
using sm90::mbar_arrive;
using sm90::mbar_arrive_expect_tx;
using sm90::mbar_init;
using sm90::mbar_wait;
using sm90::named_barrier_arrive;
using sm90::named_barrier_sync;
using sm90::prefetch_tensormap;
using sm90::setmaxnreg_dec;
using sm90::setmaxnreg_inc;
using sm90::tma_load_4d;
using sm90::wgmma_commit;
using sm90::wgmma_fence;
using sm90::wgmma_rs;
using sm90::wgmma_ss_m64n128k16;
using sm90::wgmma_wait;

// Hardware named barriers (0 is __syncthreads): the epilogue's per-consumer barriers and the
// ping-pong turn barriers.
constexpr int kEpilogueBarrier = 1;  // + cw, 128 threads
constexpr int kSchedBarrier = 3;     // + cw, 256 threads

// Shared-memory matrix descriptor, 128-byte swizzle, base offset 0 (see the header comment).
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t addr, uint32_t lbo_bytes,
                                                    uint32_t sbo_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) |
         (static_cast<uint64_t>((lbo_bytes & 0x3FFFFu) >> 4) << 16) |
         (static_cast<uint64_t>((sbo_bytes & 0x3FFFFu) >> 4) << 32) | (uint64_t{1} << 62);
}

// ---------------------------------------------------------------------------------------------
// Kernel pieces.

// Shared-window addresses of the CTA's tiles and barriers.
template <typename Cfg>
struct SmemLayout {
  uint32_t base;  // 1024-byte aligned
  __device__ __forceinline__ uint32_t q() const { return base + Cfg::kQOffset; }
  __device__ __forceinline__ uint32_t k(int stage) const {
    return base + Cfg::kKOffset + stage * Cfg::kKVBytes;
  }
  __device__ __forceinline__ uint32_t v(int stage) const {
    return base + Cfg::kVOffset + stage * Cfg::kKVBytes;
  }
  __device__ __forceinline__ uint32_t q_full() const { return base + Cfg::kBarrierOffset; }
  __device__ __forceinline__ uint32_t full_k(int stage) const {
    return base + Cfg::kBarrierOffset + 8 * (1 + stage);
  }
  __device__ __forceinline__ uint32_t full_v(int stage) const {
    return base + Cfg::kBarrierOffset + 8 * (1 + Cfg::kStages + stage);
  }
  __device__ __forceinline__ uint32_t empty_k(int stage) const {
    return base + Cfg::kBarrierOffset + 8 * (1 + 2 * Cfg::kStages + stage);
  }
  __device__ __forceinline__ uint32_t empty_v(int stage) const {
    return base + Cfg::kBarrierOffset + 8 * (1 + 3 * Cfg::kStages + stage);
  }
};

// Byte offset of (row r, 16-byte chunk ch of the row) in a swizzled [rows][D] tile of
// `panel_bytes`-byte column panels (the TMA / wgmma layout above).
__device__ __forceinline__ uint32_t tile_offset(int r, int ch, int panel_bytes) {
  return static_cast<uint32_t>((ch >> 3) * panel_bytes + r * 128 + (((ch & 7) ^ (r & 7)) << 4));
}

// cp.async of rows [0, kRows) of a [kRows][D] tile in the swizzled layout (panels of
// `panel_bytes`), rows >= valid_rows zero-filled; src is row 0, row stride in elements. One warp
// calls it (the producer's tail copies: rows past a packed sequence would be another one's).
template <int kRows, int D, typename T>
__device__ __forceinline__ void copy_rows_zero_fill(uint32_t dst, int panel_bytes, const T* src,
                                                    int64_t row_stride, int valid_rows, int lane) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
#pragma unroll 1
  for (int idx = lane; idx < kRows * kChunks; idx += kWarpSize) {
    const int r = idx / kChunks;
    const int ch = idx % kChunks;
    const bool valid = r < valid_rows;
    cp_async_16(dst + tile_offset(r, ch, panel_bytes), valid ? src + r * row_stride + ch * 8 : src,
                valid);
  }
}

// A consumer warp hands a stage back: lane 0 arrives on its empty barrier once the whole warp is
// done with it.
__device__ __forceinline__ void release(uint32_t bar, int lane) {
  __syncwarp();
  if (lane == 0) mbar_arrive(bar);
}

// The 1024-byte aligned start of a kernel's dynamic shared memory (the 128-byte swizzle repeats
// every 1024 bytes, and TMA / wgmma assume pattern-aligned tiles): its shared-window address and
// its generic pointer. The kernels reserve the 1024 bytes of slack in their kSmemBytes.
struct AlignedSmem {
  uint32_t base;
  unsigned char* ptr;
};

__device__ __forceinline__ AlignedSmem align_smem_1024(unsigned char* smem_raw) {
  const uint32_t raw = mma::smem_address(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  return {base, smem_raw + (base - raw)};
}

// Launch order of the CTAs: one per (query tile, query head, sequence), flattened into a 1-D
// grid with the tile slowest and reversed, so that the last tiles of every (sequence, head), the
// longest under a causal mask, run first and the shortest last (longest-processing-time-first:
// the final wave is made of short tiles and the SMs finish together, where a head-by-head order
// leaves some head's longest tile for the last wave; a list-scheduling model of causal 8k,
// 2 x 32 heads on 132 SMs puts that loss near 3%). Heads are fastest within a tile slot:
// consecutive CTAs share their kv head's K / V in L2. The grid has tile_order_ctas(...) CTAs.
struct TileOrder {
  int m_block, h, b;
};

__device__ __forceinline__ TileOrder tile_order(int n_tiles, int heads_q, int batch) {
  // 32-bit: heads_q * batch <= the CTA count <= INT32_MAX (tile_order_ctas)
  const unsigned per_slot = static_cast<unsigned>(heads_q) * static_cast<unsigned>(batch);
  const unsigned slot = blockIdx.x / per_slot;
  const unsigned rest = blockIdx.x - slot * per_slot;
  const unsigned heads = static_cast<unsigned>(heads_q);
  return {n_tiles - 1 - static_cast<int>(slot), static_cast<int>(rest % heads),
          static_cast<int>(rest / heads)};
}

// The forward grid's CTA count, or -1 beyond the 1-D grid limit (2^31 - 1).
inline int64_t tile_order_ctas(int n_tiles, int heads_q, int batch) {
  const int64_t ctas = static_cast<int64_t>(n_tiles) * heads_q * batch;
  return ctas > INT32_MAX ? -1 : ctas;
}

// Per-CTA quantities both roles need.
struct TileInfo {
  int b, h, kvh;
  int64_t q_start, k_start;  // first token of the sequence (packed) or 0 (padded)
  int q_len, k_len;
  int m_start;  // first query row of the tile
  flash_fwd::KeyBlocks blocks;
};

// Producer warp: Q once, then K and V of every key block through the stage ring. Lane 0 issues
// the TMA loads; the whole warp runs the loop (and the packed layout's V tail copy).
template <typename T, int D>
__device__ __forceinline__ void produce(const FlashAttnParams& p, const TmaDescriptor* tma_q,
                                        const TmaDescriptor* tma_k, const TmaDescriptor* tma_v,
                                        const SmemLayout<Config<D>>& sm, const TileInfo& ti) {
  using Cfg = Config<D>;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  const bool packed = p.cu_seqlens_q != nullptr;
  // Tensor-map coordinates: the token dim is the sequence (padded, batch coordinate b) or the
  // whole packed tensor (packed, a single batch entry).
  const int batch_coord = packed ? 0 : ti.b;
  const int q_row0 = static_cast<int>(ti.q_start) + ti.m_start;
  const int k_row0 = static_cast<int>(ti.k_start);
  if (lane == 0) {
    prefetch_tensormap(tma_q);
    prefetch_tensormap(tma_k);
    prefetch_tensormap(tma_v);
    mbar_arrive_expect_tx(sm.q_full(), Cfg::kQBytes);
#pragma unroll
    for (int panel = 0; panel < Cfg::kPanels; ++panel) {
      tma_load_4d(sm.q() + panel * Cfg::kQPanelBytes, tma_q, sm.q_full(), panel * 64, ti.h, q_row0,
                  batch_coord);
    }
  }
#pragma unroll 1
  for (int it = 0; it < ti.blocks.n_blocks; ++it) {
    const int stage = it % Cfg::kStages;
    const uint32_t phase = static_cast<uint32_t>(it / Cfg::kStages) & 1u;
    const int key0 = (ti.blocks.n_first + it) * Cfg::kBlockN;
    mbar_wait(sm.empty_k(stage), phase ^ 1u);
    if (lane == 0) {
      mbar_arrive_expect_tx(sm.full_k(stage), Cfg::kKVBytes);
#pragma unroll
      for (int panel = 0; panel < Cfg::kPanels; ++panel) {
        tma_load_4d(sm.k(stage) + panel * Cfg::kKVPanelBytes, tma_k, sm.full_k(stage), panel * 64,
                    ti.kvh, k_row0 + key0, batch_coord);
      }
    }
    mbar_wait(sm.empty_v(stage), phase ^ 1u);
    if (packed && key0 + Cfg::kBlockN > ti.k_len) {
      // V rows past the sequence would be another sequence's tokens: copy the valid rows
      // (key0 < k_len here: every visited block starts inside the sequence) and zero the rest.
      const int valid_rows = ti.k_len - key0;
      const T* src = static_cast<const T*>(p.v) + ti.kvh * p.v_head_stride +
                     (ti.k_start + key0) * p.v_seq_stride;
      copy_rows_zero_fill<Cfg::kBlockN, D>(sm.v(stage), Cfg::kKVPanelBytes, src, p.v_seq_stride,
                                           valid_rows, lane);
      cp_async_wait_all();
      fence_proxy_async();  // generic-proxy writes, read next by wgmma (async proxy)
      __syncwarp();
      if (lane == 0) mbar_arrive(sm.full_v(stage));
    } else if (lane == 0) {
      mbar_arrive_expect_tx(sm.full_v(stage), Cfg::kKVBytes);
#pragma unroll
      for (int panel = 0; panel < Cfg::kPanels; ++panel) {
        tma_load_4d(sm.v(stage) + panel * Cfg::kKVPanelBytes, tma_v, sm.full_v(stage), panel * 64,
                    ti.kvh, k_row0 + key0, batch_coord);
      }
    }
    __syncwarp();
  }
}

// Row positions of the two accumulator rows this thread holds, for the per-element mask.
struct RowMask {
  int pos[2];  // key position of rows g and g + 8 (query row + k_len - q_len)
  int k_len;
  int window;  // > 0: sliding window
  bool causal;
};

// S = Q K^T of one block: D / 16 k-steps of m64n128k16 (no wait).
template <typename T, int D>
__device__ __forceinline__ void issue_qk(float (&s)[64], uint64_t desc_q, uint64_t desc_k) {
  using Cfg = Config<D>;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    // k-step kk: panel kk / 4, 32 bytes per step inside the panel's 128-byte rows
    const uint32_t q_off = (kk / 4) * Cfg::kQPanelBytes + (kk % 4) * 32;
    const uint32_t k_off = (kk / 4) * Cfg::kKVPanelBytes + (kk % 4) * 32;
    wgmma_ss_m64n128k16<T>(s, desc_q + (q_off >> 4), desc_k + (k_off >> 4), kk > 0 ? 1 : 0);
  }
}

// O += P V of one block: kBlockN / 16 k-steps of m64nDk16, P from registers (no wait).
template <typename T, int D>
__device__ __forceinline__ void issue_pv(float (&o)[D / 2], const uint32_t (&pf)[32],
                                         uint64_t desc_v) {
#pragma unroll
  for (int kk = 0; kk < Config<D>::kBlockN / 16; ++kk) {
    const uint32_t v_off = kk * 16 * 128;  // keys 16 kk .. 16 kk + 15: 16 rows of 128 bytes
    wgmma_rs<T>(o, pf[4 * kk], pf[4 * kk + 1], pf[4 * kk + 2], pf[4 * kk + 3],
                desc_v + (v_off >> 4), 1);
  }
}

// Mask (kMask) and online-softmax update of one block's scores, in place: s becomes
// p = exp2(s * scale_log2 - m_new * scale_log2). alpha = exp2((m_old - m_new) * scale_log2),
// the factor O must be rescaled by (l already is). s[i] is (row half (i / 2) % 2, key
// key0 + 8 (i / 4) + 2 t + i % 2).
template <bool kMask>
__device__ __forceinline__ void softmax_block(float (&s)[64], float (&m_run)[2],
                                              float (&l_run)[2], float (&alpha)[2], int key0,
                                              int t, const RowMask& mask, float scale_log2) {
  if constexpr (kMask) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int pos = mask.pos[hh];
      // visible keys [col_lo, col_hi), relative to this thread's first column key0 + 2t
      const int col_hi = (mask.causal ? min(pos + 1, mask.k_len) : mask.k_len) - key0 - 2 * t;
      const int col_lo = (mask.window > 0 ? pos - mask.window + 1 : 0) - key0 - 2 * t;
#pragma unroll
      for (int i = 0; i < 64; ++i) {
        if (((i >> 1) & 1) != hh) continue;
        const int col = 8 * (i >> 2) + (i & 1);
        if (col < col_lo || col >= col_hi) s[i] = -INFINITY;
      }
    }
  }
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float mx = m_run[hh];
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      if (((i >> 1) & 1) == hh) mx = fmaxf(mx, s[i]);
    }
    // the 4 lanes of a quad (4g .. 4g + 3) hold the row's columns
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float shift = mx == -INFINITY ? 0.0f : mx * scale_log2;
    alpha[hh] = exp2f(m_run[hh] * scale_log2 - shift);  // 0 when m_run = -inf
    m_run[hh] = mx;
    float row_sum = 0.0f;
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      if (((i >> 1) & 1) == hh) {
        s[i] = exp2f(fmaf(s[i], scale_log2, -shift));  // -inf -> 0
        row_sum += s[i];
      }
    }
    l_run[hh] = l_run[hh] * alpha[hh] + row_sum;
  }
}

// P words of the PV A operand: word j = (s[2j], s[2j+1]) rounded to T (see the header).
template <typename T>
__device__ __forceinline__ void convert_p(const float (&s)[64], uint32_t (&pf)[32]) {
#pragma unroll
  for (int j = 0; j < 32; ++j) pf[j] = mma::pack2<T>(s[2 * j], s[2 * j + 1]);
}

// Ping-pong turns. Consumer cw waits for its turn (barrier kSchedBarrier + cw completes when its
// 128 threads sync and the other consumer's 128 arrive), issues its GEMMs, then hands the turn
// over by arriving on the other's barrier. Turns alternate c0, c1, c0, ... (consumer 1 gives
// consumer 0 the first turn up front); both have n_blocks turns. Consumer 1 skips the hand-over
// of its last turn, so that every barrier phase completes (n_blocks arrivals meet n_blocks syncs
// on each barrier) and nothing is left pending at exit.
template <typename Cfg>
__device__ __forceinline__ void turn_begin(int cw) {
  if constexpr (Cfg::kPingPong) named_barrier_sync(kSchedBarrier + cw, 256);
}

template <typename Cfg>
__device__ __forceinline__ void turn_end(int cw, bool last_turn) {
  if constexpr (Cfg::kPingPong) {
    if (cw == 0 || !last_turn) named_barrier_arrive(kSchedBarrier + (1 - cw), 256);
  }
}

// Consumer warpgroup cw (0 or 1): query rows [64 cw, 64 cw + 64) of the tile.
template <typename T, int D>
__device__ __forceinline__ void consume(const FlashAttnParams& p, const SmemLayout<Config<D>>& sm,
                                        unsigned char* smem, const TileInfo& ti) {
  using Cfg = Config<D>;
  constexpr int kSteps = Cfg::kStages;
  const int cw = static_cast<int>(threadIdx.x / 128) - 1;
  const int tid = static_cast<int>(threadIdx.x % 128);
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int row_base = 64 * cw + 16 * warp + g;  // tile row of accumulator row half 0

  float o[Cfg::kORegs];
#pragma unroll
  for (int i = 0; i < Cfg::kORegs; ++i) o[i] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.0f, 0.0f};

  const int n_blocks = ti.blocks.n_blocks;
  if (n_blocks > 0) {
    RowMask mask;
    const int shift = ti.k_len - ti.q_len;
    mask.pos[0] = ti.m_start + row_base + shift;
    mask.pos[1] = mask.pos[0] + 8;
    mask.k_len = ti.k_len;
    mask.window = p.window;
    mask.causal = p.causal;
    const float scale_log2 = p.scale_log2;

    // K-major descriptors (LBO unused: 16 bytes), SBO 1024 bytes; V MN-major: LBO = panel.
    const uint64_t desc_q = smem_descriptor(sm.q() + 64 * cw * 128, 16, 1024);
    float s[Cfg::kSRegs];
    uint32_t pf[Cfg::kPRegs];
    float alpha[2];

    if constexpr (Cfg::kPingPong) {
      if (cw == 1) named_barrier_arrive(kSchedBarrier + 0, 256);  // consumer 0 goes first
    }
    mbar_wait(sm.q_full(), 0);

    // ---- block 0: S_0, softmax -> P_0 -----------------------------------------------------------
    {
      const int key0 = ti.blocks.n_first * Cfg::kBlockN;
      mbar_wait(sm.full_k(0), 0);
      fence_operands(s);
      turn_begin<Cfg>(cw);
      wgmma_fence();
      issue_qk<T, D>(s, desc_q, smem_descriptor(sm.k(0), 16, 1024));
      wgmma_commit();
      turn_end<Cfg>(cw, n_blocks == 1);
      wgmma_wait<0>();
      fence_operands(s);
      release(sm.empty_k(0), lane);
      const bool full = key0 >= ti.blocks.full_lo && key0 + Cfg::kBlockN <= ti.blocks.full_hi;
      if (full) {
        softmax_block<false>(s, m_run, l_run, alpha, key0, t, mask, scale_log2);
      } else {
        softmax_block<true>(s, m_run, l_run, alpha, key0, t, mask, scale_log2);
      }
      convert_p<T>(s, pf);  // O is 0: no rescale
    }

    // ---- steady state: S_it overlaps PV_{it-1} ---------------------------------------------------
#pragma unroll 1
    for (int it = 1; it < n_blocks; ++it) {
      const int stage = it % kSteps;
      const uint32_t phase = static_cast<uint32_t>(it / kSteps) & 1u;
      const int prev = (it - 1) % kSteps;
      const uint32_t prev_phase = static_cast<uint32_t>((it - 1) / kSteps) & 1u;
      const int key0 = (ti.blocks.n_first + it) * Cfg::kBlockN;

      mbar_wait(sm.full_k(stage), phase);
      fence_operands(s);
      fence_operands(o);
      fence_operands(pf);
      turn_begin<Cfg>(cw);
      wgmma_fence();  // s read, pf written, o rescaled since the last wgmmas
      issue_qk<T, D>(s, desc_q, smem_descriptor(sm.k(stage), 16, 1024));
      wgmma_commit();
      mbar_wait(sm.full_v(prev), prev_phase);
      wgmma_fence();  // (ptxas would inject it: the operands are loop-carried)
      issue_pv<T, D>(o, pf, smem_descriptor(sm.v(prev), Cfg::kKVPanelBytes, 1024));
      wgmma_commit();
      turn_end<Cfg>(cw, it + 1 == n_blocks);

      wgmma_wait<1>();  // S_it complete (groups complete in order); PV may still run
      fence_operands(s);
      release(sm.empty_k(stage), lane);
      const bool full = key0 >= ti.blocks.full_lo && key0 + Cfg::kBlockN <= ti.blocks.full_hi;
      if (full) {
        softmax_block<false>(s, m_run, l_run, alpha, key0, t, mask, scale_log2);
      } else {
        softmax_block<true>(s, m_run, l_run, alpha, key0, t, mask, scale_log2);
      }

      wgmma_wait<0>();  // PV_{it-1} complete: O and the old P may be touched again
      fence_operands(o);
      fence_operands(pf);
      release(sm.empty_v(prev), lane);
#pragma unroll
      for (int i = 0; i < Cfg::kORegs; ++i) o[i] *= alpha[(i >> 1) & 1];
      convert_p<T>(s, pf);
    }

    // ---- last PV ------------------------------------------------------------------------------
    {
      const int last = (n_blocks - 1) % kSteps;
      const uint32_t last_phase = static_cast<uint32_t>((n_blocks - 1) / kSteps) & 1u;
      mbar_wait(sm.full_v(last), last_phase);
      fence_operands(o);
      fence_operands(pf);
      wgmma_fence();
      issue_pv<T, D>(o, pf, smem_descriptor(sm.v(last), Cfg::kKVPanelBytes, 1024));
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(o);
      release(sm.empty_v(last), lane);
    }
  }

  // ---- epilogue: O / l through this warpgroup's own rows of the Q tile --------------------------
  // (only this warpgroup's wgmmas read them, and those have completed)
  fence_proxy_async();
  float* lse_base = p.lse + ti.b * p.lse_batch_stride + ti.h * p.lse_head_stride + ti.q_start;
  constexpr float kLn2 = 0.6931471805599453f;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float l = l_run[hh];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.0f ? __frcp_rn(l) : 0.0f;  // l == 0: no visible key -> out 0
    const int r = row_base + 8 * hh;                   // row inside the tile
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      // accumulator (row half hh, cols 8j + 2t, 8j + 2t + 1) = o[4j + 2hh], o[4j + 2hh + 1]:
      // chunk j of the row, bytes 4t .. 4t + 3
      *reinterpret_cast<uint32_t*>(smem + Cfg::kQOffset +
                                   tile_offset(r, j, Cfg::kQPanelBytes) + 4 * t) =
          mma::pack2<T>(o[4 * j + 2 * hh] * inv, o[4 * j + 2 * hh + 1] * inv);
    }
    if (t == 0 && ti.m_start + r < ti.q_len) {
      lse_base[ti.m_start + r] =
          l > 0.0f ? (m_run[hh] * p.scale_log2 + log2f(l)) * kLn2 : -INFINITY;
    }
  }
  named_barrier_sync(kEpilogueBarrier + cw, 128);  // this warpgroup's rows are staged
  T* o_base = static_cast<T*>(p.out) + ti.b * p.o_batch_stride + ti.h * p.o_head_stride +
              ti.q_start * p.o_seq_stride;
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int i = 0; i < 64 * kChunks / 128; ++i) {
    const int idx = tid + 128 * i;
    const int r = 64 * cw + idx / kChunks;
    const int ch = idx % kChunks;
    if (ti.m_start + r < ti.q_len) {
      const uint4 val = *reinterpret_cast<const uint4*>(smem + Cfg::kQOffset +
                                                        tile_offset(r, ch, Cfg::kQPanelBytes));
      __stwb(reinterpret_cast<uint4*>(o_base + static_cast<int64_t>(ti.m_start + r) *
                                                   p.o_seq_stride + ch * 8),
             val);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(Config<D>::kThreads, 1)
    forward_kernel(const FlashAttnParams p, const __grid_constant__ TmaDescriptor tma_q,
                   const __grid_constant__ TmaDescriptor tma_k,
                   const __grid_constant__ TmaDescriptor tma_v) {
#if TF_SM90A_DEVICE
  using Cfg = Config<D>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const AlignedSmem aligned = align_smem_1024(smem_raw);
  SmemLayout<Cfg> sm;
  sm.base = aligned.base;
  unsigned char* smem = aligned.ptr;

  TileInfo ti;
  const TileOrder order = tile_order(ceil_div(p.max_seqlen_q, Cfg::kBlockM), p.heads_q, p.batch);
  ti.b = order.b;
  ti.h = order.h;
  ti.kvh = ti.h / p.group;
  flash_fwd::sequence_bounds(p.cu_seqlens_q, ti.b, p.total_q, p.max_seqlen_q, ti.q_start, ti.q_len);
  flash_fwd::sequence_bounds(p.cu_seqlens_k, ti.b, p.total_k, p.max_seqlen_k, ti.k_start, ti.k_len);
  ti.m_start = order.m_block * Cfg::kBlockM;
  if (ti.m_start >= ti.q_len) return;  // the whole CTA, before any barrier
  ti.blocks = flash_fwd::key_blocks(ti.m_start, Cfg::kBlockM, Cfg::kBlockN, ti.k_len,
                                    ti.k_len - ti.q_len, p.causal, p.window);

  if (threadIdx.x == 0) {
    mbar_init(sm.q_full(), 1);
#pragma unroll
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbar_init(sm.full_k(s), 1);
      mbar_init(sm.full_v(s), 1);
      mbar_init(sm.empty_k(s), Cfg::kConsumerWarps);
      mbar_init(sm.empty_v(s), Cfg::kConsumerWarps);
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (threadIdx.x < 128) {
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (threadIdx.x < kWarpSize && ti.blocks.n_blocks > 0) {
      produce<T, D>(p, &tma_q, &tma_k, &tma_v, sm, ti);
    }
  } else {
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    consume<T, D>(p, sm, smem, ti);
  }
#else
  (void)p;
  (void)tma_q;
  (void)tma_k;
  (void)tma_v;
  __trap();  // built for another target: the launcher only starts this kernel on sm_90a code
#endif
}

}  // namespace flash_fwd_sm90

}  // namespace thinkfuse
