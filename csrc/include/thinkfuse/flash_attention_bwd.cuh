// Flash-attention backward (FlashAttention-2 style) on tensor cores: mma.sync m16n8k16 with
// float32 accumulators, cp.async double buffering, sm80 and later. Semantics of
// kernels/attention.py (see flash_attention_params.cuh for layouts and masks).
//
// Math, per query row i (scores s_ij = q_i . k_j, probabilities P_ij = exp(scale s_ij - lse_i)):
//   dV_j  = sum_i P_ij dO_i
//   dP_ij = dO_i . v_j
//   dS_ij = P_ij (dP_ij - delta_i),  delta_i = rowsum(dO_i * O_i) - dlse_i
//   dQ_i  = scale sum_j dS_ij k_j,   dK_j = scale sum_i dS_ij q_i
// The dlse term: lse_i = log sum_j exp(scale s_ij) gives d lse_i / d(scale s_ij) = P_ij, so an
// upstream gradient dlse_i adds dlse_i P_ij to dS_ij: P (dP - rowsum(dO O) + dlse), i.e. delta
// minus dlse (as kernels/attention.py's `delta -= dlse` and _dense_backward's formula).
//
// Three kernels:
//   1. preprocess_kernel, one warp per (token row, query head) of the q tensor (every row, also
//      packed rows outside all sequences): delta = rowsum(dO O) - dlse and
//      lse_log2 = lse * log2(e) (-inf, a row that sees no key, becomes +inf so that
//      exp2(x - lse_log2) = 0) into float32 workspaces laid out like a contiguous lse, and
//      zeroes the row's float32 dQ accumulator.
//   2. dkdv_kernel, one CTA per (key block of kBlockN = 16 * kWarps keys, batch, kv head): K
//      and V tiles stay in shared memory; the CTA loops over the query heads of its GQA group
//      and, per head, over the query blocks (kBlockM = 64 rows) that can see a key of the block,
//      accumulating dK and dV in float32 registers (no expanded K/V, no atomics on dK/dV). Each
//      iteration also forms this key block's contribution dS K to dQ and adds it with float32
//      atomics (red.global.add) into the dQ accumulator.
//   3. convert_kernel: dq = dq_accum * scale, rounded to the input dtype.
//
// Why atomics for dQ (as FlashAttention-2) and not a separate dQ kernel (as the Triton one):
// the dQ kernel recomputes S = Q K^T and dP = dO V^T, 7 GEMMs per (query block, key block)
// instead of 5 (+40% tensor work); the atomics cost one fire-and-forget red per float of a
// 64 x D tile per iteration, which the L2 absorbs. The price is a nondeterministic summation
// order of dQ (float32, then rounded once to bf16/fp16).
//
// Work split inside dkdv_kernel (kWarps warps, lane = 4 * g + t, g = lane / 4, t = lane % 4):
//   warp w owns keys [16 w, 16 w + 16) of the block. Per iteration (query block of 64 rows):
//   S^T  = K_w Q^T     [16 x 64]  A = K rows (ldmatrix), B = Q rows (ldmatrix)
//   P^T  = exp2(S^T scale_log2 - lse_log2)   in the C fragments; masked to 0 where needed
//   dP^T = V_w dO^T    [16 x 64]
//   dS^T = P^T (dP^T - delta)
//   dV_w += P^T dO     [16 x D]   A = P^T packed from the C fragments (no shared memory),
//                                 B = dO (ldmatrix.trans)
//   dK_w += dS^T Q     [16 x D]   A = dS^T packed likewise, B = Q (ldmatrix.trans)
//   dS^T is also stored to shared memory; after a barrier every warp computes a 16 x (D / n)
//   tile of dQ_blk = dS K [64 x D] (A = dS via ldmatrix.trans of dS^T, B = K via
//   ldmatrix.trans) and adds it to the dQ accumulator with atomics.
// Masks are applied only in iterations whose (query block, key block) pair is not entirely
// visible (causal diagonal, window edges, partial blocks); query blocks that see none of the
// block's keys are skipped (causal: before the diagonal; window: past the window).
//
// Shared memory rows are padded by 16 bytes (row strides of 9, 13 or 17 16-byte units, all
// odd), so the 8 row addresses of every ldmatrix phase (8 consecutive rows, one 16-byte column
// chunk) fall in 8 distinct bank quads: conflict-free for ldmatrix with and without .trans.
//
// Numerics: P and dS are rounded to T for the tensor-core products (as FlashAttention-2 and
// the Triton kernel); everything else is float32. exp2f becomes ex2.approx under
// --use_fast_math (~2 ulp), far below bf16/fp16 resolution.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "thinkfuse/common.cuh"
#include "thinkfuse/flash_attention_params.cuh"
#include "thinkfuse/mma_sm80.cuh"
#include "thinkfuse/ops.h"

namespace thinkfuse {
namespace flash_bwd {

constexpr float kLog2e = 1.4426950408889634f;

// Compile-time tile configuration. kWarps warps own 16 keys each (kBlockN = 16 kWarps);
// kStages buffers of the per-iteration Q / dO / lse / delta tiles (2: the next iteration's tiles
// load during the whole current one; 1: they load during the dQ phase only, for GPUs with
// < 160 KB of shared memory per block).
template <int kD_, int kWarps_, int kStages_>
struct Config {
  static constexpr int kD = kD_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kStages = kStages_;
  static constexpr int kBlockM = 64;           // query rows per iteration
  static constexpr int kBlockN = 16 * kWarps;  // keys per CTA
  static constexpr int kLdD = kD + 8;          // smem row stride (elements) of K, V, Q, dO
  static constexpr int kLdM = kBlockM + 8;     // smem row stride of dS^T [key][query]
  // Element offsets (type T, 2 bytes) of the tiles in dynamic shared memory.
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kBlockN * kLdD;
  static constexpr int kOffQ = kOffV + kBlockN * kLdD;  // kStages tiles of kBlockM rows
  static constexpr int kOffDO = kOffQ + kStages * kBlockM * kLdD;
  static constexpr int kOffDS = kOffDO + kStages * kBlockM * kLdD;
  static constexpr int kElems = kOffDS + kBlockN * kLdM;
  // Then float32 lse_log2 [kStages][kBlockM] and delta [kStages][kBlockM].
  static constexpr int kSmemBytes = kElems * 2 + 2 * kStages * kBlockM * 4;

  // dQ phase: 4 warps along the 64 query rows (16 each) x kWarpsDq along D; each warp's
  // kDqCols columns are done in kDqChunks passes of kDqChunk (<= 64) to bound the accumulators.
  static constexpr int kWarpsM = kBlockM / 16;
  static constexpr int kWarpsDq = kWarps / kWarpsM;
  static constexpr int kDqCols = kD / kWarpsDq;
  static constexpr int kDqChunks = kDqCols > 64 ? 2 : 1;
  static constexpr int kDqChunk = kDqCols / kDqChunks;

  static_assert(kD % 32 == 0 && kD <= 256, "head_dim must be a multiple of 32");
  static_assert(kWarps % kWarpsM == 0, "kWarps must be a multiple of 4");
  static_assert(kDqChunk % 16 == 0 && kDqChunk * kDqChunks * kWarpsDq == kD, "dQ split");
  static_assert(kBlockM * (kD / 8) % kThreads == 0 && kBlockN * (kD / 8) % kThreads == 0,
                "tile loads must split evenly over the threads");
  static_assert(2 * kBlockM <= kThreads, "lse/delta loads use 2 * kBlockM threads");
  static_assert((kElems * 2) % 16 == 0 && (kLdD * 2) % 16 == 0 && (kLdM * 2) % 16 == 0,
                "16-byte aligned rows");
  static_assert((kLdD / 8) % 2 == 1 && (kLdM / 8) % 2 == 1, "odd 16-byte row strides");
};

// Everything the kernels read, with the storage type T resolved.
template <typename T>
struct KernelParams {
  const T* q;
  const T* k;
  const T* v;
  const T* out;
  const T* dout;
  int64_t q_bs, q_ss, q_hs;
  int64_t k_bs, k_ss, k_hs;
  int64_t v_bs, v_ss, v_hs;
  int64_t o_bs, o_ss, o_hs;
  int64_t do_bs, do_ss, do_hs;
  const float* lse;  // lse + b * lse_bs + h * lse_hs + start_q(b) + t
  int64_t lse_bs, lse_hs;
  const float* dlse;  // nullptr or like lse with its own strides
  int64_t dlse_bs, dlse_hs;
  // Workspaces, contiguous lse-shaped: ws + b * ws_bs + h * ws_hs + start_q(b) + t.
  float* lse_log2;
  float* delta;
  int64_t ws_bs, ws_hs;
  float* dq_accum;  // [rows_q, Hq, D] float32
  T* dq;            // [rows_q, Hq, D] contiguous
  T* dk;            // [rows_k, Hkv, D] contiguous
  T* dv;
  const int32_t* cu_q;  // nullptr: padded
  const int32_t* cu_k;
  int64_t total_q, total_k;  // packed: rows of q / k
  int64_t rows_q;            // rows of q: B * Sq (padded) or total_q
  int batch, heads_q, heads_kv, group;
  int max_seqlen_q, max_seqlen_k;
  int window;  // <= 0: none
  // Launch order of the Hopper dK / dV kernel (flash_bwd_sm90::cta_info): (sequence, kv head)
  // pairs per chunk, in [1, batch * heads_kv]. Unused by this file's kernels.
  int pairs_per_chunk;
  bool causal;
  float scale;       // softmax_scale
  float scale_log2;  // softmax_scale * log2(e)
};

// ---------------------------------------------------------------------------------------------
// 1. Preprocess: delta, lse_log2 and zeroed dQ accumulators.

constexpr int kPreWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kPreWarps* kWarpSize)
    preprocess_kernel(const KernelParams<T> p, const int head_dim) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * kPreWarps + threadIdx.x / kWarpSize;
  if (pair >= p.rows_q * p.heads_q) return;  // warp-uniform
  const int64_t row = pair / p.heads_q;      // physical token row of q
  const int h = static_cast<int>(pair - row * p.heads_q);
  // (batch, token) of the row: packed rows are (0, row) (batch strides are 0 there).
  const bool packed = p.cu_q != nullptr;
  const int64_t b = packed ? 0 : row / p.max_seqlen_q;
  const int64_t t = packed ? row : row - b * p.max_seqlen_q;
  const T* o = p.out + b * p.o_bs + t * p.o_ss + h * p.o_hs;
  const T* dout = p.dout + b * p.do_bs + t * p.do_ss + h * p.do_hs;
  float sum = 0.0f;
  for (int d = lane; d < head_dim; d += kWarpSize) sum += to_float(o[d]) * to_float(dout[d]);
  sum = warp_reduce_sum(sum);
  // pair == row * Hq + h: the accumulator row of (row, h); head_dim % 4 == 0, 16-byte aligned.
  float4* acc = reinterpret_cast<float4*>(p.dq_accum + pair * head_dim);
  for (int i = lane; i < head_dim / 4; i += kWarpSize) acc[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  if (lane == 0) {
    const int64_t ws = b * p.ws_bs + h * p.ws_hs + t;
    const float dl = p.dlse != nullptr ? p.dlse[b * p.dlse_bs + h * p.dlse_hs + t] : 0.0f;
    p.delta[ws] = sum - dl;
    const float l = p.lse[b * p.lse_bs + h * p.lse_hs + t];
    p.lse_log2[ws] = l == -INFINITY ? INFINITY : l * kLog2e;
  }
}

// ---------------------------------------------------------------------------------------------
// 3. dq = dq_accum * scale in T. n4 = elements / 4.

template <typename T>
__global__ void __launch_bounds__(256)
    convert_kernel(const float* __restrict__ acc, T* __restrict__ dq, int64_t n4, float scale) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float4 a = reinterpret_cast<const float4*>(acc)[i];
    AlignedArray<T, 4> out;
    out.v[0] = from_float<T>(a.x * scale);
    out.v[1] = from_float<T>(a.y * scale);
    out.v[2] = from_float<T>(a.z * scale);
    out.v[3] = from_float<T>(a.w * scale);
    store_aligned<T, 4>(dq + 4 * i, out);
  }
}

// ---------------------------------------------------------------------------------------------
// 2. dK / dV (and the dQ atomics).

// [start, start + len) of sequence b, clamped into [0, total] (offsets are not checked on the
// host) and len to kFlashAttnMaxSeqlen (no valid input is longer; it keeps every int bound below
// under 2^30); padded: [0, padded_len).
__device__ __forceinline__ void sequence(const int32_t* cu, int b, int64_t total, int padded_len,
                                         int64_t& start, int& len) {
  if (cu == nullptr) {
    start = 0;
    len = padded_len;
    return;
  }
  int64_t s = cu[b];
  int64_t e = cu[b + 1];
  s = s < 0 ? 0 : (s > total ? total : s);
  e = e < s ? s : (e > total ? total : e);
  start = s;
  len = static_cast<int>(e - s < kFlashAttnMaxSeqlen ? e - s : kFlashAttnMaxSeqlen);
}

// Whether query row qi (query t sits at key position t + shift) sees key `key`: both inside
// their sequences, not after the query under the causal mask, within the sliding window (> 0).
// The one mask both dK / dV kernels (this file's and the Hopper one) apply per element.
__device__ __forceinline__ bool pair_visible(int qi, int key, int q_len, int k_len, int shift,
                                             bool causal, int window) {
  const int pos = qi + shift;
  return qi < q_len && key < k_len && (!causal || key <= pos) && (window <= 0 || key > pos - window);
}

// cp.async of rows [0, kRows) x [0, kD) of a global tile (row stride `stride` elements, unit
// column stride, rows >= valid zero-filled; `fallback` is any mapped address for those) into
// shared memory with row stride kLd. Every thread of the CTA calls it.
template <int kRows, int kD, int kLd, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t stride, int valid,
                                          int tid) {
  constexpr int kChunksPerRow = kD / 8;  // 16-byte chunks
  constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int chunk = tid + i * kThreads;
    const int r = chunk / kChunksPerRow;
    const int c = (chunk % kChunksPerRow) * 8;
    const bool ok = r < valid;
    mma::cp_async_16(smem + r * kLd + c, ok ? gmem + r * stride + c : gmem, ok);
  }
}

// acc[j] += A_w x B^T for the 16 rows of sA starting at row0 (A: [16 x kD]) against the kBlockM
// rows of sB (B^T: [kBlockM x kD]); both row-major with stride kLdD. Used for S^T = K_w Q^T and
// dP^T = V_w dO^T. C fragment j covers columns (query rows of sB) [8 j, 8 j + 8):
//   acc[j][0..1] = (row0 + g, 8 j + 2 t + {0, 1}), acc[j][2..3] = (row0 + g + 8, same).
// A fragment for k-step kk (cols 16 kk ..): ldmatrix.x4 matrices (rows 0-7 | 8-15) x
//   (cols 0-7 | 8-15) in the order a[0] (r 0-7, c 0-7), a[1] (r 8-15, c 0-7), a[2] (r 0-7,
//   c 8-15), a[3] (r 8-15, c 8-15): lane l addresses row (l & 15), col 8 (l >> 4).
// B fragments: b[0] = (k 2t.., n g) = B^T[n g][k 2t..] is the non-transposed 8x8 load of
//   sB rows (n-tile) x cols (16 kk + 0..7); b[1] the cols + 8. One ldmatrix.x4 covers n-tiles
//   2 jj and 2 jj + 1: matrices (rows 16jj+0-7, c lo), (16jj+0-7, c hi), (16jj+8-15, c lo),
//   (16jj+8-15, c hi): lane l addresses row 16 jj + (l & 7) + 8 (l >> 4), col 16 kk + (l & 8).
template <class Cfg, typename T>
__device__ __forceinline__ void gemm_rows_bt(float (&acc)[Cfg::kBlockM / 8][4], const T* sA,
                                             int row0, const T* sB, int lane) {
  constexpr int kLd = Cfg::kLdD;
#pragma unroll
  for (int j = 0; j < Cfg::kBlockM / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
  }
  const T* a_row = sA + (row0 + (lane & 15)) * kLd + (lane >> 4) * 8;
  const T* b_row = sB + ((lane & 7) + ((lane >> 4) << 3)) * kLd + (lane & 8);
#pragma unroll
  for (int kk = 0; kk < Cfg::kD / 16; ++kk) {
    uint32_t a[4];
    mma::ldmatrix_x4(a, a_row + 16 * kk);
#pragma unroll
    for (int jj = 0; jj < Cfg::kBlockM / 16; ++jj) {
      uint32_t bb[4];
      mma::ldmatrix_x4(bb, b_row + 16 * jj * kLd + 16 * kk);
      const uint32_t b0[2] = {bb[0], bb[1]};
      const uint32_t b1[2] = {bb[2], bb[3]};
      mma::mma_m16n8k16<T>(acc[2 * jj], a, b0);
      mma::mma_m16n8k16<T>(acc[2 * jj + 1], a, b1);
    }
  }
}

// acc[n] += A x B with A [16 x kBlockM] given as register fragments a[kq] (k-step kq covers
// query rows 16 kq ..) and B = sB [kBlockM x kD] row-major (rows = query rows, stride kLdD).
// Used for dV_w += P^T dO and dK_w += dS^T Q. C fragment n covers columns [8 n, 8 n + 8).
// B fragment b[0] = (k 2t.., n g) = {B[2t][g], B[2t+1][g]}: the .trans load of the 8x8 block
// rows (16 kq + 0..7) x cols (8 n + 0..7) gives lane (g, t) exactly mem[2t][g], mem[2t+1][g];
// b[1] is rows + 8. One ldmatrix.x4.trans covers n-tiles 2 dp, 2 dp + 1: matrices (r 0-7,
// c lo), (r 8-15, c lo), (r 0-7, c hi), (r 8-15, c hi): lane l addresses row 16 kq + (l & 15),
// col 16 dp + 8 (l >> 4).
template <class Cfg, typename T>
__device__ __forceinline__ void gemm_frag_b(float (&acc)[Cfg::kD / 8][4],
                                            const uint32_t (&a)[Cfg::kBlockM / 16][4],
                                            const T* sB, int lane) {
  constexpr int kLd = Cfg::kLdD;
  const T* b_row = sB + (lane & 15) * kLd + (lane >> 4) * 8;
#pragma unroll
  for (int kq = 0; kq < Cfg::kBlockM / 16; ++kq) {
#pragma unroll
    for (int dp = 0; dp < Cfg::kD / 16; ++dp) {
      uint32_t bb[4];
      mma::ldmatrix_x4_trans(bb, b_row + 16 * kq * kLd + 16 * dp);
      const uint32_t b0[2] = {bb[0], bb[1]};
      const uint32_t b1[2] = {bb[2], bb[3]};
      mma::mma_m16n8k16<T>(acc[2 * dp], a[kq], b0);
      mma::mma_m16n8k16<T>(acc[2 * dp + 1], a[kq], b1);
    }
  }
}

__device__ __forceinline__ void atomic_add2(float* ptr, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(ptr), make_float2(x, y));  // one vector red (sm_90+)
#else
  atomicAdd(ptr, x);
  atomicAdd(ptr + 1, y);
#endif
}

// Four consecutive floats (16-byte aligned) added with one vector red on sm_90+ (the Hopper
// backward's dQ atomics).
__device__ __forceinline__ void atomic_add4(float* ptr, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(ptr), v);
#else
  atomicAdd(ptr, v.x);
  atomicAdd(ptr + 1, v.y);
  atomicAdd(ptr + 2, v.z);
  atomicAdd(ptr + 3, v.w);
#endif
}

template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) dkdv_kernel(const KernelParams<T> p) {
  constexpr int kD = Cfg::kD;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int kLdD = Cfg::kLdD;
  constexpr int kLdM = Cfg::kLdM;
  constexpr int kStages = Cfg::kStages;
  constexpr int kNT = kBlockM / 8;  // C n-tiles of S^T / dP^T (8 query rows each)
  constexpr int kKQ = kBlockM / 16;  // k-steps over the query rows

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw) + Cfg::kOffK;
  T* sV = reinterpret_cast<T*>(smem_raw) + Cfg::kOffV;
  T* sQ = reinterpret_cast<T*>(smem_raw) + Cfg::kOffQ;
  T* sDO = reinterpret_cast<T*>(smem_raw) + Cfg::kOffDO;
  T* sDS = reinterpret_cast<T*>(smem_raw) + Cfg::kOffDS;
  float* sLse = reinterpret_cast<float*>(smem_raw + 2 * Cfg::kElems);  // [kStages][kBlockM]
  float* sDelta = sLse + kStages * kBlockM;                           // [kStages][kBlockM]

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int g = lane >> 2;  // fragment row group
  const int t = lane & 3;   // fragment column pair

  const int num_kblocks = (p.max_seqlen_k + kBlockN - 1) / kBlockN;
  const int nb = static_cast<int>(blockIdx.x % num_kblocks);
  const int b = static_cast<int>(blockIdx.x / num_kblocks);
  const int kvh = blockIdx.y;

  int64_t q_start, k_start;
  int q_len, k_len;
  sequence(p.cu_q, b, p.total_q, p.max_seqlen_q, q_start, q_len);
  sequence(p.cu_k, b, p.total_k, p.max_seqlen_k, k_start, k_len);
  const int n0 = nb * kBlockN;
  if (n0 >= k_len) return;  // CTA-uniform; these keys belong to no sequence
  // Physical token rows of the outputs (contiguous [rows, heads, D]).
  const int64_t q_row0 = p.cu_q != nullptr ? q_start : static_cast<int64_t>(b) * p.max_seqlen_q;
  const int64_t k_row0 = p.cu_k != nullptr ? k_start : static_cast<int64_t>(b) * p.max_seqlen_k;

  // Query t sits at key position t + shift. A window >= k_len never hides a key (pos - w < 0),
  // so clamping keeps every bound below in int range without changing the mask.
  const int shift = k_len - q_len;
  const int window = p.window > 0 ? min(p.window, k_len) : 0;
  const bool causal = p.causal;
  // Query rows [lo_row, hi_row) can see a key of [n0, n_end): causal needs pos >= n0; the
  // window needs pos - w < n_end - 1 (the block's last real key).
  const int n_end = min(n0 + kBlockN, k_len);
  const int lo_row = causal ? max(n0 - shift, 0) : 0;
  const int hi_row = window > 0 ? min(q_len, n_end - 1 - shift + window) : q_len;
  const int mb_lo = lo_row / kBlockM;
  const int n_mb = hi_row > lo_row ? (hi_row + kBlockM - 1) / kBlockM - mb_lo : 0;
  const int n_iter = p.group * n_mb;  // (query head of the group, query block) pairs

  float acc_dk[kD / 8][4];
  float acc_dv[kD / 8][4];
#pragma unroll
  for (int n = 0; n < kD / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      acc_dk[n][e] = 0.0f;
      acc_dv[n][e] = 0.0f;
    }
  }

  // Tiles of iteration `it` (query head kvh * group + it / n_mb, block mb_lo + it % n_mb) into
  // stage `stage`: Q, dO (zero rows past q_len), lse_log2 and delta (zeros past q_len: those
  // rows are masked).
  auto load_iteration = [&](int it, int stage) {
    const int h = kvh * p.group + it / n_mb;
    const int m0 = (mb_lo + it % n_mb) * kBlockM;
    const int valid = q_len - m0;
    const int64_t tok = q_start + m0;
    load_tile<kBlockM, kD, kLdD, Cfg::kThreads>(
        sQ + stage * kBlockM * kLdD, p.q + b * p.q_bs + tok * p.q_ss + h * p.q_hs, p.q_ss, valid,
        tid);
    load_tile<kBlockM, kD, kLdD, Cfg::kThreads>(
        sDO + stage * kBlockM * kLdD, p.dout + b * p.do_bs + tok * p.do_ss + h * p.do_hs,
        p.do_ss, valid, tid);
    if (tid < 2 * kBlockM) {
      const int r = tid % kBlockM;
      const float* src = (tid < kBlockM ? p.lse_log2 : p.delta) + b * p.ws_bs + h * p.ws_hs + tok;
      float* dst = (tid < kBlockM ? sLse : sDelta) + stage * kBlockM + r;
      mma::cp_async_4(dst, r < valid ? src + r : src, r < valid);
    }
  };

  if (n_iter > 0) {
    load_tile<kBlockN, kD, kLdD, Cfg::kThreads>(
        sK, p.k + b * p.k_bs + (k_start + n0) * p.k_ss + kvh * p.k_hs, p.k_ss, k_len - n0, tid);
    load_tile<kBlockN, kD, kLdD, Cfg::kThreads>(
        sV, p.v + b * p.v_bs + (k_start + n0) * p.v_ss + kvh * p.v_hs, p.v_ss, k_len - n0, tid);
    load_iteration(0, 0);
    mma::cp_async_commit();
  }

  const int key_w = n0 + 16 * warp + g;  // this thread's keys: key_w (acc[.][0..1]), key_w + 8

  for (int it = 0; it < n_iter; ++it) {
    const int stage = kStages == 2 ? (it & 1) : 0;
    if constexpr (kStages == 2) {
      // Stage (it + 1) & 1 was last read in iteration it - 1, before its second barrier.
      if (it + 1 < n_iter) load_iteration(it + 1, stage ^ 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();  // everything but the group just committed has landed
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();  // tiles of `it` visible; every warp is done with iteration it - 1's dS

    const int h = kvh * p.group + it / n_mb;
    const int m0 = (mb_lo + it % n_mb) * kBlockM;
    const T* sQs = sQ + stage * kBlockM * kLdD;
    const T* sDOs = sDO + stage * kBlockM * kLdD;
    const float* sLses = sLse + stage * kBlockM;
    const float* sDeltas = sDelta + stage * kBlockM;

    // Every (query, key) pair of the tile visible: all rows and keys real, causal: the first
    // row's position reaches the last key; window: the last row's window still covers the
    // first key.
    const bool full = m0 + kBlockM <= q_len && n0 + kBlockN <= k_len &&
                      (!causal || m0 + shift >= n0 + kBlockN - 1) &&
                      (window <= 0 || m0 + kBlockM - 1 + shift - window < n0);

    // S^T = K_w Q^T, then P^T in place (C fragments: row = key, column = query).
    float acc_s[kNT][4];
    gemm_rows_bt<Cfg>(acc_s, sK, 16 * warp, sQs, lane);
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const float2 l = *reinterpret_cast<const float2*>(sLses + 8 * j + 2 * t);
      acc_s[j][0] = exp2f(fmaf(acc_s[j][0], p.scale_log2, -l.x));
      acc_s[j][1] = exp2f(fmaf(acc_s[j][1], p.scale_log2, -l.y));
      acc_s[j][2] = exp2f(fmaf(acc_s[j][2], p.scale_log2, -l.x));
      acc_s[j][3] = exp2f(fmaf(acc_s[j][3], p.scale_log2, -l.y));
    }
    if (!full) {
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key_w + (e >> 1) * 8;
          const int qi = m0 + 8 * j + 2 * t + (e & 1);
          const bool visible = pair_visible(qi, key, q_len, k_len, shift, causal, window);
          acc_s[j][e] = visible ? acc_s[j][e] : 0.0f;  // a select: inf / NaN never leak
        }
      }
    }

    // dP^T = V_w dO^T, then dS^T = P^T (dP^T - delta) in place.
    float acc_ds[kNT][4];
    gemm_rows_bt<Cfg>(acc_ds, sV, 16 * warp, sDOs, lane);
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const float2 dl = *reinterpret_cast<const float2*>(sDeltas + 8 * j + 2 * t);
      acc_ds[j][0] = acc_s[j][0] * (acc_ds[j][0] - dl.x);
      acc_ds[j][1] = acc_s[j][1] * (acc_ds[j][1] - dl.y);
      acc_ds[j][2] = acc_s[j][2] * (acc_ds[j][2] - dl.x);
      acc_ds[j][3] = acc_s[j][3] * (acc_ds[j][3] - dl.y);
    }

    // C -> A fragments (rows = keys, k = query rows): for k-step kq (queries 16 kq ..),
    //   a[0] = (key g,   q 2t..)   = C tile 2kq   [0..1]
    //   a[1] = (key g+8, q 2t..)   = C tile 2kq   [2..3]
    //   a[2] = (key g,   q 8+2t..) = C tile 2kq+1 [0..1]
    //   a[3] = (key g+8, q 8+2t..) = C tile 2kq+1 [2..3]
    // pack2 puts the lower column in the low half, as the fragment layout wants.
    uint32_t frag_p[kKQ][4];
    uint32_t frag_ds[kKQ][4];
#pragma unroll
    for (int kq = 0; kq < kKQ; ++kq) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int j = 2 * kq + half;
        frag_p[kq][2 * half] = mma::pack2<T>(acc_s[j][0], acc_s[j][1]);
        frag_p[kq][2 * half + 1] = mma::pack2<T>(acc_s[j][2], acc_s[j][3]);
        frag_ds[kq][2 * half] = mma::pack2<T>(acc_ds[j][0], acc_ds[j][1]);
        frag_ds[kq][2 * half + 1] = mma::pack2<T>(acc_ds[j][2], acc_ds[j][3]);
      }
    }

    // dS^T to shared memory, [key][query] with stride kLdM: C tile j holds keys (16 warp + g,
    // + 8) x queries (8 j + 2 t, + 1); each pair is one 32-bit word. Word address
    // (16 warp + g) * 36 + 4 j + t (+ 288): banks 4 g + 4 j + t mod 32, distinct over the warp.
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      T* row = sDS + (16 * warp + g) * kLdM + 8 * j + 2 * t;
      *reinterpret_cast<uint32_t*>(row) = frag_ds[j / 2][2 * (j % 2)];
      *reinterpret_cast<uint32_t*>(row + 8 * kLdM) = frag_ds[j / 2][2 * (j % 2) + 1];
    }

    gemm_frag_b<Cfg>(acc_dv, frag_p, sDOs, lane);  // dV_w += P^T dO
    gemm_frag_b<Cfg>(acc_dk, frag_ds, sQs, lane);  // dK_w += dS^T Q

    __syncthreads();  // dS^T complete; (kStages == 1) every warp is done with Q / dO / lse / delta
    if constexpr (kStages == 1) {
      if (it + 1 < n_iter) load_iteration(it + 1, 0);  // overlaps the dQ phase
      mma::cp_async_commit();
    }

    // dQ_blk = dS K [kBlockM x kD]: warp (wm, wd) = (warp % 4, warp / 4) computes query rows
    // [16 wm, 16 wm + 16) x columns [wd kDqCols, (wd + 1) kDqCols), k = the kBlockN keys.
    // A = dS [query][key] read from dS^T [key][query] with .trans: a[0] = (q g, key 2t..) =
    // {mem[2t][g], mem[2t+1][g]} of the block keys (16 kk + 0..7) x queries (16 wm + 0..7);
    // a[1]: queries + 8; a[2]: keys + 8; a[3]: both. Lane l addresses key row
    // 16 kk + (l & 7) + 8 (l >> 4), query column 16 wm + (l & 8).
    // B = K [key][d] with .trans as in gemm_frag_b (rows = keys).
    {
      const int wm = warp % Cfg::kWarpsM;
      const int wd = warp / Cfg::kWarpsM;
      const T* a_row = sDS + ((lane & 7) + ((lane >> 4) << 3)) * kLdM + 16 * wm + (lane & 8);
      const T* b_row = sK + (lane & 15) * kLdD + (lane >> 4) * 8;
      const int q_lo = m0 + 16 * wm + g;  // rows of acc[.][0..1]; acc[.][2..3] are q_lo + 8
#pragma unroll
      for (int chunk = 0; chunk < Cfg::kDqChunks; ++chunk) {
        const int d0 = wd * Cfg::kDqCols + chunk * Cfg::kDqChunk;
        float acc_dq[Cfg::kDqChunk / 8][4];
#pragma unroll
        for (int n = 0; n < Cfg::kDqChunk / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_dq[n][e] = 0.0f;
        }
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          uint32_t a[4];
          mma::ldmatrix_x4_trans(a, a_row + 16 * kk * kLdM);
#pragma unroll
          for (int dp = 0; dp < Cfg::kDqChunk / 16; ++dp) {
            uint32_t bb[4];
            mma::ldmatrix_x4_trans(bb, b_row + 16 * kk * kLdD + d0 + 16 * dp);
            const uint32_t b0[2] = {bb[0], bb[1]};
            const uint32_t b1[2] = {bb[2], bb[3]};
            mma::mma_m16n8k16<T>(acc_dq[2 * dp], a, b0);
            mma::mma_m16n8k16<T>(acc_dq[2 * dp + 1], a, b1);
          }
        }
        // Rows past q_len (dS = 0 there) would land in another sequence's or no row: skipped.
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int qi = q_lo + 8 * half;
          if (qi < q_len) {
            float* dst = p.dq_accum + ((q_row0 + qi) * p.heads_q + h) * kD + d0 + 2 * t;
#pragma unroll
            for (int n = 0; n < Cfg::kDqChunk / 8; ++n) {
              atomic_add2(dst + 8 * n, acc_dq[n][2 * half], acc_dq[n][2 * half + 1]);
            }
          }
        }
      }
    }
  }

  // Epilogue: dK = scale * acc_dk, dV = acc_dv, rows key_w and key_w + 8, columns 8 n + 2 t.
  // Keys past k_len are not written (they belong to the next sequence or to no row).
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int key = key_w + 8 * half;
    if (key < k_len) {
      const int64_t off = ((k_row0 + key) * p.heads_kv + kvh) * kD + 2 * t;
#pragma unroll
      for (int n = 0; n < kD / 8; ++n) {
        *reinterpret_cast<uint32_t*>(p.dk + off + 8 * n) =
            mma::pack2<T>(acc_dk[n][2 * half] * p.scale, acc_dk[n][2 * half + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(p.dv + off + 8 * n) =
            mma::pack2<T>(acc_dv[n][2 * half], acc_dv[n][2 * half + 1]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

template <typename T, class Cfg>
cudaError_t launch_dkdv(const KernelParams<T>& p, cudaStream_t stream) {
  const int num_kblocks = (p.max_seqlen_k + Cfg::kBlockN - 1) / Cfg::kBlockN;
  const int64_t blocks_x = static_cast<int64_t>(num_kblocks) * p.batch;
  if (blocks_x == 0 || p.heads_kv == 0) return cudaSuccess;
  if (blocks_x > INT32_MAX || p.heads_kv > 65535) return cudaErrorInvalidValue;
  auto kernel = dkdv_kernel<T, Cfg>;
  static std::atomic<uint64_t> smem_configured{0};
  TF_CUDA_TRY(set_max_dynamic_smem_once(kernel, Cfg::kSmemBytes, smem_configured));
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(p.heads_kv));
  TF_LAUNCH_KERNEL(grid, Cfg::kThreads, Cfg::kSmemBytes, stream, kernel)(p);
  return cudaGetLastError();
}

// The largest configuration whose shared memory fits the device: 8 warps (128 keys) and two
// stages (H100: 227 KB, A100: 163 KB per block), else 4 warps (64 keys) and one stage. On the
// ~100 KB parts (sm_86 / sm_89 / sm_120) that is the small one at D = 96 / 128; D = 64's big
// configuration (93,184 bytes) still fits there.
template <typename T, int kD>
cudaError_t launch_dkdv_for_device(const KernelParams<T>& p, cudaStream_t stream) {
  using Big = Config<kD, 8, 2>;
  using Small = Config<kD, 4, 1>;
  int device = 0;
  int max_smem = 0;
  TF_CUDA_TRY(cudaGetDevice(&device));
  TF_CUDA_TRY(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (Big::kSmemBytes <= max_smem) return launch_dkdv<T, Big>(p, stream);
  if (Small::kSmemBytes <= max_smem) return launch_dkdv<T, Small>(p, stream);
  return cudaErrorInvalidConfiguration;
}

// Kernel 1 (delta, lse_log2, zeroed dQ accumulators); shared with the Hopper backward
// (flash_attention_bwd_sm90.cuh), which replaces only kernel 2.
template <typename T>
cudaError_t launch_preprocess(const KernelParams<T>& p, int head_dim, cudaStream_t stream) {
  const int64_t pairs = p.rows_q * p.heads_q;
  if (pairs == 0) return cudaSuccess;
  const int64_t blocks = (pairs + kPreWarps - 1) / kPreWarps;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  TF_LAUNCH_KERNEL(static_cast<unsigned>(blocks), kPreWarps * kWarpSize, 0, stream,
                   preprocess_kernel<T>)(p, head_dim);
  return cudaGetLastError();
}

// Kernel 3 (dq = dq_accum * scale); shared with the Hopper backward.
template <typename T>
cudaError_t launch_convert(const KernelParams<T>& p, int head_dim, cudaStream_t stream) {
  const int64_t n4 = p.rows_q * p.heads_q * head_dim / 4;
  if (n4 == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((n4 + 255) / 256, int64_t{1} << 20);
  TF_LAUNCH_KERNEL(static_cast<unsigned>(blocks), 256, 0, stream, convert_kernel<T>)(
      p.dq_accum, p.dq, n4, p.scale);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward(const KernelParams<T>& p, int head_dim, cudaStream_t stream) {
  TF_CUDA_TRY(launch_preprocess(p, head_dim, stream));
  cudaError_t err = cudaErrorInvalidValue;
  switch (head_dim) {
    case 64:
      err = launch_dkdv_for_device<T, 64>(p, stream);
      break;
    case 96:
      err = launch_dkdv_for_device<T, 96>(p, stream);
      break;
    case 128:
      err = launch_dkdv_for_device<T, 128>(p, stream);
      break;
    default:
      break;
  }
  TF_CUDA_TRY(err);
  return launch_convert(p, head_dim, stream);
}

// The problem limits of the backward kernels (head_dim aside, which is per kernel): sizes in
// range, heads_q = group * heads_kv, cu_seqlens for both or neither, 16-byte aligned rows.
// dout is read like q, with 16-byte copies: its base and strides must be 16-byte multiples too
// (2-byte elements), or a copy would fault (a sticky error) instead of being refused.
inline bool dout_rows_16B_aligned(const FlashAttnBwdArgs& a) {
  const auto ok = [](int64_t stride) { return (stride * 2) % 16 == 0; };
  return reinterpret_cast<uintptr_t>(a.dout) % 16 == 0 && ok(a.do_batch_stride) &&
         ok(a.do_seq_stride) && ok(a.do_head_stride);
}

inline bool problem_in_range(const FlashAttnParams& p, const FlashAttnBwdArgs& a) {
  if (p.batch < 0 || p.heads_q < 0 || p.heads_kv < 0 || p.max_seqlen_q < 0 ||
      p.max_seqlen_k < 0 || p.total_q < 0 || p.total_k < 0) {
    return false;
  }
  if (p.max_seqlen_q > kFlashAttnMaxSeqlen || p.max_seqlen_k > kFlashAttnMaxSeqlen) return false;
  if (p.heads_kv > kFlashAttnMaxGridDim) return false;
  if (p.heads_kv > 0 && (p.group < 1 || p.heads_q != p.group * p.heads_kv)) return false;
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr)) return false;
  if (!p.rows_16B_aligned(2) || !dout_rows_16B_aligned(a)) return false;  // 2-byte dtypes
  return p.total_q <= kFlashAttnMaxSeqlen * int64_t{1024} &&
         p.total_k <= kFlashAttnMaxSeqlen * int64_t{1024};
}

// The kernels' view of a problem (bindings: flash_attention_bwd.cpp): the storage type resolved,
// packed layouts with zero batch strides, the workspaces laid out like a contiguous lse.
template <typename T>
KernelParams<T> make_kernel_params(const FlashAttnParams& p, const FlashAttnBwdArgs& a) {
  KernelParams<T> k{};
  const bool packed = p.is_varlen();
  k.q = static_cast<const T*>(p.q);
  k.k = static_cast<const T*>(p.k);
  k.v = static_cast<const T*>(p.v);
  k.out = static_cast<const T*>(p.out);
  k.dout = static_cast<const T*>(a.dout);
  // Packed layouts have no batch dim: batch strides are 0 (the sequence offset moves instead).
  k.q_bs = packed ? 0 : p.q_batch_stride;
  k.q_ss = p.q_seq_stride;
  k.q_hs = p.q_head_stride;
  k.k_bs = packed ? 0 : p.k_batch_stride;
  k.k_ss = p.k_seq_stride;
  k.k_hs = p.k_head_stride;
  k.v_bs = packed ? 0 : p.v_batch_stride;
  k.v_ss = p.v_seq_stride;
  k.v_hs = p.v_head_stride;
  k.o_bs = packed ? 0 : p.o_batch_stride;
  k.o_ss = p.o_seq_stride;
  k.o_hs = p.o_head_stride;
  k.do_bs = packed ? 0 : a.do_batch_stride;
  k.do_ss = a.do_seq_stride;
  k.do_hs = a.do_head_stride;
  k.lse = p.lse;
  k.lse_bs = packed ? 0 : p.lse_batch_stride;
  k.lse_hs = p.lse_head_stride;
  k.dlse = a.dlse;
  k.dlse_bs = packed ? 0 : a.dlse_batch_stride;
  k.dlse_hs = a.dlse_head_stride;
  k.lse_log2 = a.lse_log2;
  k.delta = a.delta;
  // Workspaces: contiguous [B, Hq, Sq] or [Hq, total_q].
  k.ws_bs = packed ? 0 : static_cast<int64_t>(p.heads_q) * p.max_seqlen_q;
  k.ws_hs = packed ? p.total_q : p.max_seqlen_q;
  k.dq_accum = a.dq_accum;
  k.dq = static_cast<T*>(a.dq);
  k.dk = static_cast<T*>(a.dk);
  k.dv = static_cast<T*>(a.dv);
  k.cu_q = p.cu_seqlens_q;
  k.cu_k = p.cu_seqlens_k;
  k.total_q = p.total_q;
  k.total_k = p.total_k;
  k.rows_q = packed ? p.total_q : static_cast<int64_t>(p.batch) * p.max_seqlen_q;
  k.batch = p.batch;
  k.heads_q = p.heads_q;
  k.heads_kv = p.heads_kv;
  k.group = p.group;
  k.max_seqlen_q = p.max_seqlen_q;
  k.max_seqlen_k = p.max_seqlen_k;
  k.window = p.window > 0 ? p.window : 0;
  k.pairs_per_chunk = p.batch * p.heads_kv;  // one chunk: key block slowest over every pair
  k.causal = p.causal;
  k.scale = p.softmax_scale;
  k.scale_log2 = p.softmax_scale * kLog2e;
  return k;
}

}  // namespace flash_bwd
}  // namespace thinkfuse
