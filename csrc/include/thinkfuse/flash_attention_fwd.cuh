// Flash attention forward (FlashAttention-2 schedule) on tensor cores: mma.sync m16n8k16 with
// float32 accumulators, for float16 / bfloat16 on sm80 and later (Hopper runs it unchanged).
// Semantics are those of kernels/attention.py (see flash_attention_params.cuh): GQA, bottom-right
// aligned causal mask, sliding window, packed sequences, rows without keys -> out 0, lse -inf.
//
// Work decomposition
//   One CTA of kWarps = 4 warps per (query tile of kBlockM rows, query head, sequence); the
//   query tiles run in reverse order (blockIdx.x = 0 takes the last tile, the longest one under
//   a causal mask, so that the heaviest CTAs start first). Warp w owns the kWarpRows =
//   16 * kMTiles query rows [w * kWarpRows, (w + 1) * kWarpRows) of the tile: kMTiles MMA row
//   tiles of 16 rows. kMTiles = 2 (32 rows per warp, as FlashAttention-2) halves the shared
//   memory traffic per FLOP: every K / V fragment a warp loads feeds two MMAs.
//     D <= 128: kBlockM = 128, kBlockN = 64, kMTiles = 2
//     D == 256: kBlockM =  64, kBlockN = 32, kMTiles = 1 (the O accumulator alone is 128 floats)
//   Every warp then walks the same key blocks of kBlockN keys (one pipeline stage, one barrier
//   each), in softmax steps of kStepN keys (kStepN = kBlockN, except D = 128: two steps of 32,
//   see Config::kStepN):
//     S = Q K^T (fp32) -> mask (boundary blocks only) -> online softmax in the exp2 domain ->
//     P (rounded to T in registers, the A fragment of the next MMA) -> O += P V.
//   Q fragments are re-read from shared memory (ldmatrix) every step: holding them in registers
//   does not fit next to O and S at D = 128.
//   After the last block O / l is staged through the warp's own rows of the Q tile in shared
//   memory and written with 16-byte stores; lanes 4g write the lse of their rows.
//
// Shared memory (dynamic): Q [kBlockM][D] once, then K and V [kBlockN][D] twice each (double
//   buffer). Each row is D / 8 chunks of 16 bytes. Layout of (row r, chunk c):
//     D % 64 == 0: no padding, XOR swizzle: chunk c sits at c ^ (r % 8). Rows are a multiple of
//       128 bytes, so the 8 rows an ldmatrix phase reads (consecutive, 8-aligned: r % 8 takes
//       every value once) land in 8 distinct 16-byte bank groups.
//     otherwise (D = 16, 32, 96): rows padded by one chunk (stride D + 8 elements = an odd
//       number 2k+1 of chunks): row r starts at chunk (2k+1) r mod 8 of the 128-byte bank
//       window, distinct for 8 consecutive rows; conflict-free as well.
//   D = 128: 32 KiB (Q) + 64 KiB (K, V) = 96 KiB -> 2 CTAs (8 warps) per H100 SM; it also fits
//   the 99 KiB limit of sm86 / sm89.
//
// Pipeline (cp.async, one commit group per key block):
//   prologue: Q tile + K/V block 0 -> buffer 0.
//   iteration i: wait for every outstanding copy (block i), __syncthreads (block i visible to all
//   warps; all warps done with block i - 1, whose buffer is (i + 1) % 2), issue block i + 1 into
//   buffer (i + 1) % 2, compute block i. Loads of block i + 1 overlap the whole of block i's math.
//   Out-of-range rows / keys are zero-filled by cp.async (src-size 0): no stale shared memory
//   (zero V rows keep 0 * garbage = NaN out of O), and masked keys get -inf scores.
//
// Block skipping and masking (as kernels/attention.py): with shift = k_len - q_len a query row t
//   sits at key position t + shift. The key blocks [lo, hi) a tile can see are visited; those
//   that every row of the tile sees entirely (inside k_len, below the causal diagonal of the
//   tile's first row, above the window edge of its last row) take the unmasked path, the others
//   (diagonal / window edge / k_len tail) build the mask per element.
//
// Online softmax: running max m (raw scores, quad-uniform), p = exp2(s * scale_log2 - m *
//   scale_log2) with one FMA; m = -inf (nothing seen yet) uses 0 as the shift so that no
//   (-inf) - (-inf) NaN appears. The row sum l is accumulated per thread (over the columns it
//   holds) and summed over the quad only at the end (every rescale factor is quad-uniform).
//   lse = (m * scale_log2 + log2 l) * ln 2; l == 0 (no visible key) gives out 0, lse -inf.
#pragma once

#include <cstdint>

#include "thinkfuse/common.cuh"
#include "thinkfuse/flash_attention_params.cuh"
#include "thinkfuse/mma_sm80.cuh"

namespace thinkfuse {

namespace flash_fwd {

// Longest sequence the kernels take (keeps every int32 index expression, such as
// row + shift - window, far from overflow).
constexpr int kMaxSeqlen = 1 << 28;

// Tile configuration for head dim D (a multiple of 16, 16..256).
template <int D>
struct Config {
  static_assert(D % 16 == 0 && D >= 16 && D <= 256, "head dim must be a multiple of 16 in [16, 256]");
  static constexpr int kHeadDim = D;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kMTiles = D <= 128 ? 2 : 1;  // 16-row MMA tiles per warp
  static constexpr int kWarpRows = 16 * kMTiles;
  static constexpr int kBlockM = kWarps * kWarpRows;
  static constexpr int kBlockN = D <= 128 ? 64 : 32;  // keys per pipeline stage (one barrier)
  // keys per softmax step: S is [kWarpRows][kStepN] per warp. D = 128 computes a 64-key block in
  // two steps of 32: acc (128 floats) + S (64 floats) of a 64-wide step exceed the register file
  // (ptxas spills), 32-wide steps do not.
  static constexpr int kStepN = D == 128 ? 32 : kBlockN;
  static constexpr int kNTiles = kStepN / 8;    // n8 tiles of S per row tile
  static constexpr int kDTiles = D / 8;         // n8 tiles of O per row tile
  static constexpr int kQKSteps = D / 16;       // k16 steps of S = Q K^T
  static constexpr int kPVSteps = kStepN / 16;  // k16 steps of O += P V
  static constexpr int kChunks = D / 8;         // 16-byte chunks per row
  static constexpr bool kSwizzle = D % 64 == 0;
  static constexpr int kRowStride = kSwizzle ? D : D + 8;  // elements between smem rows
  static constexpr int kQElems = kBlockM * kRowStride;
  static constexpr int kKVElems = kBlockN * kRowStride;
  static constexpr int kMinBlocksPerSM = 2;  // register budget: 65536 / (2 * 128) = 256
  static_assert(kNTiles % 2 == 0 && kDTiles % 2 == 0, "fragments are loaded two n8 tiles at a time");
  static_assert(kBlockN % kStepN == 0 && kStepN % 16 == 0, "whole k16 steps per softmax step");

  // Element offset of (row r, 16-byte chunk c) in a tile, plus `e` elements inside the chunk.
  static __device__ __forceinline__ int offset(int r, int c, int e = 0) {
    return r * kRowStride + 8 * (kSwizzle ? (c ^ (r & 7)) : c) + e;
  }

  template <typename T>
  static constexpr int smem_bytes() {
    return (kQElems + 4 * kKVElems) * static_cast<int>(sizeof(T));
  }
};

// Sequence b's token range, clamped into the tensors (bad device cu_seqlens never reach memory
// outside them) and its length into [0, kMaxSeqlen].
__device__ __forceinline__ void sequence_bounds(const int32_t* cu, int b, int64_t total,
                                                int padded_len, int64_t& start, int& len) {
  if (cu == nullptr) {
    start = 0;
    len = padded_len;
    return;
  }
  const int64_t s = min(max(static_cast<int64_t>(cu[b]), int64_t{0}), total);
  const int64_t e = min(max(static_cast<int64_t>(cu[b + 1]), s), total);
  start = s;
  len = static_cast<int>(min(e - s, static_cast<int64_t>(kMaxSeqlen)));
}

// The key blocks (of block_n keys) that the query rows [m_start, m_start + block_m) of a sequence
// with k_len keys and shift = k_len - q_len can see (bottom-right causal mask, sliding window):
// blocks n_first .. n_first + n_blocks - 1 (none when n_blocks == 0), and the key range
// [full_lo, full_hi) that every row of the tile sees entirely (blocks inside it need no mask; the
// others, diagonal / window edge / k_len tail, build the mask per element). Shared by the sm80
// kernel here and the sm90 one (flash_attention_fwd_sm90.cuh).
struct KeyBlocks {
  int n_first;
  int n_blocks;
  int full_lo;
  int full_hi;
};

__device__ __forceinline__ KeyBlocks key_blocks(int m_start, int block_m, int block_n, int k_len,
                                                int shift, bool causal, int window) {
  int hi = k_len;
  if (causal) hi = min(hi, m_start + block_m + shift);  // last row: keys <= its position
  int lo = 0;
  if (window > 0) lo = max(m_start + shift - window + 1, 0) / block_n * block_n;  // first row
  int full_hi = k_len / block_n * block_n;
  if (causal) full_hi = min(full_hi, max(m_start + shift + 1, 0) / block_n * block_n);
  int full_lo = lo;
  if (window > 0) {
    const int last_lo = max(m_start + block_m - 1 + shift - window + 1, 0);  // last row's first key
    full_lo = max(full_lo, (last_lo + block_n - 1) / block_n * block_n);
  }
  KeyBlocks r;
  r.full_lo = min(max(full_lo, lo), hi);
  r.full_hi = max(min(full_hi, hi), r.full_lo);
  r.n_first = lo / block_n;
  r.n_blocks = hi > lo ? (hi + block_n - 1) / block_n - r.n_first : 0;
  return r;
}

// cp.async a [kRows][D] tile whose row r is `base + (first + r) * row_stride` (rows at or past
// `valid_rows` zero-filled) into shared memory at `smem` (layout Cfg::offset). Thread tid copies
// chunk c = tid % kChunks of rows r0 + i * kRowsPerPass, r0 = tid / kChunks (threads past
// kRowsPerPass * kChunks idle: D = 96). The source pointer advances by one pass stride per
// pass, so no per-row 64-bit product stays live across the main loop.
template <typename Cfg, int kRows, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* base, int64_t row_stride, int first,
                                          int valid_rows, int tid) {
  constexpr int kRowsPerPass = Cfg::kThreads / Cfg::kChunks;
  constexpr int kPasses = (kRows + kRowsPerPass - 1) / kRowsPerPass;
  const int r0 = tid / Cfg::kChunks;
  const int c = tid % Cfg::kChunks;
  if (Cfg::kThreads % Cfg::kChunks != 0 && r0 >= kRowsPerPass) return;
  const int rows_left = valid_rows - first - r0;  // pass i's row is valid iff i * kRowsPerPass < rows_left
  const T* src = base + static_cast<int64_t>(first + r0) * row_stride + c * 8;
  const int64_t pass_stride = kRowsPerPass * row_stride;
  const int smem0 = Cfg::offset(r0, c);
#pragma unroll
  for (int i = 0; i < kPasses; ++i) {
    const int r = r0 + i * kRowsPerPass;
    if (kRows % kRowsPerPass == 0 || r < kRows) {
      const bool valid = i * kRowsPerPass < rows_left;
      // rows 8 apart share their swizzle (r % 8), so the offset moves by whole rows
      const int dst = (!Cfg::kSwizzle || kRowsPerPass % 8 == 0)
                          ? smem0 + i * kRowsPerPass * Cfg::kRowStride
                          : Cfg::offset(r, c);
      mma::cp_async_16(smem + dst, valid ? src : base, valid);
    }
    src += pass_stride;
  }
}

// Per-CTA constants of the masked path.
struct MaskInfo {
  int row0;    // sequence row of this thread's (mi = 0, half 0) row: m_start + warp rows + g
  int shift;   // k_len - q_len
  int k_len;
  int window;  // > 0: sliding window
  bool causal;
};

// One key block: S = Q K^T, optional mask, online softmax update, O += P V.
//   sQ: the CTA's Q tile; sK / sV: this block's buffers; key0: sequence index of key 0 of the
//   block. acc / m_run / l_run: this thread's O accumulators and row statistics, indexed
//   [mi][half] with half 0 = row g, half 1 = row g + 8 of row tile mi.
template <typename Cfg, bool kMask, typename T>
__device__ __forceinline__ void attend_block(const T* sQ, const T* sK, const T* sV, int key0,
                                             const MaskInfo& mask, float scale_log2, int warp,
                                             int lane, float (&acc)[Cfg::kMTiles][Cfg::kDTiles][4],
                                             float (&m_run)[Cfg::kMTiles][2],
                                             float (&l_run)[Cfg::kMTiles][2]) {
  constexpr int kMTiles = Cfg::kMTiles;
  constexpr int kNTiles = Cfg::kNTiles;

  // ---- S = Q K^T: [kMTiles * 16 rows] x [kBlockN keys] per warp -------------------------------
  float s[kMTiles][kNTiles][4];
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int nj = 0; nj < kNTiles; ++nj) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[mi][nj][e] = 0.0f;
    }
  }
#pragma unroll
  for (int kk = 0; kk < Cfg::kQKSteps; ++kk) {
    // A = Q[rows 16mi..16mi+15 of the warp][dims 16kk..16kk+15], ldmatrix.x4: lanes 8i..8i+7
    // address matrix i = (rows +8 (i % 2), dims +8 (i / 2)) -> a[0..3] = (rows 0-7, k 0-7),
    // (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = the m16n8k16 A layout.
    // Lane l: row l % 16, chunk 2kk + l / 16.
    uint32_t qa[kMTiles][4];
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) {
      const int r = warp * Cfg::kWarpRows + mi * 16 + (lane & 15);
      mma::ldmatrix_x4(qa[mi], sQ + Cfg::offset(r, 2 * kk + (lane >> 4)));
    }
#pragma unroll
    for (int nj = 0; nj < kNTiles; nj += 2) {
      // B = K^T[dims 16kk..+15][keys 8nj..8nj+15] from K stored [key][dim] (= B^T row-major, the
      // "col" operand): non-transposed 8x8 matrices give b = (k 2t..2t+1, n g). Matrix i: keys
      // 8nj + 8 (i / 2) + 0..7, dims 16kk + 8 (i % 2) -> r[0], r[1] = b[0], b[1] of n-tile nj,
      // r[2], r[3] = b[0], b[1] of n-tile nj + 1. Lane l: key 8nj + l % 8 + 8 (l / 16),
      // chunk 2kk + (l / 8) % 2.
      uint32_t kb[4];
      const int r = nj * 8 + (lane & 7) + ((lane >> 4) << 3);
      mma::ldmatrix_x4(kb, sK + Cfg::offset(r, 2 * kk + ((lane >> 3) & 1)));
      const uint32_t b0[2] = {kb[0], kb[1]};
      const uint32_t b1[2] = {kb[2], kb[3]};
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
        mma::mma_m16n8k16<T>(s[mi][nj], qa[mi], b0);
        mma::mma_m16n8k16<T>(s[mi][nj + 1], qa[mi], b1);
      }
    }
  }

  // ---- mask: s[mi][nj][2 h + e] is (row g + 8h of tile mi, key 8nj + 2t + e) -------------------
  if constexpr (kMask) {
    const int t = lane & 3;  // MMA fragment "quad": columns 2t, 2t + 1 of a C tile
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int pos = mask.row0 + mi * 16 + 8 * h + mask.shift;  // the row's key position
        // visible keys: [col_lo, col_hi)
        const int col_hi = mask.causal ? min(pos + 1, mask.k_len) : mask.k_len;
        const int col_lo = mask.window > 0 ? pos - mask.window + 1 : 0;
#pragma unroll
        for (int nj = 0; nj < kNTiles; ++nj) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = key0 + nj * 8 + 2 * t + e;
            if (col < col_lo || col >= col_hi) s[mi][nj][2 * h + e] = -INFINITY;
          }
        }
      }
    }
  }

  // ---- online softmax (exp2 domain) -----------------------------------------------------------
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = m_run[mi][h];
#pragma unroll
      for (int nj = 0; nj < kNTiles; ++nj) {
        mx = fmaxf(mx, fmaxf(s[mi][nj][2 * h], s[mi][nj][2 * h + 1]));
      }
      // the 4 lanes of a quad (lanes 4g..4g+3) hold the row's columns
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float shift = mx == -INFINITY ? 0.0f : mx * scale_log2;
      const float alpha = exp2f(m_run[mi][h] * scale_log2 - shift);  // 0 when m_run = -inf
      m_run[mi][h] = mx;
      float row_sum = 0.0f;
#pragma unroll
      for (int nj = 0; nj < kNTiles; ++nj) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p = exp2f(fmaf(s[mi][nj][2 * h + e], scale_log2, -shift));  // -inf -> 0
          s[mi][nj][2 * h + e] = p;
          row_sum += p;
        }
      }
      l_run[mi][h] = l_run[mi][h] * alpha + row_sum;
#pragma unroll
      for (int dj = 0; dj < Cfg::kDTiles; ++dj) {
        acc[mi][dj][2 * h] *= alpha;
        acc[mi][dj][2 * h + 1] *= alpha;
      }
    }
  }

  // ---- O += P V ---------------------------------------------------------------------------------
#pragma unroll
  for (int kk = 0; kk < Cfg::kPVSteps; ++kk) {
    // A = P[rows][keys 16kk..16kk+15]: the C tiles 2kk (keys +0..7) and 2kk + 1 (keys +8..15)
    // hold (row g, keys 2t, 2t+1) in c[0..1] and (row g+8, ...) in c[2..3], so
    // a[0] = (g, 2t..) = C(2kk)[0..1], a[1] = (g+8, 2t..) = C(2kk)[2..3],
    // a[2] = (g, 8+2t..) = C(2kk+1)[0..1], a[3] = (g+8, 8+2t..) = C(2kk+1)[2..3]
    // (pack2 puts the lower column in the low half, as the fragment wants).
    uint32_t pa[kMTiles][4];
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) {
      pa[mi][0] = mma::pack2<T>(s[mi][2 * kk][0], s[mi][2 * kk][1]);
      pa[mi][1] = mma::pack2<T>(s[mi][2 * kk][2], s[mi][2 * kk][3]);
      pa[mi][2] = mma::pack2<T>(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
      pa[mi][3] = mma::pack2<T>(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dj = 0; dj < Cfg::kDTiles; dj += 2) {
      // B = V[keys 16kk..+15][dims 8dj..8dj+15] stored [key][dim]; the operand wants
      // b = (k = keys 2t..2t+1, n = dim g): the transposed 8x8 matrix (ldmatrix .trans).
      // Matrix i: keys 16kk + 8 (i % 2) + 0..7, dims 8dj + 8 (i / 2) -> r[0], r[1] = b[0], b[1]
      // of n-tile dj, r[2], r[3] = b[0], b[1] of n-tile dj + 1. Lane l: key 16kk + l % 16,
      // chunk dj + l / 16.
      uint32_t vb[4];
      mma::ldmatrix_x4_trans(vb, sV + Cfg::offset(kk * 16 + (lane & 15), dj + (lane >> 4)));
      const uint32_t b0[2] = {vb[0], vb[1]};
      const uint32_t b1[2] = {vb[2], vb[3]};
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
        mma::mma_m16n8k16<T>(acc[mi][dj], pa[mi], b0);
        mma::mma_m16n8k16<T>(acc[mi][dj + 1], pa[mi], b1);
      }
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(Config<D>::kThreads, Config<D>::kMinBlocksPerSM)
    forward_kernel(const FlashAttnParams p) {
  using Cfg = Config<D>;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int kMTiles = Cfg::kMTiles;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + Cfg::kQElems;        // buffer j at sK + j * kKVElems
  T* sV = sK + 2 * Cfg::kKVElems;   // buffer j at sV + j * kKVElems

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int m_block = static_cast<int>(gridDim.x - 1 - blockIdx.x);  // longest tiles first
  const int h = static_cast<int>(blockIdx.y);
  const int b = static_cast<int>(blockIdx.z);
  const int kvh = h / p.group;

  int64_t q_start, k_start;
  int q_len, k_len;
  sequence_bounds(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q, q_start, q_len);
  sequence_bounds(p.cu_seqlens_k, b, p.total_k, p.max_seqlen_k, k_start, k_len);
  const int m_start = m_block * kBlockM;
  if (m_start >= q_len) return;
  const int shift = k_len - q_len;
  const int window = p.window;

  // Key blocks this tile visits, and [a, c): the keys every row of it sees entirely.
  const KeyBlocks kb = key_blocks(m_start, kBlockM, kBlockN, k_len, shift, p.causal, window);
  const int a = kb.full_lo;
  const int c = kb.full_hi;
  const int n_first = kb.n_first;
  const int n_blocks = kb.n_blocks;

  const T* q_base = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                    q_start * p.q_seq_stride;
  const T* k_base = static_cast<const T*>(p.k) + b * p.k_batch_stride + kvh * p.k_head_stride +
                    k_start * p.k_seq_stride;
  const T* v_base = static_cast<const T*>(p.v) + b * p.v_batch_stride + kvh * p.v_head_stride +
                    k_start * p.v_seq_stride;

  float acc[kMTiles][Cfg::kDTiles][4];
  float m_run[kMTiles][2];
  float l_run[kMTiles][2];
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int dj = 0; dj < Cfg::kDTiles; ++dj) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][dj][e] = 0.0f;
    }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      m_run[mi][hh] = -INFINITY;
      l_run[mi][hh] = 0.0f;
    }
  }

  if (n_blocks > 0) {
    MaskInfo mask;
    mask.row0 = m_start + warp * Cfg::kWarpRows + g;
    mask.shift = shift;
    mask.k_len = k_len;
    mask.window = window;
    mask.causal = p.causal;

    load_tile<Cfg, kBlockM>(sQ, q_base, p.q_seq_stride, m_start, q_len, tid);
    load_tile<Cfg, kBlockN>(sK, k_base, p.k_seq_stride, n_first * kBlockN, k_len, tid);
    load_tile<Cfg, kBlockN>(sV, v_base, p.v_seq_stride, n_first * kBlockN, k_len, tid);
    mma::cp_async_commit();

    for (int it = 0; it < n_blocks; ++it) {
      const int buf = it & 1;
      const int key0 = (n_first + it) * kBlockN;
      mma::cp_async_wait<0>();  // this thread's copies of block `it` (and Q) have landed
      __syncthreads();          // ... everyone's have; and nobody still reads buffer buf ^ 1
      if (it + 1 < n_blocks) {
        load_tile<Cfg, kBlockN>(sK + (buf ^ 1) * Cfg::kKVElems, k_base, p.k_seq_stride,
                                key0 + kBlockN, k_len, tid);
        load_tile<Cfg, kBlockN>(sV + (buf ^ 1) * Cfg::kKVElems, v_base, p.v_seq_stride,
                                key0 + kBlockN, k_len, tid);
      }
      mma::cp_async_commit();
      const T* k_tile = sK + buf * Cfg::kKVElems;
      const T* v_tile = sV + buf * Cfg::kKVElems;
      const bool full = key0 >= a && key0 + kBlockN <= c;  // every row sees every key
      // not unrolled: unrolling lets ptxas overlap the two steps, which spills at D = 128
#pragma unroll 1
      for (int step = 0; step < kBlockN / Cfg::kStepN; ++step) {
        // rows kStepN apart (a multiple of 8) share their swizzle: whole-row offsets
        const int off = step * Cfg::kStepN * Cfg::kRowStride;
        const int step_key0 = key0 + step * Cfg::kStepN;
        if (full) {
          attend_block<Cfg, false>(sQ, k_tile + off, v_tile + off, step_key0, mask, p.scale_log2,
                                   warp, lane, acc, m_run, l_run);
        } else {
          attend_block<Cfg, true>(sQ, k_tile + off, v_tile + off, step_key0, mask, p.scale_log2,
                                  warp, lane, acc, m_run, l_run);
        }
      }
    }
    mma::cp_async_wait<0>();  // only empty groups remain; nothing may be in flight at exit
  }

  // ---- epilogue: O / l through the warp's own Q rows (only this warp ever read them) ---------
  __syncwarp();
  float* lse_base = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + q_start;
  constexpr float kLn2 = 0.6931471805599453f;
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float l = l_run[mi][hh];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.0f ? __frcp_rn(l) : 0.0f;  // l == 0: no visible key -> out 0
      const int r = warp * Cfg::kWarpRows + mi * 16 + g + 8 * hh;  // row inside the tile
#pragma unroll
      for (int dj = 0; dj < Cfg::kDTiles; ++dj) {
        // C tile dj: (row, dims 8dj + 2t, 8dj + 2t + 1) = chunk dj, elements 2t, 2t + 1
        *reinterpret_cast<uint32_t*>(sQ + Cfg::offset(r, dj, 2 * t)) =
            mma::pack2<T>(acc[mi][dj][2 * hh] * inv, acc[mi][dj][2 * hh + 1] * inv);
      }
      if (t == 0 && m_start + r < q_len) {
        lse_base[m_start + r] =
            l > 0.0f ? (m_run[mi][hh] * p.scale_log2 + log2f(l)) * kLn2 : -INFINITY;
      }
    }
  }
  __syncwarp();
  T* o_base = static_cast<T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride +
              q_start * p.o_seq_stride;
  constexpr int kWarpChunks = Cfg::kWarpRows * Cfg::kChunks;
#pragma unroll
  for (int i = 0; i < (kWarpChunks + kWarpSize - 1) / kWarpSize; ++i) {
    const int idx = lane + i * kWarpSize;
    if (kWarpChunks % kWarpSize == 0 || idx < kWarpChunks) {
      const int r = warp * Cfg::kWarpRows + idx / Cfg::kChunks;
      const int ch = idx % Cfg::kChunks;
      if (m_start + r < q_len) {
        const uint4 v = *reinterpret_cast<const uint4*>(sQ + Cfg::offset(r, ch));
        __stwb(reinterpret_cast<uint4*>(o_base + static_cast<int64_t>(m_start + r) * p.o_seq_stride +
                                        ch * 8),
               v);
      }
    }
  }
}

template <typename T, int D>
cudaError_t launch(const FlashAttnParams& p, cudaStream_t stream) {
  using Cfg = Config<D>;
  constexpr int kSmem = Cfg::template smem_bytes<T>();
  auto* kernel = &forward_kernel<T, D>;
  static std::atomic<uint64_t> smem_configured{0};
  TF_CUDA_TRY(set_max_dynamic_smem_once(kernel, kSmem, smem_configured));
  const dim3 grid(static_cast<unsigned>(ceil_div(p.max_seqlen_q, Cfg::kBlockM)),
                  static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch));
  TF_LAUNCH_KERNEL(grid, Cfg::kThreads, kSmem, stream, kernel)(p);
  return cudaGetLastError();
}

}  // namespace flash_fwd

}  // namespace thinkfuse
