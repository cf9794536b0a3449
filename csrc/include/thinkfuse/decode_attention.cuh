// Decode / speculative-verify attention over a KV cache (flash-decoding), with the semantics of
// kernels/decode_attention.py and reference.decode_attention:
//   q [B, Sq, Hq, D] (1 <= Sq <= 16), k_cache / v_cache [B, S_max, Hkv, D], lengths L[b] (the Sq
//   query tokens included) clamped to [0, S_max]. Query token t of row b sits at key position
//   pos = L - Sq + t and sees the keys j with j <= pos and, with a window W > 0, j > pos - W;
//   with left padding P[b] (optional, clamped to [0, L]) only the keys j >= P[b] exist.
//   out = softmax(scale * q k^T) v over the visible keys; a row that sees no key gives 0.
//
// Work decomposition
// ------------------
// Rows. The G = Hq / Hkv query heads of a kv head and the Sq query tokens form the rows of one
// tile, row r = g * Sq + t (query head h = kvh * G + g), so every K/V byte a block reads serves
// all of them: the cache is read from HBM once per kv head, not once per query head. A block
// holds kRows rows (8, 16 or 32: the smallest that fits G * Sq; larger groups take several row
// tiles, which re-read K/V, mostly from L2 since those blocks run side by side).
//
// Keys. The key axis [0, S_max) is cut into num_splits chunks of `chunk` keys (a multiple of
// kTileN). One block per (batch row, kv head, split, row tile) streams its chunk in tiles of
// kTileN keys through a kStages-deep cp.async ring in shared memory (16-byte copies, zero-filled
// past the end), keeping an online softmax (running max m and sum l per row, float32; scores
// carry the factor scale * log2(e), so 2^(s - m) is an exp2). With one split the block writes
// the normalised output; otherwise it writes the normalised partial output and its lse (log2
// domain) to a float32 workspace and combine_kernel merges the splits exactly:
//   lse = log2 sum_i 2^lse_i,  o = sum_i 2^(lse_i - lse) o_i.
//
// Compute: tensor cores for float16/bfloat16, CUDA cores for float32. Decode reads
// 2 * D * sizeof(T) bytes per key and does 2 * rows * D multiply-adds per key: 4 FMA/byte for
// bf16 at 8 rows (Sq = 1, G = 8) but 16 FMA/byte at 32 rows (Sq = 4, G = 8), against an H100's
// ~11 FMA/byte of CUDA-core fp32 (33.5 TFMA/s over ~3.0 TB/s measured copy bandwidth). CUDA
// cores alone would cap speculative verify (Sq > 1) well below the HBM roofline, so for 16-bit
// types both products run on mma.sync m16n8k16 (fp32 accumulators): S = Q K^T with Q and K in
// their storage type (exact products), and O += P V with P split into two 16-bit terms
// P = hi + lo (two MMAs) so that P V is as accurate as with float32 P (~2^-16 relative), not
// rounded to 16 bits. float32 inputs (no tensor-core type with float32 accuracy) use FMAs on CUDA
// cores: at 8 rows that is 2 FMA/byte, well inside the budget; at 32 rows 8 FMA/byte, near it.
//
// Tiles. A tile is 8 KB of K plus 8 KB of V (kTileN = 8192 / (D * sizeof(T)) keys, 8 to 64):
// with 3 stages (two tiles in flight while one is consumed) a block keeps 32 KB of loads in
// flight and 2-3 blocks fit on an SM, above the ~25 KB per SM that Little's law asks of HBM3
// (3.35 TB/s / 132 SMs x ~1 us). Each tile is consumed in three phases, separated by barriers;
// scores and probabilities pass through shared memory, so the softmax is common to both paths:
//   1. scores S = scale * log2(e) * q k^T for the tile, into s_part[part][r][n] (partial sums
//      over `part`s of D, added up by phase 2).
//      mma: warp w takes key n-tiles of 8 (and, when there are fewer than 4 n-tiles, a share of
//        D); fragments come straight from shared memory (32-bit loads, conflict-free thanks to
//        the 16-byte row padding).
//      fma: thread (key n, part p) dots every q row with key n over its 1/kParts share of D:
//        the 16-byte K chunk is read once and used kRows times; the q chunk (float32, scaled) is
//        one address per 8-lane phase (a broadcast).
//   2. softmax. kSmTpr threads per row sum the parts, mask, take the tile max (xor shuffles),
//      update m and l, write p = 2^(s - m) to p[n][r] and the rescale factor alpha[r].
//   3. O = alpha * O + P V.
//      mma: warp w owns output columns (n-tiles of 8 of D) for all rows and keeps them in mma
//        accumulators; A (P, hi and lo) is built from p, B (V) from 16-bit shared loads.
//      fma: thread (row group of 8, column group of 4, key group kg) keeps an 8 x 4 float32
//        accumulator over the keys n = kg (mod kKeyGroups): one 16-byte V read and two 16-byte
//        p reads (broadcast) feed 32 FMAs; the key groups are summed once, at the end.
// The rescale O *= alpha is skipped where every alpha a thread holds is exactly 1 (the running
// max did not move): bitwise the same result.
//
// Shared memory rows of K/V are padded by 16 bytes, so the 8 lanes of a 16-byte access phase that
// read 8 different keys hit 8 different bank groups.
//
// Splits (choose_num_splits, from shapes and the device only): one split when the blocks of
// (batch row, kv head, row tile) already fill the GPU's resident slots; otherwise enough splits
// for about a full wave of blocks (FlashAttention-2's wave-efficiency rule), each at least
// max(256, 64 * rows / sizeof(T)) keys so the partial outputs stay small next to the K/V bytes:
// batch 1 with a 20k cache and 8 kv heads gets ~40 splits, batch 64 gets one.
//
// Indices: element offsets are int64; key positions are int (S_max <= kDecodeMaxSeqlenK = 2^29,
// so chunk ends and window bounds cannot overflow). Everything is read on the device (lengths),
// nothing is synchronised with the host, and the launch depends only on host-known shapes, so
// the op can be captured in a CUDA graph.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "thinkfuse/common.cuh"
#include "thinkfuse/mma_sm80.cuh"  // cp.async, mma_m16n8k16, pack2

namespace thinkfuse {
namespace decode_attn {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kStages = 3;
constexpr int kCombineThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

__host__ __device__ constexpr int min_int(int a, int b) { return a < b ? a : b; }
__host__ __device__ constexpr int max_int(int a, int b) { return a > b ? a : b; }
__host__ __device__ constexpr int floor_pow2(int x) {
  int p = 1;
  while (p * 2 <= x) p *= 2;
  return p;
}

// Compile-time geometry of one (storage type, head dim, rows per block) instantiation.
template <typename T, int kD, int kRows>
struct Config {
  static_assert(kRows == 8 || kRows == 16 || kRows == 32, "rows per block: 8, 16 or 32");
  static_assert(kD % 16 == 0 && kD >= 16 && kD <= 256, "head_dim: a multiple of 16 up to 256");

  // --- K/V tiles -------------------------------------------------------------------------
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte chunk
  static constexpr int kChunks = kD / kVec;                       // chunks per key row
  // 8 KB of K (and of V) per tile: 32 keys at bf16 D = 128.
  static constexpr int kTileN =
      max_int(8, min_int(64, floor_pow2(8192 / (kD * static_cast<int>(sizeof(T))))));
  static constexpr int kPitch = kD + kVec;             // shared row pitch, elements (+16 bytes)
  static constexpr int kTileElems = kTileN * kPitch;   // one K (or V) tile
  static constexpr int kLoadIters = kTileN * kChunks / kThreads;  // 16-byte copies per thread
  static_assert(kTileN * kChunks % kThreads == 0, "tile copies split evenly over the block");

  // Tensor cores for 16-bit types, CUDA cores for float32 (see the file comment).
  static constexpr bool kMma = !std::is_same<T, float>::value;

  // --- mma geometry (16-bit types) ------------------------------------------------------------
  static constexpr int kMTiles = max_int(1, kRows / 16);  // m16 tiles (8 rows: rows 8-15 are 0)
  static constexpr int kMmaRows = kMTiles * 16;
  static constexpr int kQPitch = kD + 8;  // q rows in shared memory, elements (+16 bytes)
  static constexpr int kKSteps = kD / 16;  // k16 steps of S = Q K^T
  static constexpr int kQkNTiles = kTileN / 8;  // key n8 tiles of S
  // Fewer n-tiles than warps (D = 256: 2): warps also split D, into kQkParts parts.
  static constexpr int kQkParts = kQkNTiles >= kWarps ? 1 : kWarps / max_int(kQkNTiles, 1);
  static constexpr int kQkWarpsPerPart = kWarps / kQkParts;
  static constexpr int kQkNTilesPerWarp = max_int(1, kQkNTiles / kWarps);
  static constexpr int kQkKStepsPerPart = kKSteps / kQkParts;
  static constexpr int kPvNTiles = kD / 8;  // output column n8 tiles of O
  static constexpr int kPvWarps = min_int(kWarps, kPvNTiles);  // D = 16: two warps
  static constexpr int kPvNTilesPerWarp = kPvNTiles / kPvWarps;
  static constexpr int kPvKSteps = kTileN / 16;  // k16 steps (keys) of O += P V
  static_assert(!kMma || (kTileN % 16 == 0 && kQkWarpsPerPart * kQkNTilesPerWarp == kQkNTiles &&
                          kKSteps % kQkParts == 0 && kPvNTiles % kPvWarps == 0),
                "mma tiles split evenly over the warps");

  // --- fma phase 1: thread = part * kTileN + n ---------------------------------------------
  static constexpr int kFmaParts = kThreads / kTileN;  // threads per key, each 1/kParts of D
  static constexpr int kPartChunks = kChunks / kFmaParts;
  static_assert(kThreads % kTileN == 0 && kChunks % kFmaParts == 0, "scores split evenly");

  // --- fma phase 3: thread = kg * kSlots + slot; slot = rg * kColGroups + cg ----------------
  // An 8 x 4 accumulator per thread (8 x 8 only where 8 x 4 would need more than kThreads
  // slots: 32 rows at D = 256): two 16-byte p reads and one 16-byte V read feed 32 FMAs, and
  // the 32 accumulator registers leave room for 3 blocks per SM without spills (an 8 x 8
  // accumulator spilled at the 168-register budget of 3 blocks).
  static constexpr int kPvRows = 8;  // accumulator rows per thread
  static constexpr int kPvCols = (kRows / 8) * (kD / 4) <= kThreads ? 4 : 8;  // columns
  static constexpr int kRowGroups = kRows / kPvRows;
  static constexpr int kColGroups = kD / kPvCols;
  static constexpr int kSlots = kRowGroups * kColGroups;  // (row group, column group) pairs
  static constexpr int kFmaKeyGroups = min_int(16, floor_pow2(kThreads / kSlots));
  static constexpr int kPvThreads = kSlots * kFmaKeyGroups;
  static constexpr int kPvKeys = kTileN / kFmaKeyGroups;  // keys per thread per tile
  static_assert(kSlots <= kThreads && kTileN % kFmaKeyGroups == 0, "PV split evenly");

  // --- what the shared phases see ----------------------------------------------------------
  static constexpr int kParts = kMma ? kQkParts : kFmaParts;  // partial-score parts
  static constexpr int kKeyGroups = kMma ? 1 : kFmaKeyGroups;  // partial accumulators
  static constexpr int kPPitch = kRows + 4;  // p[n][r] row pitch: conflict-free mma A loads

  // --- phase 2: softmax. thread = row * kSmTpr + sub; keys n = sub + i * kSmTpr -----------
  static constexpr int kSmTpr = min_int(kTileN, kThreads / kRows);  // threads per row
  static constexpr int kSmKeys = kTileN / kSmTpr;                    // keys per thread
  static constexpr int kSmThreads = kRows * kSmTpr;
  static_assert(kSmTpr <= kWarpSize && kTileN % kSmTpr == 0, "a row's threads share a warp");
  static_assert(kSmThreads % kWarpSize == 0 && kSmThreads <= kThreads,
                "softmax threads are whole warps (full-mask shuffles)");

  // Accumulators of phase 3 (registers).
  struct MmaAcc {
    float v[kMTiles][kPvNTilesPerWarp][4];
  };
  struct FmaAcc {
    float v[kPvRows][kPvCols];
  };
  using Acc = typename std::conditional<kMma, MmaAcc, FmaAcc>::type;

  // --- shared memory layout (bytes; every region a multiple of 16) ----------------------------
  static constexpr int kKvBytes = kStages * 2 * kTileElems * static_cast<int>(sizeof(T));
  static constexpr int kRedBytes = kKeyGroups * kRows * kD * 4;  // after the loop, over K/V
  static constexpr int kRingBytes = kKvBytes > kRedBytes ? kKvBytes : kRedBytes;
  static constexpr int kQBytes = kMma ? kMmaRows * kQPitch * static_cast<int>(sizeof(T))
                                      : kRows * kD * 4;
  static constexpr int kQOffset = kRingBytes;
  static constexpr int kSPartOffset = kQOffset + kQBytes;
  static constexpr int kPOffset = kSPartOffset + kParts * kRows * kTileN * 4;
  static constexpr int kStatsOffset = kPOffset + kTileN * kPPitch * 4;  // alpha, m, l
  static constexpr int kSmemBytes = kStatsOffset + 3 * kRows * 4;
  // Resident blocks per SM the register budget is planned for (__launch_bounds__): as many as
  // shared memory allows on an H100 (227 KB per SM, 1 KB reserved per block), at most 3
  // (<= 168 registers a thread: 12 warps per SM to hide latency), but 2 for the float32 path at
  // 16 or 32 rows, whose FMA score tiles spill at 168 registers in some instantiations.
  static constexpr int kMinBlocks =
      max_int(1, min_int(kMma || kRows == 8 ? 3 : 2, 232448 / (kSmemBytes + 1024)));
  static_assert(kKvBytes % 16 == 0 && kRedBytes % 16 == 0 && kQBytes % 16 == 0 &&
                    (kTileN * kPPitch * 4) % 16 == 0,
                "16-byte aligned regions");
};

// Kernel arguments. Element strides; q, k, v have a unit stride on D.
template <typename T>
struct Params {
  const T* q;
  int64_t q_sb, q_ss, q_sh;
  const T* k;
  int64_t k_sb, k_ss, k_sh;
  const T* v;
  int64_t v_sb, v_ss, v_sh;
  const int32_t* seqlens;  // [B]
  const int32_t* leftpad;  // [B] first key of each row (left padding), or nullptr: 0
  T* out;                  // contiguous [B, Sq, Hq, D]; written when num_splits == 1
  float* o_part;           // [B, num_splits, Hq * Sq, D] (row h * Sq + t); num_splits > 1
  float* lse_part;         // [B, num_splits, Hq * Sq], log2 domain; num_splits > 1
  int batch;
  int seqlen_q;     // Sq
  int q_heads;      // Hq
  int kv_heads;     // Hkv
  int group;        // G = Hq / Hkv
  int max_seqlen_k;  // S_max
  int window;       // > 0: sliding window; 0: none (the host maps W >= S_max to 0)
  int num_splits;
  int chunk;        // keys per split, a multiple of kTileN
  int row_tiles;    // ceil(G * Sq / kRows)
  float scale_log2;  // softmax_scale * log2(e)
  bool kv_aligned;   // K/V rows 16-byte aligned: cp.async; else element-wise copies
};

// Shared memory regions of one block.
template <typename T, int kD, int kRows>
struct Smem {
  using C = Config<T, kD, kRows>;
  T* kv;          // [kStages][2 (K, V)][kTileN][kPitch]
  float* red;     // [kKeyGroups][kRows][kD]: PV partials after the loop (overlays kv)
  float* q;       // fma: [kRows][kD], float32, times scale * log2(e)
  T* q_t;         // mma: [kMmaRows][kQPitch] in T, unscaled; rows >= kRows are 0 (same memory)
  float* s_part;  // [kParts][kRows][kTileN]: partial scores
  float* p;       // [kTileN][kPPitch]: p[n][r], probabilities of the current tile
  float* alpha;   // [kRows]: rescale factor of the current tile
  float* m;       // [kRows]: final running max (epilogue)
  float* l;       // [kRows]: final running sum (epilogue)

  __device__ explicit Smem(unsigned char* base)
      : kv(reinterpret_cast<T*>(base)),
        red(reinterpret_cast<float*>(base)),
        q(reinterpret_cast<float*>(base + C::kQOffset)),
        q_t(reinterpret_cast<T*>(base + C::kQOffset)),
        s_part(reinterpret_cast<float*>(base + C::kSPartOffset)),
        p(reinterpret_cast<float*>(base + C::kPOffset)),
        alpha(reinterpret_cast<float*>(base + C::kStatsOffset)),
        m(alpha + kRows),
        l(alpha + 2 * kRows) {}

  __device__ T* k_tile(int stage) const { return kv + stage * 2 * C::kTileElems; }
  __device__ T* v_tile(int stage) const { return kv + (stage * 2 + 1) * C::kTileElems; }
};

// Stores N floats (N a multiple of 4) to 16-byte aligned shared memory as 16-byte vectors.
// (store_floats of common.cuh is for global memory only: it stores with st.global.wb.)
template <int N>
__device__ __forceinline__ void store_shared(float* dst, const float (&x)[N]) {
  static_assert(N % 4 == 0, "whole float4 vectors");
#pragma unroll
  for (int i = 0; i < N; i += 4) {
    *reinterpret_cast<float4*>(dst + i) = make_float4(x[i], x[i + 1], x[i + 2], x[i + 3]);
  }
}

// What one block works on: its place in the grid and its key range [key_lo, key_hi).
struct BlockWork {
  int b, kvh, split, row_tile;
  int len;     // L clamped to [0, S_max]
  int key_lo;  // first key: the split start, raised to the row's first key (left padding) and
               // to the first key any query's window allows
  int key_hi;  // one past the last key: the split end, capped at L
  int num_tiles;
};

// blockIdx.x = ((b * Hkv + kvh) * num_splits + split) * row_tiles + row_tile: the row tiles of a
// (b, kvh, split), which read the same K/V, are neighbours in the launch order (L2 reuse).
template <typename T>
__device__ __forceinline__ BlockWork block_work(const Params<T>& p, int tile_n) {
  BlockWork w;
  int idx = static_cast<int>(blockIdx.x);
  w.row_tile = idx % p.row_tiles;
  idx /= p.row_tiles;
  w.split = idx % p.num_splits;
  idx /= p.num_splits;
  w.kvh = idx % p.kv_heads;
  w.b = idx / p.kv_heads;
  w.len = min(max(p.seqlens[w.b], 0), p.max_seqlen_k);
  // split * chunk < S_max (the host sizes num_splits = ceil(S_max / chunk)), so no overflow.
  const int split_lo = w.split * p.chunk;
  w.key_hi = min(split_lo + p.chunk, w.len);
  w.key_lo = split_lo;
  if (p.window > 0) {
    // Row t = 0 (the earliest position, L - Sq) sees keys j > L - Sq - W; later rows see less.
    w.key_lo = max(w.key_lo, w.len - p.seqlen_q - p.window + 1);
  }
  // Left padding: the slots before the row's first key are skipped, never read. Every key the
  // block handles is >= key_lo by construction, so raising key_lo is the whole mask.
  if (p.leftpad != nullptr) w.key_lo = max(w.key_lo, min(max(p.leftpad[w.b], 0), w.len));
  w.num_tiles = w.key_hi > w.key_lo ? ceil_div(w.key_hi - w.key_lo, tile_n) : 0;
  return w;
}

// q rows of the tile -> shared memory: for the fma path as float32 times scale * log2(e), for
// the mma path unchanged in T (the scale is applied to the float32 scores: no extra rounding).
// Rows past G * Sq (the last row tile's padding, and the mma tile's rows past kRows) are zeros;
// their scores are masked anyway. Element-wise loads: q is small next to the cache and may have
// any strides and alignment.
template <typename T, int kD, int kRows>
__device__ __forceinline__ void load_q(const Params<T>& p, const BlockWork& w,
                                       const Smem<T, kD, kRows>& s) {
  using C = Config<T, kD, kRows>;
  constexpr int kLoadRows = C::kMma ? C::kMmaRows : kRows;
  const int rows = p.group * p.seqlen_q;
  for (int i = threadIdx.x; i < kLoadRows * kD; i += kThreads) {
    const int r = i / kD;
    const int d = i % kD;
    const int row = w.row_tile * kRows + r;
    T x = from_float<T>(0.0f);
    if (r < kRows && row < rows) {
      const int g = row / p.seqlen_q;
      const int t = row % p.seqlen_q;
      const int64_t h = static_cast<int64_t>(w.kvh) * p.group + g;
      x = p.q[w.b * p.q_sb + t * p.q_ss + h * p.q_sh + d];
    }
    if constexpr (C::kMma) {
      s.q_t[r * C::kQPitch + d] = x;
    } else {
      s.q[i] = to_float(x) * p.scale_log2;
    }
  }
}

// Issues the copies of key tile `tile` (keys key_lo + tile * kTileN + n) into ring slot `stage`.
// Keys at or past key_hi are zero-filled: their scores are masked, and zeros (not stale shared
// memory, which may hold NaN bit patterns) keep 0 * v finite. Tiles past the last issue nothing.
template <typename T, int kD, int kRows>
__device__ __forceinline__ void load_tile(const Params<T>& p, const BlockWork& w,
                                          const Smem<T, kD, kRows>& s, int tile, int stage) {
  using C = Config<T, kD, kRows>;
  if (tile >= w.num_tiles) return;
  const int tile_start = w.key_lo + tile * C::kTileN;
  const T* k_base = p.k + w.b * p.k_sb + w.kvh * p.k_sh;
  const T* v_base = p.v + w.b * p.v_sb + w.kvh * p.v_sh;
  T* k_dst = s.k_tile(stage);
  T* v_dst = s.v_tile(stage);
#pragma unroll
  for (int it = 0; it < C::kLoadIters; ++it) {
    // Consecutive threads take consecutive 16-byte chunks of a key row: coalesced reads.
    const int i = threadIdx.x + it * kThreads;
    const int n = i / C::kChunks;
    const int c = i % C::kChunks;
    const int j = tile_start + n;
    const bool valid = j < w.key_hi;  // j >= key_lo by construction
    const int64_t row = valid ? j : w.key_lo;  // any in-bounds row when nothing is read
    const T* k_src = k_base + row * p.k_ss + c * C::kVec;
    const T* v_src = v_base + row * p.v_ss + c * C::kVec;
    T* kd = k_dst + n * C::kPitch + c * C::kVec;
    T* vd = v_dst + n * C::kPitch + c * C::kVec;
    if (p.kv_aligned) {
      mma::cp_async_16(kd, k_src, valid);
      mma::cp_async_16(vd, v_src, valid);
    } else {
      const T zero = from_float<T>(0.0f);
#pragma unroll
      for (int e = 0; e < C::kVec; ++e) {
        kd[e] = valid ? k_src[e] : zero;
        vd[e] = valid ? v_src[e] : zero;
      }
    }
  }
}

// Phase 1 (fma): partial scores s_part[part][r][n] = sum over the part's share of D of
// q[r][d] k[n][d] (already times scale * log2(e) through q).
template <typename T, int kD, int kRows>
__device__ __forceinline__ void compute_scores_fma(const Smem<T, kD, kRows>& s, int stage) {
  using C = Config<T, kD, kRows>;
  const int n = threadIdx.x % C::kTileN;
  const int part = threadIdx.x / C::kTileN;
  const T* k_row = s.k_tile(stage) + n * C::kPitch;
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
#pragma unroll
  for (int jc = 0; jc < C::kPartChunks; ++jc) {
    const int c = part * C::kPartChunks + jc;  // this part's D range is contiguous
    float kf[C::kVec];
    load_floats<true>(k_row + c * C::kVec, C::kVec, kf);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float qf[C::kVec];
      load_floats<true>(s.q + r * kD + c * C::kVec, C::kVec, qf);
#pragma unroll
      for (int e = 0; e < C::kVec; ++e) acc[r] = fmaf(qf[e], kf[e], acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) s.s_part[(part * kRows + r) * C::kTileN + n] = acc[r];
}

// 32 bits (two consecutive 16-bit elements) of shared memory; `ptr` is 4-byte aligned.
template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* ptr) {
  return *reinterpret_cast<const uint32_t*>(ptr);
}

// Two 16-bit elements from different rows packed into one register, `lo` in the low half (the
// lower k index, as the mma fragments want).
template <typename T>
__device__ __forceinline__ uint32_t pack_elements(const T& lo, const T& hi) {
  const uint32_t l = *reinterpret_cast<const unsigned short*>(&lo);
  const uint32_t h = *reinterpret_cast<const unsigned short*>(&hi);
  return l | (h << 16);
}

// Fragment coordinates (PTX ISA, mma.m16n8k16 with .f16 / .bf16 inputs; lane = 4 * g + c):
//   A (16 x 16, row-major): a[0] = A[g][2c, 2c+1], a[1] = A[g+8][2c, 2c+1],
//                           a[2] = A[g][8+2c, 9+2c], a[3] = A[g+8][8+2c, 9+2c]
//   B (16 x 8, k x n):      b[0] = B[2c, 2c+1][g],  b[1] = B[8+2c, 9+2c][g]
//   C (16 x 8, float):      c[0], c[1] = C[g][2c, 2c+1],  c[2], c[3] = C[g+8][2c, 2c+1]
// (the lower index of each pair in the low 16 bits of the register).

// Phase 1 (mma): S = Q K^T for the tile. A = Q rows [16 mt, 16 mt + 16) x D (q_t, row-major);
// B = K^T, so B[k][n] = K[n][k]: b[0] = K[n0 + g][k0 + 2c, +1] is one 32-bit load of a K row.
// Warp w takes the key n-tiles wn + i * kQkWarpsPerPart (wn = w % kQkWarpsPerPart) over the
// k16 steps of its part (w / kQkWarpsPerPart) of D, and writes
// s_part[part][r][n] = scale_log2 * S[r][n] for the rows r < kRows.
template <typename T, int kD, int kRows>
__device__ __forceinline__ void compute_scores_mma(const Smem<T, kD, kRows>& s, int stage,
                                                   float scale_log2) {
  using C = Config<T, kD, kRows>;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int g = lane / 4;
  const int c = lane % 4;
  const int part = warp / C::kQkWarpsPerPart;
  const int wn = warp % C::kQkWarpsPerPart;
  const T* k_tile = s.k_tile(stage);
#pragma unroll
  for (int i = 0; i < C::kQkNTilesPerWarp; ++i) {
    const int n0 = (wn + i * C::kQkWarpsPerPart) * 8;
    float acc[C::kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < C::kMTiles; ++mt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][e] = 0.0f;
    }
#pragma unroll
    for (int ks = 0; ks < C::kQkKStepsPerPart; ++ks) {
      const int k0 = (part * C::kQkKStepsPerPart + ks) * 16;
      const T* k_row = k_tile + (n0 + g) * C::kPitch + k0 + 2 * c;
      const uint32_t b[2] = {load_pair(k_row), load_pair(k_row + 8)};
#pragma unroll
      for (int mt = 0; mt < C::kMTiles; ++mt) {
        const T* q_row = s.q_t + (mt * 16 + g) * C::kQPitch + k0 + 2 * c;
        const uint32_t a[4] = {load_pair(q_row), load_pair(q_row + 8 * C::kQPitch),
                               load_pair(q_row + 8), load_pair(q_row + 8 * C::kQPitch + 8)};
        mma::mma_m16n8k16<T>(acc[mt], a, b);
      }
    }
#pragma unroll
    for (int mt = 0; mt < C::kMTiles; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = mt * 16 + g + 8 * half;
        if (r < kRows) {
          float* dst = s.s_part + (part * kRows + r) * C::kTileN + n0 + 2 * c;
          *reinterpret_cast<float2*>(dst) =
              make_float2(acc[mt][2 * half] * scale_log2, acc[mt][2 * half + 1] * scale_log2);
        }
      }
    }
  }
}

// Reductions over the kGroup consecutive lanes of a row (aligned groups inside one warp; every
// lane of the warp takes part). Xor butterflies: every lane ends with bitwise the same value.
template <int kGroup>
__device__ __forceinline__ float group_max(float x) {
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset /= 2) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

template <int kGroup>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int offset = kGroup / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

// Online-softmax state of one row, held (identically) by each of the row's kSmTpr threads.
struct RowState {
  int pos;      // key position of the row's query token; -1 for padding rows (sees nothing)
  float m;      // running max of the scores (log2 units), -inf before the first visible key
  float l;      // running sum of 2^(s - m)
};

// Phase 2: for the row of this thread, mask the tile's scores, update (m, l), and publish
// p[n][r] = 2^(s - m_new) and alpha[r] = 2^(m_old - m_new). A row whose max is still -inf uses
// 0 as the shift: its p are 2^-inf = 0 and its alpha 0, never NaN.
template <typename T, int kD, int kRows>
__device__ __forceinline__ void softmax_tile(const Smem<T, kD, kRows>& s, const BlockWork& w,
                                             int window, int tile_start, RowState& st) {
  using C = Config<T, kD, kRows>;
  const int r = threadIdx.x / C::kSmTpr;
  const int sub = threadIdx.x % C::kSmTpr;
  float sc[C::kSmKeys];
  float tile_max = -INFINITY;
#pragma unroll
  for (int i = 0; i < C::kSmKeys; ++i) {
    const int n = sub + i * C::kSmTpr;
    const int j = tile_start + n;
    float x = 0.0f;
#pragma unroll
    for (int part = 0; part < C::kParts; ++part) x += s.s_part[(part * kRows + r) * C::kTileN + n];
    const bool visible = j < w.key_hi && j <= st.pos && (window <= 0 || j > st.pos - window);
    sc[i] = visible ? x : -INFINITY;
    tile_max = fmaxf(tile_max, sc[i]);
  }
  tile_max = group_max<C::kSmTpr>(tile_max);
  const float m_new = fmaxf(st.m, tile_max);
  const float shift = m_new == -INFINITY ? 0.0f : m_new;
  const float alpha = exp2f(st.m - shift);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < C::kSmKeys; ++i) {
    const int n = sub + i * C::kSmTpr;
    const float pr = exp2f(sc[i] - shift);
    s.p[n * C::kPPitch + r] = pr;
    sum += pr;
  }
  sum = group_sum<C::kSmTpr>(sum);
  st.l = st.l * alpha + sum;
  st.m = m_new;
  if (sub == 0) s.alpha[r] = alpha;
}

// Phase 3 (fma): acc[r][c] = alpha[r] * acc[r][c] + sum over this thread's keys n of
// p[n][r] v[n][c], for rows rg * kPvRows + r and columns cg * kPvCols + c. Threads past
// kPvThreads do not call it.
template <typename T, int kD, int kRows>
__device__ __forceinline__ void accumulate_pv_fma(const Smem<T, kD, kRows>& s, int stage,
                                                  typename Config<T, kD, kRows>::FmaAcc& acc) {
  using C = Config<T, kD, kRows>;
  const int slot = threadIdx.x % C::kSlots;
  const int kg = threadIdx.x / C::kSlots;
  const int rg = slot / C::kColGroups;
  const int cg = slot % C::kColGroups;
  float a[C::kPvRows];
  load_floats<true>(s.alpha + rg * C::kPvRows, C::kPvRows, a);
  bool rescale = false;
#pragma unroll
  for (int r = 0; r < C::kPvRows; ++r) rescale |= a[r] != 1.0f;
  if (rescale) {
#pragma unroll
    for (int r = 0; r < C::kPvRows; ++r) {
#pragma unroll
      for (int c = 0; c < C::kPvCols; ++c) acc.v[r][c] *= a[r];
    }
  }
  const T* v_col = s.v_tile(stage) + cg * C::kPvCols;
#pragma unroll
  for (int i = 0; i < C::kPvKeys; ++i) {
    const int n = kg + i * C::kFmaKeyGroups;
    float vf[C::kPvCols];
    load_floats<true>(v_col + n * C::kPitch, C::kPvCols, vf);
    float pr[C::kPvRows];
    load_floats<true>(s.p + n * C::kPPitch + rg * C::kPvRows, C::kPvRows, pr);
#pragma unroll
    for (int r = 0; r < C::kPvRows; ++r) {
#pragma unroll
      for (int c = 0; c < C::kPvCols; ++c) acc.v[r][c] = fmaf(pr[r], vf[c], acc.v[r][c]);
    }
  }
}

// The A fragment register of P holding rows `r` (the fragment's row) and keys n, n + 1, as the
// pair (hi, lo) of 16-bit splits: p = hi + lo up to ~2^-16 relative. Rows past kRows are 0.
template <typename T, int kD, int kRows>
__device__ __forceinline__ void p_fragment(const Smem<T, kD, kRows>& s, int r, int n,
                                           uint32_t& hi, uint32_t& lo) {
  using C = Config<T, kD, kRows>;
  float p0 = 0.0f;
  float p1 = 0.0f;
  if (r < kRows) {
    p0 = s.p[n * C::kPPitch + r];
    p1 = s.p[(n + 1) * C::kPPitch + r];
  }
  hi = mma::pack2<T>(p0, p1);  // rounds to nearest, as round_to does
  lo = mma::pack2<T>(p0 - round_to<T>(p0), p1 - round_to<T>(p1));  // exact differences
}

// Phase 3 (mma): O = alpha * O + P V for the tile. Warp w < kPvWarps owns the output column
// n-tiles w + j * kPvWarps (8 columns each) for all kMmaRows rows. Per k16 step (keys
// key0 .. key0 + 15): A = P[rows][keys] (hi and lo, from p), B = V[keys][8 columns] with
// b[0] = (V[key0 + 2c][d0 + g], V[key0 + 2c + 1][d0 + g]) packed from two 16-bit loads.
template <typename T, int kD, int kRows>
__device__ __forceinline__ void accumulate_pv_mma(const Smem<T, kD, kRows>& s, int stage,
                                                  typename Config<T, kD, kRows>::MmaAcc& acc) {
  using C = Config<T, kD, kRows>;
  const int warp = threadIdx.x / kWarpSize;
  if (warp >= C::kPvWarps) return;  // D = 16: warps 2, 3 own no columns
  const int lane = threadIdx.x % kWarpSize;
  const int g = lane / 4;
  const int c = lane % 4;
  // Rescale: this lane's accumulator rows are mt * 16 + g (c[0], c[1]) and + 8 (c[2], c[3]).
#pragma unroll
  for (int mt = 0; mt < C::kMTiles; ++mt) {
    const int r0 = mt * 16 + g;
    const float a0 = r0 < kRows ? s.alpha[r0] : 1.0f;
    const float a1 = r0 + 8 < kRows ? s.alpha[r0 + 8] : 1.0f;
    if (a0 != 1.0f || a1 != 1.0f) {
#pragma unroll
      for (int j = 0; j < C::kPvNTilesPerWarp; ++j) {
        acc.v[mt][j][0] *= a0;
        acc.v[mt][j][1] *= a0;
        acc.v[mt][j][2] *= a1;
        acc.v[mt][j][3] *= a1;
      }
    }
  }
  const T* v_tile = s.v_tile(stage);
#pragma unroll
  for (int ks = 0; ks < C::kPvKSteps; ++ks) {
    const int key0 = ks * 16;
    uint32_t a_hi[C::kMTiles][4];
    uint32_t a_lo[C::kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < C::kMTiles; ++mt) {
      const int r0 = mt * 16 + g;
      p_fragment(s, r0, key0 + 2 * c, a_hi[mt][0], a_lo[mt][0]);
      p_fragment(s, r0 + 8, key0 + 2 * c, a_hi[mt][1], a_lo[mt][1]);
      p_fragment(s, r0, key0 + 8 + 2 * c, a_hi[mt][2], a_lo[mt][2]);
      p_fragment(s, r0 + 8, key0 + 8 + 2 * c, a_hi[mt][3], a_lo[mt][3]);
    }
#pragma unroll
    for (int j = 0; j < C::kPvNTilesPerWarp; ++j) {
      const int d0 = (warp + j * C::kPvWarps) * 8;
      const T* v = v_tile + (key0 + 2 * c) * C::kPitch + d0 + g;
      const uint32_t b[2] = {pack_elements(v[0], v[C::kPitch]),
                             pack_elements(v[8 * C::kPitch], v[9 * C::kPitch])};
#pragma unroll
      for (int mt = 0; mt < C::kMTiles; ++mt) {
        mma::mma_m16n8k16<T>(acc.v[mt][j], a_hi[mt], b);
        mma::mma_m16n8k16<T>(acc.v[mt][j], a_lo[mt], b);
      }
    }
  }
}

// After the loop: the accumulators to red[kg][r][d] (fma: one slice per key group; mma: one
// slice, each warp its columns), rows r < kRows.
template <typename T, int kD, int kRows>
__device__ __forceinline__ void store_accumulators(const Smem<T, kD, kRows>& s,
                                                   const typename Config<T, kD, kRows>::Acc& acc) {
  using C = Config<T, kD, kRows>;
  if constexpr (C::kMma) {
    const int warp = threadIdx.x / kWarpSize;
    if (warp >= C::kPvWarps) return;
    const int lane = threadIdx.x % kWarpSize;
    const int g = lane / 4;
    const int c = lane % 4;
#pragma unroll
    for (int mt = 0; mt < C::kMTiles; ++mt) {
#pragma unroll
      for (int j = 0; j < C::kPvNTilesPerWarp; ++j) {
        const int d = (warp + j * C::kPvWarps) * 8 + 2 * c;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = mt * 16 + g + 8 * half;
          if (r < kRows) {
            *reinterpret_cast<float2*>(s.red + r * kD + d) =
                make_float2(acc.v[mt][j][2 * half], acc.v[mt][j][2 * half + 1]);
          }
        }
      }
    }
  } else {
    if (threadIdx.x >= C::kPvThreads) return;
    const int slot = threadIdx.x % C::kSlots;
    const int kg = threadIdx.x / C::kSlots;
    const int rg = slot / C::kColGroups;
    const int cg = slot % C::kColGroups;
#pragma unroll
    for (int r = 0; r < C::kPvRows; ++r) {
      float* dst = s.red + (kg * kRows + rg * C::kPvRows + r) * kD + cg * C::kPvCols;
      store_shared(dst, acc.v[r]);
    }
  }
}

// Epilogue, after the loop and a barrier: sums the key groups' accumulators, divides by l and
// writes the output (one split) or the partial output and its lse (several splits). Each thread
// handles 4 consecutive columns of a row per step.
template <typename T, int kD, int kRows>
__device__ __forceinline__ void write_output(const Params<T>& p, const BlockWork& w,
                                             const Smem<T, kD, kRows>& s) {
  using C = Config<T, kD, kRows>;
  constexpr int kQuads = kD / 4;
  const int rows_left = p.group * p.seqlen_q - w.row_tile * kRows;  // >= 1
  for (int i = threadIdx.x; i < kRows * kQuads; i += kThreads) {
    const int r = i / kQuads;
    const int d = (i % kQuads) * 4;
    if (r >= rows_left) break;  // i only grows, and so does r
    float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int kg = 0; kg < C::kKeyGroups; ++kg) {
      float part[4];
      load_floats<true>(s.red + (kg * kRows + r) * kD + d, 4, part);
#pragma unroll
      for (int e = 0; e < 4; ++e) o[e] += part[e];
    }
    const float l = s.l[r];
    // l == 0: the row saw no key in this block; its output is 0 (and its lse -inf).
#pragma unroll
    for (int e = 0; e < 4; ++e) o[e] = l > 0.0f ? __fdiv_rn(o[e], l) : 0.0f;
    const int row = w.row_tile * kRows + r;
    const int g = row / p.seqlen_q;
    const int t = row % p.seqlen_q;
    const int64_t h = static_cast<int64_t>(w.kvh) * p.group + g;
    if (p.num_splits == 1) {
      // out[b][t][h][d], contiguous [B, Sq, Hq, D]
      T* dst = p.out + ((static_cast<int64_t>(w.b) * p.seqlen_q + t) * p.q_heads + h) * kD + d;
      store_floats<true>(dst, 4, o);
    } else {
      // workspace row (b, split, h * Sq + t)
      const int64_t prow =
          (static_cast<int64_t>(w.b) * p.num_splits + w.split) * p.q_heads * p.seqlen_q +
          h * p.seqlen_q + t;
      store_floats<true>(p.o_part + prow * kD + d, 4, o);
      if (d == 0) p.lse_part[prow] = l > 0.0f ? s.m[r] + log2f(l) : -INFINITY;
    }
  }
}

template <typename T, int kD, int kRows>
__global__ void __launch_bounds__(kThreads, Config<T, kD, kRows>::kMinBlocks)
    split_kernel(const Params<T> p) {
  using C = Config<T, kD, kRows>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Smem<T, kD, kRows> s(smem_raw);
  const BlockWork w = block_work(p, C::kTileN);

  load_q(p, w, s);  // visible to all after the first barrier below

  // Roles (fixed per thread for the whole block).
  const bool sm_thread = threadIdx.x < C::kSmThreads;
  RowState st;
  st.pos = -1;
  st.m = -INFINITY;
  st.l = 0.0f;
  if (sm_thread) {
    const int row = w.row_tile * kRows + static_cast<int>(threadIdx.x) / C::kSmTpr;
    if (row < p.group * p.seqlen_q) st.pos = w.len - p.seqlen_q + row % p.seqlen_q;
  }
  typename C::Acc acc = {};  // O (phase 3), zeros

  // Ring: tile i lives in slot i % kStages. Every iteration commits exactly one group (possibly
  // empty), so before iteration i the committed groups are tiles 0 .. i + kStages - 2, and
  // waiting until at most kStages - 2 are pending means tile i has landed.
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    load_tile(p, w, s, i, i);
    mma::cp_async_commit();
  }
  for (int tile = 0; tile < w.num_tiles; ++tile) {
    mma::cp_async_wait<kStages - 2>();
    // Tile `tile` is visible to every thread, and every thread is done with iteration tile - 1,
    // so its slot ((tile - 1) % kStages) may be refilled and s_part / p / alpha rewritten.
    __syncthreads();
    load_tile(p, w, s, tile + kStages - 1, (tile + kStages - 1) % kStages);
    mma::cp_async_commit();
    const int stage = tile % kStages;
    if constexpr (C::kMma) {
      compute_scores_mma(s, stage, p.scale_log2);
    } else {
      compute_scores_fma(s, stage);
    }
    __syncthreads();  // s_part complete
    if (sm_thread) softmax_tile(s, w, p.window, w.key_lo + tile * C::kTileN, st);
    __syncthreads();  // p and alpha complete
    if constexpr (C::kMma) {
      accumulate_pv_mma(s, stage, acc);
    } else if (threadIdx.x < C::kPvThreads) {
      accumulate_pv_fma(s, stage, acc);
    }
  }
  mma::cp_async_wait<0>();
  __syncthreads();  // the ring is idle: its memory now holds the key-group partials

  if (sm_thread && threadIdx.x % C::kSmTpr == 0) {
    const int r = threadIdx.x / C::kSmTpr;
    s.m[r] = st.m;
    s.l[r] = st.l;
  }
  store_accumulators(s, acc);
  __syncthreads();
  write_output(p, w, s);
}

// ---------------------------------------------------------------------------------------------
// Combine: one thread per (workspace row, 4 columns); row = b * (Hq * Sq) + h * Sq + t.
// ---------------------------------------------------------------------------------------------

template <typename T>
struct CombineParams {
  const float* o_part;    // [B, num_splits, Hq * Sq, D]
  const float* lse_part;  // [B, num_splits, Hq * Sq]
  T* out;                 // contiguous [B, Sq, Hq, D]
  int64_t rows;           // B * Hq * Sq
  int rows_per_batch;     // Hq * Sq
  int seqlen_q;
  int q_heads;
  int head_dim;
  int num_splits;
};

template <typename T>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const CombineParams<T> p) {
  const int quads = p.head_dim / 4;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kCombineThreads + threadIdx.x;
  if (item >= p.rows * quads) return;
  const int64_t row = item / quads;
  const int d = static_cast<int>(item % quads) * 4;
  const int64_t b = row / p.rows_per_batch;
  const int hs = static_cast<int>(row % p.rows_per_batch);  // h * Sq + t
  // Split sp of this row: lse at lse_row[sp * Hq * Sq], output at o_row[sp * Hq * Sq * D].
  const float* lse_row = p.lse_part + b * p.num_splits * p.rows_per_batch + hs;
  const float* o_row = p.o_part + (b * p.num_splits * p.rows_per_batch + hs) * p.head_dim + d;
  const int64_t lse_split_stride = p.rows_per_batch;
  const int64_t o_split_stride = lse_split_stride * p.head_dim;
  float m = -INFINITY;
  for (int sp = 0; sp < p.num_splits; ++sp) m = fmaxf(m, lse_row[sp * lse_split_stride]);
  const float shift = m == -INFINITY ? 0.0f : m;
  float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  float total = 0.0f;
  for (int sp = 0; sp < p.num_splits; ++sp) {
    const float wgt = exp2f(lse_row[sp * lse_split_stride] - shift);
    if (wgt > 0.0f) {  // splits that saw no key (weight 0) are not read
      float part[4];
      load_floats<true>(o_row + sp * o_split_stride, 4, part);
#pragma unroll
      for (int e = 0; e < 4; ++e) o[e] = fmaf(wgt, part[e], o[e]);
      total += wgt;
    }
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) o[e] = total > 0.0f ? __fdiv_rn(o[e], total) : 0.0f;
  const int h = hs / p.seqlen_q;
  const int t = hs % p.seqlen_q;
  T* dst = p.out + ((b * p.seqlen_q + t) * p.q_heads + h) * p.head_dim + d;
  store_floats<true>(dst, 4, o);
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------

// Keys per split for `num_splits` splits of [0, max_seqlen_k): a multiple of the tile, at least
// one tile. Idempotent: splits_for(chunk_for(s)) == s' and chunk_for(s') == chunk_for(s).
inline int64_t chunk_for(int64_t max_seqlen_k, int64_t num_splits, int tile_n) {
  const int64_t keys = ceil_div<int64_t>(max_seqlen_k, num_splits > 0 ? num_splits : 1);
  return keys > 0 ? round_up<int64_t>(keys, tile_n) : tile_n;
}

inline int64_t splits_for(int64_t max_seqlen_k, int64_t chunk) {
  return max_seqlen_k > 0 ? ceil_div(max_seqlen_k, chunk) : 1;
}

// Split count (FlashAttention-2's heuristic, with occupancy-aware slots):
//   - base_blocks = B * Hkv * row_tiles blocks already fill >= 80% of the resident slots
//     (SMs x blocks per SM): one split, no workspace traffic, no combine launch;
//   - else, among the split counts that change the chunk size, up to max_splits, the smallest
//     whose wave efficiency (waves / ceil(waves), waves = blocks / slots) is within 85% of the
//     best: enough blocks to fill the GPU without a mostly idle last wave.
// max_splits keeps a split at >= min_chunk keys (see the launcher) so the partial outputs stay a
// small fraction of the K/V bytes.
inline int64_t choose_num_splits(int64_t base_blocks, int64_t slots, int64_t max_seqlen_k,
                                 int64_t min_chunk, int tile_n) {
  const int64_t max_splits =
      std::min<int64_t>(128, std::max<int64_t>(1, max_seqlen_k / std::max<int64_t>(min_chunk, 1)));
  if (max_splits <= 1 || base_blocks <= 0 || base_blocks * 5 >= slots * 4) return 1;
  auto efficiency = [&](int64_t s) {
    const double waves = static_cast<double>(base_blocks * s) / static_cast<double>(slots);
    return waves / static_cast<double>(ceil_div<int64_t>(base_blocks * s, slots));
  };
  auto eligible = [&](int64_t s) {  // s splits give a different chunk size than s - 1 splits
    return s == 1 || chunk_for(max_seqlen_k, s, tile_n) != chunk_for(max_seqlen_k, s - 1, tile_n);
  };
  double best = 0.0;
  for (int64_t s = 1; s <= max_splits; ++s) {
    if (eligible(s)) best = std::max(best, efficiency(s));
  }
  for (int64_t s = 1; s <= max_splits; ++s) {
    if (eligible(s) && efficiency(s) >= 0.85 * best) return s;
  }
  return 1;
}

// Raises the kernel's dynamic shared memory limit, once per device and instantiation (see
// set_max_dynamic_smem_once).
template <typename T, int kD, int kRows>
cudaError_t prepare_split_kernel() {
  static std::atomic<uint64_t> smem_configured{0};
  return set_max_dynamic_smem_once(split_kernel<T, kD, kRows>, Config<T, kD, kRows>::kSmemBytes,
                                   smem_configured);
}

// Resident blocks per SM of split_kernel<T, kD, kRows> on `device` (the current device), cached.
template <typename T, int kD, int kRows>
cudaError_t blocks_per_sm(int device, int* count) {
  static std::atomic<int> cache[64];  // zero-initialised (static storage)
  if (device >= 0 && device < 64) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      *count = cached;
      return cudaSuccess;
    }
  }
  TF_CUDA_TRY((prepare_split_kernel<T, kD, kRows>()));
  int n = 0;
  TF_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &n, split_kernel<T, kD, kRows>, kThreads, Config<T, kD, kRows>::kSmemBytes));
  n = std::max(n, 1);
  if (device >= 0 && device < 64) cache[device].store(n, std::memory_order_relaxed);
  *count = n;
  return cudaSuccess;
}

// Launches the split kernel and, with several splits, the combine kernel. `p` is complete
// (num_splits and chunk consistent: chunk = chunk_for(S_max, num_splits), num_splits =
// splits_for(S_max, chunk)).
template <typename T, int kD, int kRows>
cudaError_t launch(const Params<T>& p, cudaStream_t stream) {
  using C = Config<T, kD, kRows>;
  TF_CUDA_TRY((prepare_split_kernel<T, kD, kRows>()));
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.kv_heads * p.num_splits * p.row_tiles;
  if (blocks <= 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  TF_LAUNCH_KERNEL(static_cast<unsigned>(blocks), kThreads, C::kSmemBytes, stream,
                   split_kernel<T, kD, kRows>)(p);
  TF_CUDA_TRY(cudaGetLastError());
  if (p.num_splits == 1) return cudaSuccess;

  CombineParams<T> cp;
  cp.o_part = p.o_part;
  cp.lse_part = p.lse_part;
  cp.out = p.out;
  cp.rows = static_cast<int64_t>(p.batch) * p.q_heads * p.seqlen_q;
  cp.rows_per_batch = p.q_heads * p.seqlen_q;
  cp.seqlen_q = p.seqlen_q;
  cp.q_heads = p.q_heads;
  cp.head_dim = kD;
  cp.num_splits = p.num_splits;
  const int64_t combine_blocks = ceil_div<int64_t>(cp.rows * (kD / 4), kCombineThreads);
  if (combine_blocks > 0x7fffffff) return cudaErrorInvalidValue;
  TF_LAUNCH_KERNEL(static_cast<unsigned>(combine_blocks), kCombineThreads, 0, stream,
                   combine_kernel<T>)(cp);
  return cudaGetLastError();
}

}  // namespace decode_attn
}  // namespace thinkfuse
