// Rotary position embedding (half-split, transformers' rotate_half) of q and k in one launch,
// forward and backward, in two forms sharing one rotation:
//   rope:         cos/sin computed in the kernel, in float32, from position_ids * inv_freq, times
//                 attention_scaling; Ministral 3's query temperature fused on q.
//   apply_rotary: cos/sin loaded from [B or 1, S, D] tensors (transformers' apply_rotary_pos_emb).
//
// One head x = (x1, x2) (its two halves), with c/s the cos/sin of each half's columns:
//   out1 = x1 * c1 - x2 * s1,   out2 = x2 * c2 + x1 * s2
// in float32, rounded once to the output dtype. A rotation is orthogonal, so the backward is the
// same rotation with (s1, s2) replaced by (-s2, -s1); for rope (c1 = c2, s1 = s2) that is sin
// negated. Forward and backward share the kernels (kernels/rope.py does the same).
//
// Work decomposition. The grid loops over tiles of tokens_per_tile consecutive tokens (token =
// b * S + s) x one column range of the half (col_tile wide; a single range unless head_dim >
// 2 * kMaxColTile). A tile is processed in phases separated by block barriers:
//   1. per token: the token's offsets in q and k (and cos/sin) and, for rope, its position and
//      query temperature, into shared memory (one int64 division per token, none per element);
//   2. rope only: cos/sin of every (token, column) of the tile into a shared table, so each
//      angle is evaluated once per token however many heads share it;
//   3. chunks: kVec consecutive columns of one head of one token plus the kVec partner columns
//      of the other half. Consecutive threads take consecutive chunks of a head, then the next
//      head (q's heads first, then k's, so GQA needs nothing special): a warp reads whole
//      contiguous head rows. Aligned views move a chunk with one 16-byte access per half.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "thinkfuse/common.cuh"

namespace thinkfuse {
namespace rotary {

// ---------------------------------------------------------------------------------------------
// Launch-shape constants.
// ---------------------------------------------------------------------------------------------

constexpr int kThreads = 256;
// Columns of a half handled by one tile: bounds the cos/sin table and the int32 chunk indices.
constexpr int kMaxColTile = 1024;
// Entries of each of the rope kernel's shared cos and sin tables (16 KiB together).
constexpr int kTableFloats = 2048;
// Tokens of one tile (size of the per-token shared arrays).
constexpr int kMaxTokensPerTile = 64;
// A tile takes enough tokens for about this many chunks: a few per thread between barriers.
constexpr int kTargetChunksPerTile = 4 * kThreads;
// Fewer tokens per tile when the launch would otherwise have fewer tiles than this (decode):
// enough blocks to occupy every SM of a large GPU.
constexpr int64_t kMinTiles = 256;
constexpr int64_t kMaxGridBlocks = 0x7fffffff;

static_assert(kMaxColTile % kVecSize<float> == 0 && kMaxColTile % kVecSize<__half> == 0,
              "column tiles must hold whole chunks");
static_assert(kTableFloats >= kMaxColTile, "a tile of one token must fit the cos/sin table");

// ---------------------------------------------------------------------------------------------
// Parameters.
// ---------------------------------------------------------------------------------------------

// q [B, S, Hq, D] and k [B, S, Hkv, D] (unit stride on D, strides in elements) and their
// contiguous outputs.
template <typename InT, typename OutT>
struct QKParams {
  const InT* q;
  const InT* k;
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t k_stride_b, k_stride_s, k_stride_h;
  OutT* q_out;
  OutT* k_out;
  int64_t seq_len;
  int64_t tokens;  // B * S
  int q_heads;
  int k_heads;
  int half;  // D / 2
};

// How rope computes cos/sin. Scalars are float32, as the Triton kernel receives them.
struct RopeAngles {
  const void* positions;  // [B or 1, S], int32 or int64
  bool positions_int64;
  int64_t pos_stride_b;  // 0 when one row of positions is shared by the batch
  int64_t pos_stride_s;
  const float* inv_freq;  // [D / 2]
  float attention_scaling;
  float sin_sign;  // +1 forward, -1 backward (inverse rotation)
  float llama4_beta;  // 0: no query temperature
  float llama4_original_max;
};

// cos/sin tensors [B or 1, S, D] of apply_rotary, unit stride on D.
template <typename CosT>
struct CosSinParams {
  const CosT* cos;
  const CosT* sin;
  int64_t cos_stride_b, cos_stride_s;  // stride_b 0 when the batch broadcasts
  int64_t sin_stride_b, sin_stride_s;
  bool inverse;  // backward: (s1, s2) -> (-s2, -s1)
};

struct Tiling {
  int tokens_per_tile;
  int col_tile;   // columns of a half per tile
  int col_tiles;  // column tiles per token tile
  int64_t tiles;  // token tiles * col_tiles
};

struct Tile {
  int64_t token0;  // first token
  int num_tokens;
  int col0;  // first column within a half
  int num_cols;
};

__host__ __device__ __forceinline__ Tile tile_at(const Tiling& tiling, int64_t tokens, int half,
                                                 int64_t index) {
  const int64_t token_tile = index / tiling.col_tiles;
  const int col_tile = static_cast<int>(index - token_tile * tiling.col_tiles);
  Tile tile;
  tile.token0 = token_tile * tiling.tokens_per_tile;
  const int64_t tokens_left = tokens - tile.token0;
  tile.num_tokens =
      tokens_left < tiling.tokens_per_tile ? static_cast<int>(tokens_left) : tiling.tokens_per_tile;
  tile.col0 = col_tile * tiling.col_tile;
  const int cols_left = half - tile.col0;
  tile.num_cols = cols_left < tiling.col_tile ? cols_left : tiling.col_tile;
  return tile;
}

// ---------------------------------------------------------------------------------------------
// Device helpers.
// ---------------------------------------------------------------------------------------------

// Calls f(t, h, col) for every chunk of the tile, block-strided: t the token within the tile,
// h the head (q's 0..Hq-1, then k's), col the chunk's first column within the tile.
template <int kVec, class F>
__device__ __forceinline__ void for_each_chunk(int num_tokens, int heads, int num_cols, F&& f) {
  const int chunks = ceil_div(num_cols, kVec);
  const int per_token = heads * chunks;
  const int total = num_tokens * per_token;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const int t = i / per_token;
    const int in_token = i - t * per_token;
    const int h = in_token / chunks;
    f(t, h, (in_token - h * chunks) * kVec);
  }
}

// Rotates one chunk: x points at the chunk's first column in the first half, out likewise; the
// partner columns lie `half` elements further. Without kAligned only `valid` columns are touched.
template <bool kAligned, int kVec, typename InT, typename OutT>
__device__ __forceinline__ void rotate_chunk(const InT* x, OutT* out, int half, int valid,
                                             const float (&cos1)[kVec], const float (&sin1)[kVec],
                                             const float (&cos2)[kVec],
                                             const float (&sin2)[kVec]) {
  float x1[kVec], x2[kVec];
  load_floats<kAligned>(x, valid, x1);
  load_floats<kAligned>(x + half, valid, x2);
  float out1[kVec], out2[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    out1[i] = x1[i] * cos1[i] - x2[i] * sin1[i];
    out2[i] = x2[i] * cos2[i] + x1[i] * sin2[i];
  }
  store_floats<kAligned>(out, valid, out1);
  store_floats<kAligned>(out + half, valid, out2);
}

// Rotates chunk (t, h, col) of the tile: head h of q (h < Hq) or of k, with cos/sin given for
// q and for k (they differ by the query temperature only).
template <bool kAligned, int kVec, typename InT, typename OutT>
__device__ __forceinline__ void rotate_qk_chunk(const QKParams<InT, OutT>& p, const Tile& tile,
                                                int64_t q_base, int64_t k_base, int t, int h,
                                                int col, const float (&cos1)[kVec],
                                                const float (&sin1)[kVec],
                                                const float (&cos2)[kVec],
                                                const float (&sin2)[kVec]) {
  const int64_t token = tile.token0 + t;
  const int col_in_half = tile.col0 + col;
  const int valid = tile.num_cols - col;
  const int64_t head_dim = 2 * static_cast<int64_t>(p.half);
  if (h < p.q_heads) {
    rotate_chunk<kAligned>(p.q + q_base + h * p.q_stride_h + col_in_half,
                           p.q_out + (token * p.q_heads + h) * head_dim + col_in_half, p.half,
                           valid, cos1, sin1, cos2, sin2);
  } else {
    const int kh = h - p.q_heads;
    rotate_chunk<kAligned>(p.k + k_base + kh * p.k_stride_h + col_in_half,
                           p.k_out + (token * p.k_heads + kh) * head_dim + col_in_half, p.half,
                           valid, cos1, sin1, cos2, sin2);
  }
}

// position_ids[b, s] as float32: transformers' position_ids.float() (round to nearest, so
// positions past 2^24 round exactly as there).
__device__ __forceinline__ float load_position(const RopeAngles& a, int64_t b, int64_t s) {
  const int64_t offset = b * a.pos_stride_b + s * a.pos_stride_s;
  return a.positions_int64 ? static_cast<float>(static_cast<const int64_t*>(a.positions)[offset])
                           : static_cast<float>(static_cast<const int32_t*>(a.positions)[offset]);
}

// Accuracy under --use_fast_math. setup.py compiles with --use_fast_math, and nvcc then turns
// the single-precision sinf/cosf/sincosf/logf (and x / y) into the SFU approximations __sinf,
// __cosf, __logf, __fdividef: __sinf/__cosf have no argument reduction (abs. error grows with
// |x|; useless at the ~1e6 rad angles of long contexts) and __logf is a few ulp off. The flag
// does not touch double-precision functions or the explicitly rounded intrinsics (__fmul_rn,
// __fadd_rn, __fdiv_rn), so:
//   - sin/cos: the float32 angle (exactly transformers' float32 product) is widened to double,
//     which is exact, and evaluated with double sincos (full-range argument reduction, < 1 ulp
//     of double), then rounded to float32: within 1 ulp of float32 of the true value, as good as
//     or better than the accurate sinf/cosf torch and Triton (libdevice) use. Doubles cost
//     little here: the table evaluates each angle once per token, shared by every head.
//   - log: double log of the (exactly representable) float32 argument, rounded to float32.
//   - floor(pos / L0): __fdiv_rn, the IEEE quotient torch's CPU path and Triton's div_rn use,
//     so floor() sees the correctly rounded value at bucket boundaries.
//   - the __f*_rn intrinsics also keep -fmad from contracting these steps into FMAs, so each is
//     rounded where torch rounds it.
__device__ __forceinline__ void rope_cos_sin(const RopeAngles& a, float position, int col,
                                             float& cos_out, float& sin_out) {
  const float angle = __fmul_rn(position, a.inv_freq[col]);
  double sin_d, cos_d;
  sincos(static_cast<double>(angle), &sin_d, &cos_d);
  cos_out = __fmul_rn(static_cast<float>(cos_d), a.attention_scaling);
  sin_out = __fmul_rn(__fmul_rn(static_cast<float>(sin_d), a.attention_scaling), a.sin_sign);
}

// Ministral 3's query temperature 1 + beta * log(1 + floor(pos / L0)), float32 as torch computes
// it (each step rounded); exactly 1 when beta is 0. See rope_cos_sin for the accuracy choices.
__device__ __forceinline__ float query_temperature(const RopeAngles& a, float position) {
  if (a.llama4_beta == 0.0f) return 1.0f;
  const float bucket = floorf(__fdiv_rn(position, a.llama4_original_max));
  const float log_arg = __fadd_rn(1.0f, bucket);
  const float log_value = static_cast<float>(log(static_cast<double>(log_arg)));
  return __fadd_rn(1.0f, __fmul_rn(a.llama4_beta, log_value));
}

// ---------------------------------------------------------------------------------------------
// Kernels.
// ---------------------------------------------------------------------------------------------

template <bool kAligned, typename T>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(const QKParams<T, T> p, const RopeAngles a, const Tiling tiling) {
  constexpr int kVec = kVecSize<T>;
  __shared__ float cos_table[kTableFloats];
  __shared__ float sin_table[kTableFloats];
  __shared__ int64_t q_base[kMaxTokensPerTile];
  __shared__ int64_t k_base[kMaxTokensPerTile];
  __shared__ float position[kMaxTokensPerTile];
  __shared__ float q_scale[kMaxTokensPerTile];

  for (int64_t index = blockIdx.x; index < tiling.tiles; index += gridDim.x) {
    const Tile tile = tile_at(tiling, p.tokens, p.half, index);

    for (int t = threadIdx.x; t < tile.num_tokens; t += blockDim.x) {
      const int64_t token = tile.token0 + t;
      const int64_t b = token / p.seq_len;
      const int64_t s = token - b * p.seq_len;
      q_base[t] = b * p.q_stride_b + s * p.q_stride_s;
      k_base[t] = b * p.k_stride_b + s * p.k_stride_s;
      const float pos = load_position(a, b, s);
      position[t] = pos;
      q_scale[t] = query_temperature(a, pos);
    }
    __syncthreads();

    const int table_entries = tile.num_tokens * tile.num_cols;
    for (int i = threadIdx.x; i < table_entries; i += blockDim.x) {
      const int t = i / tile.num_cols;
      const int c = i - t * tile.num_cols;
      float cos_v, sin_v;
      rope_cos_sin(a, position[t], tile.col0 + c, cos_v, sin_v);
      cos_table[t * tiling.col_tile + c] = cos_v;
      sin_table[t * tiling.col_tile + c] = sin_v;
    }
    __syncthreads();

    for_each_chunk<kVec>(
        tile.num_tokens, p.q_heads + p.k_heads, tile.num_cols, [&](int t, int h, int col) {
          const float* cos_row = cos_table + t * tiling.col_tile + col;
          const float* sin_row = sin_table + t * tiling.col_tile + col;
          // Past the tile's last column (only without kAligned) the table holds stale entries:
          // read zeros instead (those columns are neither loaded nor stored).
          const float scale = h < p.q_heads ? q_scale[t] : 1.0f;
          float cos_v[kVec], sin_v[kVec];
#pragma unroll
          for (int i = 0; i < kVec; ++i) {
            const bool in_tile = kAligned || col + i < tile.num_cols;
            // As the Triton kernel: q's cos/sin are multiplied by the temperature (exact when
            // it is 1), then q is rotated with them.
            cos_v[i] = in_tile ? cos_row[i] * scale : 0.0f;
            sin_v[i] = in_tile ? sin_row[i] * scale : 0.0f;
          }
          rotate_qk_chunk<kAligned>(p, tile, q_base[t], k_base[t], t, h, col, cos_v, sin_v, cos_v,
                                    sin_v);
        });
    // The next tile overwrites the shared arrays.
    __syncthreads();
  }
}

template <bool kAligned, typename InT, typename CosT, typename OutT>
__global__ void __launch_bounds__(kThreads)
    apply_rotary_kernel(const QKParams<InT, OutT> p, const CosSinParams<CosT> cs,
                        const Tiling tiling) {
  constexpr int kVec = kVecSize<InT>;
  __shared__ int64_t q_base[kMaxTokensPerTile];
  __shared__ int64_t k_base[kMaxTokensPerTile];
  __shared__ int64_t cos_base[kMaxTokensPerTile];
  __shared__ int64_t sin_base[kMaxTokensPerTile];

  for (int64_t index = blockIdx.x; index < tiling.tiles; index += gridDim.x) {
    const Tile tile = tile_at(tiling, p.tokens, p.half, index);

    for (int t = threadIdx.x; t < tile.num_tokens; t += blockDim.x) {
      const int64_t token = tile.token0 + t;
      const int64_t b = token / p.seq_len;
      const int64_t s = token - b * p.seq_len;
      q_base[t] = b * p.q_stride_b + s * p.q_stride_s;
      k_base[t] = b * p.k_stride_b + s * p.k_stride_s;
      cos_base[t] = b * cs.cos_stride_b + s * cs.cos_stride_s;
      sin_base[t] = b * cs.sin_stride_b + s * cs.sin_stride_s;
    }
    __syncthreads();

    for_each_chunk<kVec>(
        tile.num_tokens, p.q_heads + p.k_heads, tile.num_cols, [&](int t, int h, int col) {
          // Both halves of cos/sin are loaded: transformers' repeat them, but any tensor is
          // accepted. Re-reads by the token's other heads hit L1/L2.
          const int col_in_half = tile.col0 + col;
          const int valid = tile.num_cols - col;
          const CosT* cos_row = cs.cos + cos_base[t] + col_in_half;
          const CosT* sin_row = cs.sin + sin_base[t] + col_in_half;
          float cos1[kVec], cos2[kVec], sin1[kVec], sin2[kVec];
          load_floats<kAligned>(cos_row, valid, cos1);
          load_floats<kAligned>(cos_row + p.half, valid, cos2);
          load_floats<kAligned>(sin_row, valid, sin1);
          load_floats<kAligned>(sin_row + p.half, valid, sin2);
          if (cs.inverse) {
#pragma unroll
            for (int i = 0; i < kVec; ++i) {
              const float s1 = sin1[i];
              sin1[i] = -sin2[i];
              sin2[i] = -s1;
            }
          }
          rotate_qk_chunk<kAligned>(p, tile, q_base[t], k_base[t], t, h, col, cos1, sin1, cos2,
                                    sin2);
        });
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Host-side launch configuration.
// ---------------------------------------------------------------------------------------------

// May X be moved as AlignedArray<X, N> at ptr plus any combination of these element strides?
template <typename X, int N>
inline bool vec_aligned(const X* ptr, std::initializer_list<int64_t> strides) {
  constexpr int64_t kAlign = alignof(AlignedArray<X, N>);
  if (reinterpret_cast<std::uintptr_t>(ptr) % kAlign != 0) return false;
  for (const int64_t stride : strides) {
    if ((stride * static_cast<int64_t>(sizeof(X))) % kAlign != 0) return false;
  }
  return true;
}

// Chunks of kVec = 16 / sizeof(InT) columns move as vectors when a half is a whole number of
// chunks (so are column tiles, and the second half starts on a chunk) and q, k and the outputs
// are aligned for them at every (b, s, h). The contiguous outputs' rows are D = 2 * half apart.
template <typename InT, typename OutT>
inline bool qk_vectorisable(const QKParams<InT, OutT>& p) {
  constexpr int kVec = kVecSize<InT>;
  return p.half % kVec == 0 &&
         vec_aligned<InT, kVec>(p.q, {p.q_stride_b, p.q_stride_s, p.q_stride_h}) &&
         vec_aligned<InT, kVec>(p.k, {p.k_stride_b, p.k_stride_s, p.k_stride_h}) &&
         vec_aligned<OutT, kVec>(p.q_out, {}) && vec_aligned<OutT, kVec>(p.k_out, {});
}

// heads * ceil(half / vec) must be well inside int range (the caller bounds heads and half).
inline Tiling plan_tiles(int64_t tokens, int heads, int half, int vec, bool cos_sin_table) {
  Tiling tiling;
  tiling.col_tile = std::min(half, kMaxColTile);
  tiling.col_tiles = ceil_div(half, tiling.col_tile);
  const int64_t chunks_per_token =
      static_cast<int64_t>(heads) * ceil_div(tiling.col_tile, vec);
  int64_t per_tile = ceil_div<int64_t>(kTargetChunksPerTile, chunks_per_token);
  per_tile = std::min<int64_t>(per_tile, kMaxTokensPerTile);
  if (cos_sin_table) per_tile = std::min<int64_t>(per_tile, kTableFloats / tiling.col_tile);
  per_tile = std::min<int64_t>(per_tile, tokens * tiling.col_tiles / kMinTiles);
  tiling.tokens_per_tile = static_cast<int>(std::max<int64_t>(per_tile, 1));
  tiling.tiles = ceil_div<int64_t>(tokens, tiling.tokens_per_tile) * tiling.col_tiles;
  return tiling;
}

inline bool nothing_to_do(int64_t tokens, int heads, int half) {
  return tokens == 0 || heads == 0 || half == 0;
}

template <typename T>
cudaError_t rope(const QKParams<T, T>& p, const RopeAngles& a, cudaStream_t stream) {
  const int heads = p.q_heads + p.k_heads;
  if (nothing_to_do(p.tokens, heads, p.half)) return cudaSuccess;
  const Tiling tiling = plan_tiles(p.tokens, heads, p.half, kVecSize<T>, true);
  const unsigned grid = static_cast<unsigned>(std::min(tiling.tiles, kMaxGridBlocks));
  if (qk_vectorisable(p)) {
    TF_LAUNCH_KERNEL(grid, kThreads, 0, stream, rope_kernel<true>)(p, a, tiling);
  } else {
    TF_LAUNCH_KERNEL(grid, kThreads, 0, stream, rope_kernel<false>)(p, a, tiling);
  }
  return cudaGetLastError();
}

template <typename InT, typename CosT, typename OutT>
cudaError_t apply_rotary(const QKParams<InT, OutT>& p, const CosSinParams<CosT>& cs,
                         cudaStream_t stream) {
  constexpr int kVec = kVecSize<InT>;
  const int heads = p.q_heads + p.k_heads;
  if (nothing_to_do(p.tokens, heads, p.half)) return cudaSuccess;
  const Tiling tiling = plan_tiles(p.tokens, heads, p.half, kVec, false);
  const unsigned grid = static_cast<unsigned>(std::min(tiling.tiles, kMaxGridBlocks));
  const bool aligned =
      qk_vectorisable(p) &&
      vec_aligned<CosT, kVec>(cs.cos, {cs.cos_stride_b, cs.cos_stride_s}) &&
      vec_aligned<CosT, kVec>(cs.sin, {cs.sin_stride_b, cs.sin_stride_s});
  if (aligned) {
    TF_LAUNCH_KERNEL(grid, kThreads, 0, stream, apply_rotary_kernel<true>)(p, cs, tiling);
  } else {
    TF_LAUNCH_KERNEL(grid, kThreads, 0, stream, apply_rotary_kernel<false>)(p, cs, tiling);
  }
  return cudaGetLastError();
}

}  // namespace rotary
}  // namespace thinkfuse
