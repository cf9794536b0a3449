// Flash attention backward for Hopper (sm_90a only), head_dim 128: the dK / dV kernel (with the
// dQ atomics) of flash_attention_bwd.cuh rebuilt on wgmma, TMA and warp specialisation
// (FlashAttention-3 structure). Same math, workspaces and semantics as that kernel, whose
// preprocess (delta, lse_log2, zeroed dQ accumulator) and convert (dq = scale * dq_accum)
// kernels run before and after this one: GQA (a CTA walks every query head of its kv head's
// group, so dK / dV stay in registers without atomics), bottom-right aligned causal mask, sliding
// window, packed sequences. float16 / bfloat16. Host side: csrc/ops/flash_attention_bwd_sm90.cu.
//
// Work decomposition
//   One CTA per (key block of kBlockN = 128 keys, sequence, kv head), launched in chunks of
//   (sequence, kv head) pairs with the key block slowest inside a chunk (block 0, which the most
//   queries see under the causal mask, goes first; see launch_order), 3 warpgroups (384 threads):
//     warpgroup 0, the producer: its warp 0 loads (TMA from one elected lane, cp.async for the
//       statistics and for packed tails); the other three warps exit at once. setmaxnreg gives its
//       registers away (kProducerRegs).
//     warpgroups 1 and 2, the consumers: consumer c owns keys [64 c, 64 c + 64) of the block
//       (one wgmma M = 64), holding their dK and dV accumulators (64 + 64 floats per thread).
//   The CTA iterates over (query head of the group, query block of kBlockM = 64 rows) pairs
//   that see a key of the block (causal: from the diagonal on; window: up to the window's end),
//   each iteration in consumer c (wgmma commit groups in brackets):
//     [S^T  = K_c Q^T]  m64n64, both operands K-major from shared memory
//     [dP^T = V_c dO^T] likewise; P^T = exp2(S^T scale_log2 - lse_log2) is formed while dP^T
//                       still runs, then dS^T = P^T (dP^T - delta); pairs the mask hides (only
//                       in blocks it cuts) are set to 0
//     [dV_c += P^T dO]  m64n128, A = P^T from registers (the accumulator pairs are the A
//                       fragment, as P in the forward), B = dO MN-major
//     dS^T -> shared memory; both consumers meet at a named barrier; then
//     [dQ[:, 64 c .. 64 c + 64) = dS K[:, 64 c ..]]  m64n64 over the block's 128 keys: A = dS
//                       (MN-major view of the stored dS^T), B = K (MN-major)
//     [dK_c += dS^T Q]  like dV; while it runs, dQ is added to the float32 accumulator with
//                       vector atomics (red.global.add.v4.f32, lane pairs of a quad swapping
//                       halves so that each holds 4 consecutive columns)
//
// Shared memory (dynamic, base rounded up to 1024 bytes), every tile in the 128-byte swizzled
// layout of flash_attention_fwd_sm90.cuh (D / 64 column panels of [rows][128 bytes]):
//   K, V [128][D] once; Q, dO [64][D] in kStages = 3 stages; dS^T [128 keys][64 queries] (one
//   panel) in 2 buffers; lse_log2 and delta [kStages][64] floats; the mbarriers.
//   D = 128, 16-bit: 64 + 96 + 32 + 1.5 KiB -> 194 KiB, one CTA per SM.
//   The swizzled [rows][64] panel serves both wgmma views: K-major for rows as M / N (K, V as A
//   of S^T / dP^T; Q, dO as B there) and MN-major for rows as the reduction dim (Q, dO as B of
//   dK / dV; K as B of dQ; dS^T as A of dQ).
//
// Loads (producer warp 0): K and V once onto kv_full, by TMA (tensor maps as the forward's; box
//   rows 128 for K / V, 64 for Q / dO). Per iteration, stage s = it % kStages: wait empty[s];
//   Q and dO by TMA onto full[s] (lane 0's arrive.expect_tx, the first of its two arrivals);
//   then the lanes cp.async the 64 lse_log2 and delta values (zero past q_len; those rows are
//   masked), cp.async.wait_all, __syncwarp, and lane 0's plain arrive (the second), so the
//   statistics' round trip overlaps the tile loads. Packed layout: a tile that runs past its
//   sequence would read the next sequence's tokens, and 0 * (non-finite junk) is NaN in
//   dK += dS^T Q, dQ = dS K and dP^T = V dO^T; such tiles (K / V past k_len, Q / dO past q_len)
//   are copied with cp.async instead, zero-filling the rows past the sequence (as the forward's
//   V tail), then cp.async.wait_all + fence.proxy.async + __syncwarp + plain arrives (two for
//   full[s]). Padded layout: TMA zero-fills rows past max_seqlen, which is then the sequence
//   length.
//
// Barriers: kv_full (1 arrival + bytes), full[s] (2 arrivals + bytes), empty[s] (kConsumerWarps
//   arrivals: lane 0 of each consumer warp once the wgmmas reading Q / dO of the stage have
//   completed and its lanes have read the statistics); the dS^T hand-over between consumers is
//   named barrier kDsBarrier (256 threads). dS^T is double-buffered: buffer it % 2 is rewritten
//   in iteration it + 2, and a consumer gets there only past the barrier of iteration it + 1,
//   which the other consumer reaches only after its dQ wgmma of iteration it (the last reader of
//   the buffer) has completed.
//
// Numerics as flash_attention_bwd.cuh: P and dS rounded to T for the tensor-core products,
// float32 accumulation, dK scaled by softmax_scale in the epilogue, dQ by the convert kernel; the
// order of the dQ atomics is nondeterministic.
#pragma once

#include <cstdint>
#include <type_traits>

#include "thinkfuse/common.cuh"
#include "thinkfuse/flash_attention_bwd.cuh"
#include "thinkfuse/flash_attention_fwd_sm90.cuh"  // TmaDescriptor and the tile helpers
#include "thinkfuse/mma_sm80.cuh"
#include "thinkfuse/sm90.cuh"

namespace thinkfuse {
namespace flash_bwd_sm90 {

using flash_fwd_sm90::align_smem_1024;
using flash_fwd_sm90::AlignedSmem;
using flash_fwd_sm90::copy_rows_zero_fill;
using flash_fwd_sm90::release;
using flash_fwd_sm90::smem_descriptor;
using flash_fwd_sm90::tile_offset;
using flash_fwd_sm90::TmaDescriptor;

template <int D>
struct Config {
  static_assert(D == 128, "head dim 128 (dK / dV accumulators: 2 x D / 2 floats per thread)");
  static constexpr int kHeadDim = D;
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kConsumerWarps = 4 * kConsumerWarpgroups;
  static constexpr int kThreads = 128 * (1 + kConsumerWarpgroups);
  static constexpr int kBlockN = 64 * kConsumerWarpgroups;  // keys per CTA
  static constexpr int kBlockM = 64;                        // query rows per iteration
  static constexpr int kStages = 3;
  static constexpr int kPanels = D / 64;
  static constexpr int kKVPanelBytes = kBlockN * 128;
  static constexpr int kQPanelBytes = kBlockM * 128;
  static constexpr int kKVBytes = kPanels * kKVPanelBytes;
  static constexpr int kQBytes = kPanels * kQPanelBytes;
  static constexpr int kDsBytes = kBlockN * 128;  // [keys][64 queries], one panel
  static constexpr int kKOffset = 0;
  static constexpr int kVOffset = kKOffset + kKVBytes;
  static constexpr int kQOffset = kVOffset + kKVBytes;          // stage s at + s * kQBytes
  static constexpr int kDOOffset = kQOffset + kStages * kQBytes;  // stage s at + s * kQBytes
  static constexpr int kDsOffset = kDOOffset + kStages * kQBytes;  // buffer i at + i * kDsBytes
  static constexpr int kLseOffset = kDsOffset + 2 * kDsBytes;    // float [kStages][kBlockM]
  static constexpr int kDeltaOffset = kLseOffset + kStages * kBlockM * 4;
  static constexpr int kBarrierOffset = kDeltaOffset + kStages * kBlockM * 4;
  static constexpr int kBarriers = 1 + 2 * kStages;  // kv_full, full[s], empty[s]
  static constexpr int kSmemBytes = kBarrierOffset + 8 * kBarriers + 1024;  // + base alignment
  // 128 * 24 + 256 * 240 = 64512 <= 65536 registers (one CTA per SM, as the forward).
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static constexpr int kAccRegs = D / 2;  // dK, dV accumulator floats per thread (m64nD)
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block on sm90");
};

// Hardware named barrier (0 is __syncthreads): dS^T of both consumers stored.
constexpr int kDsBarrier = 1;

using sm90::cp_async_16;
using sm90::cp_async_wait_all;
using sm90::fence_barrier_init;
using sm90::fence_operands;
using sm90::fence_proxy_async;
using sm90::mbar_arrive;
using sm90::mbar_arrive_expect_tx;
using sm90::mbar_init;
using sm90::mbar_wait;
using sm90::named_barrier_sync;
using sm90::prefetch_tensormap;
using sm90::setmaxnreg_dec;
using sm90::setmaxnreg_inc;
using sm90::tma_load_4d;
using sm90::wgmma_commit;
using sm90::wgmma_fence;
using sm90::wgmma_rs;
using sm90::wgmma_ss_m64n64k16;
using sm90::wgmma_wait;

// Shared-window addresses of the CTA's tiles and barriers.
template <typename Cfg>
struct SmemLayout {
  uint32_t base;  // 1024-byte aligned
  __device__ __forceinline__ uint32_t k() const { return base + Cfg::kKOffset; }
  __device__ __forceinline__ uint32_t v() const { return base + Cfg::kVOffset; }
  __device__ __forceinline__ uint32_t q(int stage) const {
    return base + Cfg::kQOffset + stage * Cfg::kQBytes;
  }
  __device__ __forceinline__ uint32_t dout(int stage) const {
    return base + Cfg::kDOOffset + stage * Cfg::kQBytes;
  }
  __device__ __forceinline__ uint32_t ds(int buffer) const {
    return base + Cfg::kDsOffset + buffer * Cfg::kDsBytes;
  }
  __device__ __forceinline__ uint32_t kv_full() const { return base + Cfg::kBarrierOffset; }
  __device__ __forceinline__ uint32_t full(int stage) const {
    return base + Cfg::kBarrierOffset + 8 * (1 + stage);
  }
  __device__ __forceinline__ uint32_t empty(int stage) const {
    return base + Cfg::kBarrierOffset + 8 * (1 + Cfg::kStages + stage);
  }
};

// What every role of a CTA needs: its sequence, key block and the number of its (query head,
// query block) iterations (iteration() decodes one).
struct CtaInfo {
  int b, kvh;
  int64_t q_start, k_start;  // first token of the sequence (packed) or 0 (padded)
  int q_len, k_len;
  int n0;     // first key of the block
  int shift;  // k_len - q_len: query t sits at key position t + shift
  int window;  // > 0: sliding window, clamped to k_len
  int mb_lo, n_mb, n_iter;
};

// Launch order. The CTAs of one (sequence, kv head) pair read the same Q / dO / lse / delta
// tiles and add into the same dQ rows, so they share L2 when they run at the same time; the
// longest causal key blocks should start first, so that the last wave is made of short ones.
// The pairs are cut into chunks of p.pairs_per_chunk consecutive pairs (the last chunk may hold
// fewer); chunks run one after the other, and inside a chunk the key block is slowest and the
// pair fastest. One chunk of every pair is longest-first over the whole grid; smaller chunks keep
// more CTAs of each pair in flight together (the host picks, flash_attention_bwd_sm90.cu).
struct LaunchSlot {
  int key_block, pair;
};

__device__ __forceinline__ LaunchSlot launch_order(int cta, int n_key_blocks, int pairs,
                                                   int pairs_per_chunk) {
  // 32-bit: every product is at most the CTA count, which the host keeps <= INT32_MAX
  const int chunk_ctas = pairs_per_chunk * n_key_blocks;
  const int chunk = cta / chunk_ctas;
  const int first_pair = chunk * pairs_per_chunk;
  const int width = min(pairs_per_chunk, pairs - first_pair);
  const int in_chunk = cta - chunk * chunk_ctas;
  const int key_block = in_chunk / width;
  return {key_block, first_pair + (in_chunk - key_block * width)};
}

template <typename T, int D>
__device__ __forceinline__ CtaInfo cta_info(const flash_bwd::KernelParams<T>& p) {
  using Cfg = Config<D>;
  CtaInfo ci;
  const LaunchSlot slot = launch_order(static_cast<int>(blockIdx.x),
                                       ceil_div(p.max_seqlen_k, Cfg::kBlockN),
                                       p.batch * p.heads_kv, p.pairs_per_chunk);
  const int nb = slot.key_block;
  ci.b = slot.pair / p.heads_kv;
  ci.kvh = slot.pair - ci.b * p.heads_kv;
  flash_bwd::sequence(p.cu_q, ci.b, p.total_q, p.max_seqlen_q, ci.q_start, ci.q_len);
  flash_bwd::sequence(p.cu_k, ci.b, p.total_k, p.max_seqlen_k, ci.k_start, ci.k_len);
  ci.n0 = nb * Cfg::kBlockN;
  ci.shift = ci.k_len - ci.q_len;
  ci.window = p.window > 0 ? min(p.window, ci.k_len) : 0;
  // Query rows [lo_row, hi_row) see a key of [n0, n_end) (as flash_bwd::dkdv_kernel).
  const int n_end = min(ci.n0 + Cfg::kBlockN, ci.k_len);
  const int lo_row = p.causal ? max(ci.n0 - ci.shift, 0) : 0;
  const int hi_row = ci.window > 0 ? min(ci.q_len, n_end - 1 - ci.shift + ci.window) : ci.q_len;
  ci.mb_lo = lo_row / Cfg::kBlockM;
  ci.n_mb = hi_row > lo_row ? ceil_div(hi_row, Cfg::kBlockM) - ci.mb_lo : 0;
  ci.n_iter = ci.n0 < ci.k_len ? p.group * ci.n_mb : 0;
  return ci;
}

// Iteration it of a CTA: its stage of the Q / dO ring with the phase parity of that use, its
// query head and first query row.
struct Iteration {
  int stage;
  uint32_t phase;
  int h, m0;
};

template <typename Cfg>
__device__ __forceinline__ Iteration iteration(const CtaInfo& ci, int group, int it) {
  return {it % Cfg::kStages, static_cast<uint32_t>(it / Cfg::kStages) & 1u,
          ci.kvh * group + it / ci.n_mb, (ci.mb_lo + it % ci.n_mb) * Cfg::kBlockM};
}

// TMA of a [rows][D] tile: D / 64 panel boxes at (panel * 64, head, row, batch).
template <int D>
__device__ __forceinline__ void tma_tile(uint32_t dst, int panel_bytes, const TmaDescriptor* map,
                                         uint32_t bar, int head, int row, int batch) {
#pragma unroll
  for (int panel = 0; panel < D / 64; ++panel) {
    tma_load_4d(dst + panel * panel_bytes, map, bar, panel * 64, head, row, batch);
  }
}

// Producer warp (see the header comment).
template <typename T, int D>
__device__ __forceinline__ void produce(const flash_bwd::KernelParams<T>& p,
                                        const TmaDescriptor* tma_q, const TmaDescriptor* tma_k,
                                        const TmaDescriptor* tma_v, const TmaDescriptor* tma_do,
                                        const SmemLayout<Config<D>>& sm, unsigned char* smem,
                                        const CtaInfo& ci) {
  using Cfg = Config<D>;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  const bool packed = p.cu_q != nullptr;
  const int batch_coord = packed ? 0 : ci.b;  // the tensor maps' batch coordinate
  const int q_row = static_cast<int>(ci.q_start);  // token coordinate of query row 0
  const int k_row = static_cast<int>(ci.k_start) + ci.n0;

  if (packed && ci.n0 + Cfg::kBlockN > ci.k_len) {
    const int valid = ci.k_len - ci.n0;
    copy_rows_zero_fill<Cfg::kBlockN, D>(sm.k(), Cfg::kKVPanelBytes,
                                         p.k + (ci.k_start + ci.n0) * p.k_ss + ci.kvh * p.k_hs,
                                         p.k_ss, valid, lane);
    copy_rows_zero_fill<Cfg::kBlockN, D>(sm.v(), Cfg::kKVPanelBytes,
                                         p.v + (ci.k_start + ci.n0) * p.v_ss + ci.kvh * p.v_hs,
                                         p.v_ss, valid, lane);
    cp_async_wait_all();
    fence_proxy_async();  // generic-proxy writes, read next by wgmma (async proxy)
    __syncwarp();
    if (lane == 0) mbar_arrive(sm.kv_full());
  } else if (lane == 0) {
    prefetch_tensormap(tma_q);
    prefetch_tensormap(tma_k);
    prefetch_tensormap(tma_v);
    prefetch_tensormap(tma_do);
    mbar_arrive_expect_tx(sm.kv_full(), 2 * Cfg::kKVBytes);
    tma_tile<D>(sm.k(), Cfg::kKVPanelBytes, tma_k, sm.kv_full(), ci.kvh, k_row, batch_coord);
    tma_tile<D>(sm.v(), Cfg::kKVPanelBytes, tma_v, sm.kv_full(), ci.kvh, k_row, batch_coord);
  }

  float* lse_smem = reinterpret_cast<float*>(smem + Cfg::kLseOffset);
  float* delta_smem = reinterpret_cast<float*>(smem + Cfg::kDeltaOffset);
#pragma unroll 1
  for (int it = 0; it < ci.n_iter; ++it) {
    const auto [stage, phase, h, m0] = iteration<Cfg>(ci, p.group, it);
    const int valid = ci.q_len - m0;
    mbar_wait(sm.empty(stage), phase ^ 1u);

    // Q and dO first (their bytes and the first of full[s]'s two arrivals), so that the
    // statistics' round trip overlaps the tile loads.
    const bool tail = packed && m0 + Cfg::kBlockM > ci.q_len;
    if (tail) {
      const int64_t tok = ci.q_start + m0;
      copy_rows_zero_fill<Cfg::kBlockM, D>(sm.q(stage), Cfg::kQPanelBytes,
                                           p.q + tok * p.q_ss + h * p.q_hs, p.q_ss, valid, lane);
      copy_rows_zero_fill<Cfg::kBlockM, D>(sm.dout(stage), Cfg::kQPanelBytes,
                                           p.dout + tok * p.do_ss + h * p.do_hs, p.do_ss, valid,
                                           lane);
    } else if (lane == 0) {
      mbar_arrive_expect_tx(sm.full(stage), 2 * Cfg::kQBytes);
      tma_tile<D>(sm.q(stage), Cfg::kQPanelBytes, tma_q, sm.full(stage), h, q_row + m0,
                  batch_coord);
      tma_tile<D>(sm.dout(stage), Cfg::kQPanelBytes, tma_do, sm.full(stage), h, q_row + m0,
                  batch_coord);
    }
    const int64_t ws = ci.b * p.ws_bs + h * p.ws_hs + ci.q_start + m0;
#pragma unroll
    for (int r = lane; r < Cfg::kBlockM; r += kWarpSize) {
      const bool ok = r < valid;
      mma::cp_async_4(lse_smem + stage * Cfg::kBlockM + r, ok ? p.lse_log2 + ws + r : p.lse_log2,
                      ok);
      mma::cp_async_4(delta_smem + stage * Cfg::kBlockM + r, ok ? p.delta + ws + r : p.delta, ok);
    }
    cp_async_wait_all();
    if (tail) fence_proxy_async();  // Q / dO by cp.async (generic proxy), read next by wgmma
    __syncwarp();  // every lane's copies are complete before lane 0 signals them
    if (lane == 0) {
      if (tail) mbar_arrive(sm.full(stage));  // in place of the TMA's arrive.expect_tx
      mbar_arrive(sm.full(stage));
    }
    __syncwarp();
  }
}

// acc = A B^T over D (K-major both): S^T = K_c Q^T or dP^T = V_c dO^T (no wait).
template <typename T, int D>
__device__ __forceinline__ void issue_rows_by_rows(float (&acc)[32], uint32_t a_tile,
                                                   uint32_t b_tile) {
  using Cfg = Config<D>;
  const uint64_t desc_a = smem_descriptor(a_tile, 16, 1024);
  const uint64_t desc_b = smem_descriptor(b_tile, 16, 1024);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    // k-step kk: panel kk / 4, 32 bytes per step inside the panel's 128-byte rows
    const uint32_t a_off = (kk / 4) * Cfg::kKVPanelBytes + (kk % 4) * 32;
    const uint32_t b_off = (kk / 4) * Cfg::kQPanelBytes + (kk % 4) * 32;
    wgmma_ss_m64n64k16<T, 0, 0>(acc, desc_a + (a_off >> 4), desc_b + (b_off >> 4), kk > 0 ? 1 : 0);
  }
}

// acc += A B over the kBlockM query rows: A = P^T or dS^T from registers (word 4 kk + j of the
// fragment array is A register j of k-step kk), B = the Q / dO tile, MN-major (no wait).
template <typename T, int D>
__device__ __forceinline__ void issue_frag_by_tile(float (&acc)[D / 2], const uint32_t (&a)[16],
                                                   uint32_t b_tile) {
  using Cfg = Config<D>;
  const uint64_t desc_b = smem_descriptor(b_tile, Cfg::kQPanelBytes, 1024);
#pragma unroll
  for (int kk = 0; kk < Cfg::kBlockM / 16; ++kk) {
    const uint32_t b_off = kk * 16 * 128;  // query rows 16 kk ..: 16 rows of 128 bytes
    wgmma_rs<T>(acc, a[4 * kk], a[4 * kk + 1], a[4 * kk + 2], a[4 * kk + 3],
                desc_b + (b_off >> 4), 1);
  }
}

// dq = dS K[:, 64 cw ..) over the block's keys: A = dS, the MN-major view of dS^T [key][query];
// B = K's column panel cw, MN-major (no wait).
template <typename T, int D>
__device__ __forceinline__ void issue_dq(float (&dq)[32], uint32_t ds_tile, uint32_t k_panel) {
  using Cfg = Config<D>;
  const uint64_t desc_a = smem_descriptor(ds_tile, Cfg::kDsBytes, 1024);    // LBO unused: M = 64
  const uint64_t desc_b = smem_descriptor(k_panel, Cfg::kKVPanelBytes, 1024);  // N = 64: unused
#pragma unroll
  for (int kk = 0; kk < Cfg::kBlockN / 16; ++kk) {
    const uint32_t off = kk * 16 * 128;  // keys 16 kk ..: 16 rows of 128 bytes
    wgmma_ss_m64n64k16<T, 1, 1>(dq, desc_a + (off >> 4), desc_b + (off >> 4), kk > 0 ? 1 : 0);
  }
}

// P^T of one iteration in place (s -> P^T), hidden (query, key) pairs set to 0 when kMask.
// Element 4 j + e of the accumulators: key key_row + 8 ((e >> 1) & 1), query
// m0 + 8 j + 2 t + (e & 1) (so the two statistics a thread needs per j are one float2).
template <bool kMask>
__device__ __forceinline__ void probabilities(float (&s)[32], const float* lse, int t,
                                              float scale_log2, int key_row, int m0,
                                              const CtaInfo& ci, bool causal) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float2 l = *reinterpret_cast<const float2*>(lse + 8 * j + 2 * t);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = 4 * j + e;
      const float pv = exp2f(fmaf(s[i], scale_log2, -((e & 1) ? l.y : l.x)));
      if constexpr (kMask) {
        const int key = key_row + 8 * ((e >> 1) & 1);
        const int qi = m0 + 8 * j + 2 * t + (e & 1);
        const bool visible =
            flash_bwd::pair_visible(qi, key, ci.q_len, ci.k_len, ci.shift, causal, ci.window);
        s[i] = visible ? pv : 0.0f;  // a select: inf / NaN never leak
      } else {
        s[i] = pv;
      }
    }
  }
}

// dS^T = P^T (dP^T - delta) in place (dp -> dS^T), same element positions. kMask: 0 wherever
// P^T is 0 (hidden pairs, also where the probability underflowed, which gives 0 anyway), a
// select, so a non-finite dP^T of a hidden pair cannot leak.
template <bool kMask>
__device__ __forceinline__ void score_gradients(float (&dp)[32], const float (&s)[32],
                                                const float* delta, int t) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float2 d = *reinterpret_cast<const float2*>(delta + 8 * j + 2 * t);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = 4 * j + e;
      const float ds = s[i] * (dp[i] - ((e & 1) ? d.y : d.x));
      dp[i] = (!kMask || s[i] != 0.0f) ? ds : 0.0f;
    }
  }
}

// dq (m64n64 accumulator: the iteration's 64 queries x columns 64 cw ..) added to the float32
// accumulator, 4 columns per vector red: the lanes t, t ^ 1 of a quad pair swap halves, so the
// even one holds 4 consecutive columns of row g and the odd one of row g + 8. Rows past q_len
// (dS = 0 there) would land in another sequence's or no row: skipped.
template <int D>
__device__ __forceinline__ void add_dq(float* dq_accum, const float (&dq)[32], int64_t q_row0,
                                       int heads_q, int h, int m0, int q_len, int cw, int warp,
                                       int g, int t) {
  const bool odd = (t & 1) != 0;
  const int qi = m0 + 16 * warp + g + (odd ? 8 : 0);
  float* dst = dq_accum + ((q_row0 + qi) * heads_q + h) * D + 64 * cw + 2 * (t & ~1);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    // row g: (dq[4j], dq[4j+1]); row g + 8: (dq[4j+2], dq[4j+3]); columns 8 j + 2 t, + 1
    const float send_x = odd ? dq[4 * j] : dq[4 * j + 2];
    const float send_y = odd ? dq[4 * j + 1] : dq[4 * j + 3];
    const float got_x = __shfl_xor_sync(0xffffffffu, send_x, 1);
    const float got_y = __shfl_xor_sync(0xffffffffu, send_y, 1);
    const float4 v = odd ? make_float4(got_x, got_y, dq[4 * j + 2], dq[4 * j + 3])
                         : make_float4(dq[4 * j], dq[4 * j + 1], got_x, got_y);
    if (qi < q_len) flash_bwd::atomic_add4(dst + 8 * j, v);
  }
}

// Consumer warpgroup cw (0 or 1): keys [64 cw, 64 cw + 64) of the block.
template <typename T, int D>
__device__ __forceinline__ void consume(const flash_bwd::KernelParams<T>& p,
                                        const SmemLayout<Config<D>>& sm, unsigned char* smem,
                                        const CtaInfo& ci) {
  using Cfg = Config<D>;
  const int cw = static_cast<int>(threadIdx.x / 128) - 1;
  const int tid = static_cast<int>(threadIdx.x % 128);
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int row_local = 64 * cw + 16 * warp + g;  // block row (key) of accumulator row half 0
  const int key_row = ci.n0 + row_local;
  const int n0c = ci.n0 + 64 * cw;  // this consumer's first key

  float dk[Cfg::kAccRegs];
  float dv[Cfg::kAccRegs];
#pragma unroll
  for (int i = 0; i < Cfg::kAccRegs; ++i) {
    dk[i] = 0.0f;
    dv[i] = 0.0f;
  }

  if (ci.n_iter > 0) {
    const int64_t q_row0 =
        p.cu_q != nullptr ? ci.q_start : static_cast<int64_t>(ci.b) * p.max_seqlen_q;
    const float* lse_smem = reinterpret_cast<const float*>(smem + Cfg::kLseOffset);
    const float* delta_smem = reinterpret_cast<const float*>(smem + Cfg::kDeltaOffset);
    mbar_wait(sm.kv_full(), 0);

#pragma unroll 1
    for (int it = 0; it < ci.n_iter; ++it) {
      const auto [stage, phase, h, m0] = iteration<Cfg>(ci, p.group, it);

      // ---- S^T, then P^T while dP^T computes ------------------------------------------------
      float s[32];
      float dp[32];
      mbar_wait(sm.full(stage), phase);
      fence_operands(dk);
      fence_operands(dv);
      wgmma_fence();  // dk / dv and the fragments were last touched by this thread's own code
      issue_rows_by_rows<T, D>(s, sm.k() + 64 * cw * 128, sm.q(stage));
      wgmma_commit();
      issue_rows_by_rows<T, D>(dp, sm.v() + 64 * cw * 128, sm.dout(stage));
      wgmma_commit();
      wgmma_wait<1>();  // S^T complete (groups complete in order); dP^T may still run
      fence_operands(s);

      // Every pair of this consumer's keys and the block's queries visible: all rows and keys
      // real, causal: the first query's position reaches the last key; window: the last query's
      // window still covers the first key.
      const bool full = m0 + Cfg::kBlockM <= ci.q_len && n0c + 64 <= ci.k_len &&
                        (!p.causal || m0 + ci.shift >= n0c + 63) &&
                        (ci.window <= 0 || m0 + Cfg::kBlockM - 1 + ci.shift - ci.window < n0c);
      const float* lse = lse_smem + stage * Cfg::kBlockM;
      const float* delta = delta_smem + stage * Cfg::kBlockM;
      if (full) {
        probabilities<false>(s, lse, t, p.scale_log2, key_row, m0, ci, p.causal);
      } else {
        probabilities<true>(s, lse, t, p.scale_log2, key_row, m0, ci, p.causal);
      }
      wgmma_wait<0>();
      fence_operands(dp);
      if (full) {
        score_gradients<false>(dp, s, delta, t);
      } else {
        score_gradients<true>(dp, s, delta, t);
      }
      uint32_t pf[16];
      uint32_t dsf[16];
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        pf[j] = mma::pack2<T>(s[2 * j], s[2 * j + 1]);
        dsf[j] = mma::pack2<T>(dp[2 * j], dp[2 * j + 1]);
      }
      // dS^T [key][query] into buffer it % 2: row row_local + 8 hh, 16-byte chunk j (queries
      // 8 j ..), bytes 4 t ..: the pair (dp[4 j + 2 hh], dp[4 j + 2 hh + 1]) = dsf[2 j + hh].
      // row % 8 = g, so chunk j ^ g: the 8 rows of a warp hit 8 distinct chunks (no conflicts).
      unsigned char* ds_tile = smem + Cfg::kDsOffset + (it & 1) * Cfg::kDsBytes;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          *reinterpret_cast<uint32_t*>(ds_tile + tile_offset(row_local + 8 * hh, j, Cfg::kDsBytes) +
                                       4 * t) = dsf[2 * j + hh];
        }
      }

      // ---- dV += P^T dO; dQ of the block (both consumers' dS^T); dK += dS^T Q ------------------
      // The atomics of dQ then overlap dK.
      fence_operands(pf);
      fence_operands(dsf);
      wgmma_fence();
      issue_frag_by_tile<T, D>(dv, pf, sm.dout(stage));
      wgmma_commit();
      fence_proxy_async();  // this thread's dS^T stores (generic proxy) before the wgmma reads
      named_barrier_sync(kDsBarrier, 256);
      float dq[32];
      fence_operands(dq);
      wgmma_fence();
      issue_dq<T, D>(dq, sm.ds(it & 1), sm.k() + cw * Cfg::kKVPanelBytes);
      wgmma_commit();
      issue_frag_by_tile<T, D>(dk, dsf, sm.q(stage));
      wgmma_commit();
      wgmma_wait<1>();  // dV and dQ complete; dK may still run
      fence_operands(dq);
      add_dq<D>(p.dq_accum, dq, q_row0, p.heads_q, h, m0, ci.q_len, cw, warp, g, t);
      wgmma_wait<0>();
      fence_operands(dk);
      fence_operands(dv);
      fence_operands(pf);
      fence_operands(dsf);
      release(sm.empty(stage), lane);  // Q, dO and the statistics of the stage are consumed
    }
  }

  // ---- epilogue: dK = scale * acc, dV = acc; keys past k_len are not written ------------------------
  const int64_t k_row0 = p.cu_k != nullptr ? ci.k_start : static_cast<int64_t>(ci.b) * p.max_seqlen_k;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int key = key_row + 8 * hh;
    if (key < ci.k_len) {
      const int64_t off = ((k_row0 + key) * p.heads_kv + ci.kvh) * D + 2 * t;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        *reinterpret_cast<uint32_t*>(p.dk + off + 8 * j) =
            mma::pack2<T>(dk[4 * j + 2 * hh] * p.scale, dk[4 * j + 2 * hh + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(p.dv + off + 8 * j) =
            mma::pack2<T>(dv[4 * j + 2 * hh], dv[4 * j + 2 * hh + 1]);
      }
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(Config<D>::kThreads, 1)
    dkdv_kernel(const flash_bwd::KernelParams<T> p, const __grid_constant__ TmaDescriptor tma_q,
                const __grid_constant__ TmaDescriptor tma_k,
                const __grid_constant__ TmaDescriptor tma_v,
                const __grid_constant__ TmaDescriptor tma_do) {
#if TF_SM90A_DEVICE
  using Cfg = Config<D>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const AlignedSmem aligned = align_smem_1024(smem_raw);
  SmemLayout<Cfg> sm;
  sm.base = aligned.base;
  unsigned char* smem = aligned.ptr;

  const CtaInfo ci = cta_info<T, D>(p);
  if (ci.n0 >= ci.k_len) return;  // the whole CTA, before any barrier: keys of no sequence

  if (threadIdx.x == 0) {
    mbar_init(sm.kv_full(), 1);
#pragma unroll
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbar_init(sm.full(s), 2);  // the Q / dO arrival (with the TMA bytes), the statistics'
      mbar_init(sm.empty(s), Cfg::kConsumerWarps);
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (threadIdx.x < 128) {
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (threadIdx.x < kWarpSize && ci.n_iter > 0) {
      produce<T, D>(p, &tma_q, &tma_k, &tma_v, &tma_do, sm, smem, ci);
    }
  } else {
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    consume<T, D>(p, sm, smem, ci);
  }
#else
  (void)p;
  (void)tma_q;
  (void)tma_k;
  (void)tma_v;
  (void)tma_do;
  __trap();  // built for another target: the launcher only starts this kernel on sm_90a code
#endif
}

}  // namespace flash_bwd_sm90
}  // namespace thinkfuse
