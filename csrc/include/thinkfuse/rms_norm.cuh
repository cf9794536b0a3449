// RMSNorm forward (optionally fused with the residual add) and backward, Hugging Face exact.
//
// Forward, per row of width N:
//   h    = x (+ residual)            the add is rounded to x's dtype, as the eager add is
//   rstd = rsqrt(sum(h^2) / N + eps) float32
//   y    = w * to_XT(h * rstd)       rounded to x's dtype *before* the weight multiply (HF)
// Backward, with n = h * rstd (not rounded) and g = dy * w:
//   dx = rstd * (g - n * mean(g * n)) (+ dh, the gradient arriving on the fused h output)
//   dw = sum over rows of dy * to_XT(n)
//
// Work decomposition: a row is handled by a group of threads, a warp for short rows (several
// rows per block, no block barrier) or the whole block for long ones. A row is cut into chunks
// of kVec = 16 / sizeof(XT) consecutive elements; each thread owns chunks rank, rank + group
// size, ..., so a warp's accesses are contiguous. Aligned rows move a chunk with one 16-byte
// access (kAligned); otherwise element by element, masked at the row end. When the row fits, a
// thread keeps its chunks in registers between the reduction and the output pass (kChunks > 0);
// otherwise the row is read twice (kChunks == kStreamed).
//
// dw without global atomics: the backward grid is persistent; each row group handles a strided
// subset of rows, accumulates dw for its columns privately (registers, or its own workspace row
// for very long rows) and writes one fp32 partial row. A second kernel sums the partials per
// column in a fixed order, so dw is deterministic.
#pragma once

#include <algorithm>
#include <cstdint>

#include "thinkfuse/common.cuh"

namespace thinkfuse {
namespace rms_norm {

// ---------------------------------------------------------------------------------------------
// Launch-shape constants.
// ---------------------------------------------------------------------------------------------

// Elements of a row one thread keeps in registers. The forward caches h and the weight (32
// floats); the backward caches g and n and accumulates dw (48 floats).
constexpr int kItemsPerThread = 16;
// Rows up to this width get a warp each; longer rows a block each.
constexpr int kMaxWarpRowCols = kWarpSize * kItemsPerThread;
// Largest row block: lets a thread use up to 128 registers (the kernels need 60 to 110), so the
// cached rows never spill. Rows wider than kMaxRowBlockThreads * kItemsPerThread are streamed.
constexpr int kMaxRowBlockThreads = 512;
// At least four warps per row: more loads in flight per row, fewer chunks per thread.
constexpr int kMinRowBlockThreads = 128;
// Warps, so rows in flight, per block of the warp-per-row kernels.
constexpr int kWarpsPerBlock = 4;
// Blocks per SM of the persistent backward grid. Each block (or each warp, for short rows)
// writes one partial dw row: more blocks buy occupancy with workspace and reduction work.
constexpr int kBwdBlocksPerSM = 2;
// gridDim.x limit; kernels loop over rows, so capping the grid is always correct.
constexpr int64_t kMaxGridBlocks = 0x7fffffff;
// kChunks value selecting the two-pass kernels (row not cached in registers).
constexpr int kStreamed = 0;

inline bool uses_warp_per_row(int64_t cols) { return cols <= kMaxWarpRowCols; }

// Row groups (warps or whole blocks) per block. In the backward each group owns a partial dw row.
inline int64_t rows_per_block(int64_t cols) {
  return uses_warp_per_row(cols) ? kWarpsPerBlock : 1;
}

// ---------------------------------------------------------------------------------------------
// Thread groups.
// ---------------------------------------------------------------------------------------------

struct WarpPerRow {
  __device__ int rank() const { return threadIdx.x % kWarpSize; }
  __device__ int size() const { return kWarpSize; }
  // This group's index in the grid and the number of groups: rows are dealt out by group.
  __device__ int64_t index() const {
    return static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  }
  __device__ int64_t count() const {
    return static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
  }
  __device__ float sum(float x) const { return warp_reduce_sum(x); }
};

struct BlockPerRow {
  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ int64_t index() const { return blockIdx.x; }
  __device__ int64_t count() const { return gridDim.x; }
  __device__ float sum(float x) const { return block_reduce_sum(x); }
};

// First column of this thread's k-th chunk in the cached layout.
template <int kVec, class Group>
__device__ __forceinline__ int cached_chunk_col(const Group& group, int k) {
  return (k * group.size() + group.rank()) * kVec;
}

template <int kVec>
__device__ __forceinline__ float dot(const float (&a)[kVec], const float (&b)[kVec]) {
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kVec; ++i) sum += a[i] * b[i];
  return sum;
}

// ---------------------------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------------------------

template <typename XT, typename WT, typename OutT>
struct FwdParams {
  const XT* x;
  int64_t x_row_stride;
  const XT* residual;  // nullptr: plain norm
  int64_t res_row_stride;
  const WT* weight;
  OutT* y;      // contiguous [rows, cols]
  XT* h_out;    // contiguous [rows, cols]; written iff residual != nullptr
  float* rstd;  // [rows]
  int64_t rows;
  int cols;
  float eps;
  float inv_cols;  // 1 / cols, rounded once on the host
};

// h for the chunk at col: x, or x + residual rounded to XT. Elements past the row end come out
// as 0, so they add nothing to the sum of squares.
template <bool kAligned, int kVec, typename XT, typename WT, typename OutT>
__device__ __forceinline__ void load_h(const FwdParams<XT, WT, OutT>& p, int64_t row, int col,
                                       float (&h)[kVec]) {
  const int valid = p.cols - col;
  load_floats<kAligned>(p.x + row * p.x_row_stride + col, valid, h);
  if (p.residual != nullptr) {
    float r[kVec];
    load_floats<kAligned>(p.residual + row * p.res_row_stride + col, valid, r);
#pragma unroll
    for (int i = 0; i < kVec; ++i) h[i] = round_to<XT>(h[i] + r[i]);
  }
}

template <bool kAligned, int kVec, typename XT, typename WT, typename OutT>
__device__ __forceinline__ void store_h(const FwdParams<XT, WT, OutT>& p, int64_t row, int col,
                                        const float (&h)[kVec]) {
  store_floats<kAligned>(p.h_out + row * p.cols + col, p.cols - col, h);
}

template <bool kAligned, int kVec, typename XT, typename WT, typename OutT>
__device__ __forceinline__ void store_y(const FwdParams<XT, WT, OutT>& p, int64_t row, int col,
                                        const float (&h)[kVec], const float (&w)[kVec],
                                        float rstd) {
  float y[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) y[i] = w[i] * round_to<XT>(h[i] * rstd);
  store_floats<kAligned>(p.y + row * p.cols + col, p.cols - col, y);
}

template <class Group, typename XT, typename WT, typename OutT>
__device__ __forceinline__ float row_rstd(const FwdParams<XT, WT, OutT>& p, const Group& group,
                                          int64_t row, float thread_sum_squares) {
  const float rstd = rsqrtf(group.sum(thread_sum_squares) * p.inv_cols + p.eps);
  if (group.rank() == 0) p.rstd[row] = rstd;
  return rstd;
}

// Every load of the row (x, residual, weight) is issued before the first store: the pointers
// may alias as far as the compiler knows, so it would not hoist a load above a store itself.
template <bool kAligned, int kChunks, class Group, typename XT, typename WT, typename OutT>
__device__ __forceinline__ void fwd_row_cached(const FwdParams<XT, WT, OutT>& p,
                                               const Group& group, int64_t row) {
  constexpr int kVec = kVecSize<XT>;
  float h[kChunks][kVec];
  float w[kChunks][kVec];
  float sum_squares = 0.0f;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int col = cached_chunk_col<kVec>(group, k);
    if (col < p.cols) {
      load_h<kAligned>(p, row, col, h[k]);
      load_floats<kAligned>(p.weight + col, p.cols - col, w[k]);
      sum_squares += dot(h[k], h[k]);
    }
  }
  if (p.residual != nullptr) {
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int col = cached_chunk_col<kVec>(group, k);
      if (col < p.cols) store_h<kAligned>(p, row, col, h[k]);
    }
  }
  const float rstd = row_rstd(p, group, row, sum_squares);
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int col = cached_chunk_col<kVec>(group, k);
    if (col < p.cols) store_y<kAligned>(p, row, col, h[k], w[k], rstd);
  }
}

template <bool kAligned, class Group, typename XT, typename WT, typename OutT>
__device__ __forceinline__ void fwd_row_streamed(const FwdParams<XT, WT, OutT>& p,
                                                 const Group& group, int64_t row) {
  constexpr int kVec = kVecSize<XT>;
  const int first_col = group.rank() * kVec;
  const int col_step = group.size() * kVec;
  float sum_squares = 0.0f;
  for (int col = first_col; col < p.cols; col += col_step) {
    float h[kVec];
    load_h<kAligned>(p, row, col, h);
    if (p.residual != nullptr) store_h<kAligned>(p, row, col, h);
    sum_squares += dot(h, h);
  }
  const float rstd = row_rstd(p, group, row, sum_squares);
  // With a residual, h is re-read from h_out (one read instead of x and residual); this thread
  // wrote exactly these elements in the first pass, so program order makes them visible.
  const XT* h_src = p.residual != nullptr ? p.h_out + row * p.cols : p.x + row * p.x_row_stride;
  for (int col = first_col; col < p.cols; col += col_step) {
    float h[kVec], w[kVec];
    load_floats<kAligned>(h_src + col, p.cols - col, h);
    load_floats<kAligned>(p.weight + col, p.cols - col, w);
    store_y<kAligned>(p, row, col, h, w, rstd);
  }
}

template <class Group, bool kAligned, int kChunks, typename XT, typename WT, typename OutT>
__global__ void __launch_bounds__(kMaxRowBlockThreads)
    fwd_kernel(const FwdParams<XT, WT, OutT> p) {
  const Group group{};
  for (int64_t row = group.index(); row < p.rows; row += group.count()) {
    if constexpr (kChunks == kStreamed) {
      fwd_row_streamed<kAligned>(p, group, row);
    } else {
      fwd_row_cached<kAligned, kChunks>(p, group, row);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------------------------

template <typename XT, typename WT, typename OutT>
struct BwdParams {
  const OutT* dy;
  int64_t dy_row_stride;
  const XT* h;
  int64_t h_row_stride;
  const WT* weight;
  const float* rstd;
  const XT* dh;       // nullptr, or contiguous [rows, cols], added to dx
  XT* dx;             // contiguous [rows, cols]
  float* dw_partial;  // [row groups in the grid, cols]: one private row per group
  int64_t rows;
  int cols;
  float inv_cols;
};

// dy, g = dy * w and n = h * rstd for the chunk at col (zeros past the row end).
template <bool kAligned, int kVec, typename XT, typename WT, typename OutT>
__device__ __forceinline__ void load_grad_chunk(const BwdParams<XT, WT, OutT>& p, int64_t row,
                                                int col, float rstd, float (&dy)[kVec],
                                                float (&g)[kVec], float (&n)[kVec]) {
  const int valid = p.cols - col;
  float w[kVec];
  load_floats<kAligned>(p.dy + row * p.dy_row_stride + col, valid, dy);
  load_floats<kAligned>(p.h + row * p.h_row_stride + col, valid, n);
  load_floats<kAligned>(p.weight + col, valid, w);
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    g[i] = dy[i] * w[i];
    n[i] *= rstd;
  }
}

// y = w * to_XT(n), so dw sees n rounded exactly as the forward rounded it.
template <typename XT, int kVec>
__device__ __forceinline__ void accumulate_dw(float (&dw)[kVec], const float (&dy)[kVec],
                                              const float (&n)[kVec]) {
#pragma unroll
  for (int i = 0; i < kVec; ++i) dw[i] += dy[i] * round_to<XT>(n[i]);
}

// dx = rstd * (g - n * mean(g * n)) + dh = base - (rstd * mean(g * n)) * n with
// base = rstd * g + dh. Folding g into base right after g * n is accumulated reads dh together
// with the row's other loads, so nothing is loaded after the row's reduction.
template <bool kAligned, int kVec, typename XT, typename WT, typename OutT>
__device__ __forceinline__ void fold_dx_base(const BwdParams<XT, WT, OutT>& p, int64_t row,
                                             int col, float rstd, float (&g)[kVec]) {
  float dh[kVec] = {};
  if (p.dh != nullptr) load_floats<kAligned>(p.dh + row * p.cols + col, p.cols - col, dh);
#pragma unroll
  for (int i = 0; i < kVec; ++i) g[i] = rstd * g[i] + dh[i];
}

template <bool kAligned, int kVec, typename XT, typename WT, typename OutT>
__device__ __forceinline__ void store_dx(const BwdParams<XT, WT, OutT>& p, int64_t row, int col,
                                         float n_scale, const float (&base)[kVec],
                                         const float (&n)[kVec]) {
  float dx[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) dx[i] = base[i] - n_scale * n[i];
  store_floats<kAligned>(p.dx + row * p.cols + col, p.cols - col, dx);
}

template <bool kAligned, int kChunks, int kVec, class Group, typename XT, typename WT,
          typename OutT>
__device__ __forceinline__ void bwd_row_cached(const BwdParams<XT, WT, OutT>& p,
                                               const Group& group, int64_t row,
                                               float (&dw)[kChunks][kVec]) {
  const float rstd = p.rstd[row];
  float g[kChunks][kVec];
  float n[kChunks][kVec];
  float gn = 0.0f;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int col = cached_chunk_col<kVec>(group, k);
    if (col < p.cols) {
      float dy[kVec];
      load_grad_chunk<kAligned>(p, row, col, rstd, dy, g[k], n[k]);
      accumulate_dw<XT>(dw[k], dy, n[k]);
      gn += dot(g[k], n[k]);
      fold_dx_base<kAligned>(p, row, col, rstd, g[k]);
    }
  }
  const float n_scale = rstd * group.sum(gn) * p.inv_cols;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int col = cached_chunk_col<kVec>(group, k);
    if (col < p.cols) store_dx<kAligned>(p, row, col, n_scale, g[k], n[k]);
  }
}

// dw_row is this group's private partial row: every column of it is only ever touched by the
// same thread, so a plain read-modify-write is race free.
template <bool kAligned, class Group, typename XT, typename WT, typename OutT>
__device__ __forceinline__ void bwd_row_streamed(const BwdParams<XT, WT, OutT>& p,
                                                 const Group& group, int64_t row,
                                                 float* dw_row) {
  constexpr int kVec = kVecSize<XT>;
  const int first_col = group.rank() * kVec;
  const int col_step = group.size() * kVec;
  const float rstd = p.rstd[row];
  float gn = 0.0f;
  for (int col = first_col; col < p.cols; col += col_step) {
    float dy[kVec], g[kVec], n[kVec], dw[kVec];
    load_grad_chunk<kAligned>(p, row, col, rstd, dy, g, n);
    gn += dot(g, n);
    load_floats<kAligned>(dw_row + col, p.cols - col, dw);
    accumulate_dw<XT>(dw, dy, n);
    store_floats<kAligned>(dw_row + col, p.cols - col, dw);
  }
  const float n_scale = rstd * group.sum(gn) * p.inv_cols;
  // Second read of dy and h; the row was just read, so this mostly hits L2.
  for (int col = first_col; col < p.cols; col += col_step) {
    float dy[kVec], g[kVec], n[kVec];
    load_grad_chunk<kAligned>(p, row, col, rstd, dy, g, n);
    fold_dx_base<kAligned>(p, row, col, rstd, g);
    store_dx<kAligned>(p, row, col, n_scale, g, n);
  }
}

template <class Group, bool kAligned, int kChunks, typename XT, typename WT, typename OutT>
__global__ void __launch_bounds__(kMaxRowBlockThreads)
    bwd_kernel(const BwdParams<XT, WT, OutT> p) {
  constexpr int kVec = kVecSize<XT>;
  const Group group{};
  float* dw_row = p.dw_partial + group.index() * p.cols;
  if constexpr (kChunks == kStreamed) {
    const float zeros[kVec] = {};
    for (int col = group.rank() * kVec; col < p.cols; col += group.size() * kVec) {
      store_floats<kAligned>(dw_row + col, p.cols - col, zeros);
    }
    for (int64_t row = group.index(); row < p.rows; row += group.count()) {
      bwd_row_streamed<kAligned>(p, group, row, dw_row);
    }
  } else {
    float dw[kChunks][kVec] = {};
    for (int64_t row = group.index(); row < p.rows; row += group.count()) {
      bwd_row_cached<kAligned>(p, group, row, dw);
    }
    // Groups that got no row still write their (zero) partial: the reduction reads them all.
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int col = cached_chunk_col<kVec>(group, k);
      if (col < p.cols) store_floats<kAligned>(dw_row + col, p.cols - col, dw[k]);
    }
  }
}

// dw[col] = sum of the partial rows at col. A warp covers 32 consecutive columns (coalesced
// 128-byte reads); kReduceSlices warps split the partial rows and combine through shared memory.
constexpr int kReduceCols = kWarpSize;
constexpr int kReduceSlices = 16;

template <typename WT>
__global__ void __launch_bounds__(kReduceCols* kReduceSlices)
    dw_reduce_kernel(const float* dw_partial, int64_t num_partials, int cols, WT* dw) {
  __shared__ float slice_sums[kReduceSlices][kReduceCols];
  const int col = blockIdx.x * kReduceCols + threadIdx.x;
  float sum = 0.0f;
  if (col < cols) {
    for (int64_t r = threadIdx.y; r < num_partials; r += kReduceSlices) {
      sum += dw_partial[r * cols + col];
    }
  }
  slice_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.0f;
#pragma unroll
    for (int s = 0; s < kReduceSlices; ++s) total += slice_sums[s][threadIdx.x];
    dw[col] = from_float<WT>(total);
  }
}

// ---------------------------------------------------------------------------------------------
// Host-side launch configuration.
// ---------------------------------------------------------------------------------------------

// How the threads of a launch cover a row of `cols` elements (chunks of kVec).
enum class RowLayout { kWarpCached, kBlockCached, kBlockStreamed };

struct RowPlan {
  RowLayout layout;
  int threads;  // block size
};

inline RowPlan plan_rows(int64_t cols, int vec) {
  if (uses_warp_per_row(cols)) return {RowLayout::kWarpCached, kWarpsPerBlock * kWarpSize};
  const int64_t num_chunks = ceil_div<int64_t>(cols, vec);
  const int chunks_per_thread = kItemsPerThread / vec;
  if (num_chunks > static_cast<int64_t>(kMaxRowBlockThreads) * chunks_per_thread) {
    return {RowLayout::kBlockStreamed, kMaxRowBlockThreads};
  }
  // Smallest block (whole warps, at least kMinRowBlockThreads) in which each thread owns at
  // most chunks_per_thread chunks.
  const int64_t threads = round_up<int64_t>(ceil_div<int64_t>(num_chunks, chunks_per_thread),
                                            kWarpSize);
  return {RowLayout::kBlockCached,
          static_cast<int>(std::max<int64_t>(threads, kMinRowBlockThreads))};
}

template <bool kAligned, typename XT, typename WT, typename OutT>
cudaError_t launch_fwd(const FwdParams<XT, WT, OutT>& p, cudaStream_t stream) {
  constexpr int kVec = kVecSize<XT>;
  constexpr int kChunks = kItemsPerThread / kVec;
  const RowPlan plan = plan_rows(p.cols, kVec);
  const unsigned blocks = static_cast<unsigned>(
      std::min(ceil_div<int64_t>(p.rows, rows_per_block(p.cols)), kMaxGridBlocks));
  switch (plan.layout) {
    case RowLayout::kWarpCached:
      TF_LAUNCH_KERNEL(blocks, plan.threads, 0, stream,
                       fwd_kernel<WarpPerRow, kAligned, kChunks>)(p);
      break;
    case RowLayout::kBlockCached:
      TF_LAUNCH_KERNEL(blocks, plan.threads, 0, stream,
                       fwd_kernel<BlockPerRow, kAligned, kChunks>)(p);
      break;
    case RowLayout::kBlockStreamed:
      TF_LAUNCH_KERNEL(blocks, plan.threads, 0, stream,
                       fwd_kernel<BlockPerRow, kAligned, kStreamed>)(p);
      break;
  }
  return cudaGetLastError();
}

// Vectorised kernels when the width is a whole number of chunks and every row start of every
// tensor is 16-byte aligned; element-wise kernels otherwise (odd widths, unaligned views).
template <typename XT, typename WT, typename OutT>
cudaError_t forward(const FwdParams<XT, WT, OutT>& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const bool aligned =
      p.cols % kVecSize<XT> == 0 && rows_are_16B_aligned(p.x, p.x_row_stride) &&
      rows_are_16B_aligned(p.weight, 0) && rows_are_16B_aligned(p.y, p.cols) &&
      (p.residual == nullptr || (rows_are_16B_aligned(p.residual, p.res_row_stride) &&
                                 rows_are_16B_aligned(p.h_out, p.cols)));
  return aligned ? launch_fwd<true>(p, stream) : launch_fwd<false>(p, stream);
}

// Partial dw rows the backward writes at most: the workspace holds this many rows of cols.
inline int64_t bwd_max_partials(int64_t cols, int sm_count) {
  return static_cast<int64_t>(kBwdBlocksPerSM) * sm_count * rows_per_block(cols);
}

template <bool kAligned, typename XT, typename WT, typename OutT>
cudaError_t launch_bwd(const BwdParams<XT, WT, OutT>& p, unsigned blocks, cudaStream_t stream) {
  constexpr int kVec = kVecSize<XT>;
  constexpr int kChunks = kItemsPerThread / kVec;
  const RowPlan plan = plan_rows(p.cols, kVec);
  switch (plan.layout) {
    case RowLayout::kWarpCached:
      TF_LAUNCH_KERNEL(blocks, plan.threads, 0, stream,
                       bwd_kernel<WarpPerRow, kAligned, kChunks>)(p);
      break;
    case RowLayout::kBlockCached:
      TF_LAUNCH_KERNEL(blocks, plan.threads, 0, stream,
                       bwd_kernel<BlockPerRow, kAligned, kChunks>)(p);
      break;
    case RowLayout::kBlockStreamed:
      TF_LAUNCH_KERNEL(blocks, plan.threads, 0, stream,
                       bwd_kernel<BlockPerRow, kAligned, kStreamed>)(p);
      break;
  }
  return cudaGetLastError();
}

// p.dw_partial must hold bwd_max_partials(p.cols, sm_count) * p.cols floats.
template <typename XT, typename WT, typename OutT>
cudaError_t backward(const BwdParams<XT, WT, OutT>& p, WT* dw, int sm_count,
                     cudaStream_t stream) {
  const int64_t groups_per_block = rows_per_block(p.cols);
  const int64_t blocks = std::min<int64_t>(static_cast<int64_t>(kBwdBlocksPerSM) * sm_count,
                                           ceil_div(p.rows, groups_per_block));
  if (blocks > 0) {
    const bool aligned =
        p.cols % kVecSize<XT> == 0 && rows_are_16B_aligned(p.dy, p.dy_row_stride) &&
        rows_are_16B_aligned(p.h, p.h_row_stride) && rows_are_16B_aligned(p.weight, 0) &&
        rows_are_16B_aligned(p.dx, p.cols) && rows_are_16B_aligned(p.dw_partial, p.cols) &&
        (p.dh == nullptr || rows_are_16B_aligned(p.dh, p.cols));
    const unsigned grid = static_cast<unsigned>(blocks);
    TF_CUDA_TRY(aligned ? launch_bwd<true>(p, grid, stream) : launch_bwd<false>(p, grid, stream));
  }
  // Runs even for rows == 0 (no partials): dw is then written as zeros.
  if (p.cols > 0) {
    const dim3 block(kReduceCols, kReduceSlices);
    const unsigned grid = static_cast<unsigned>(ceil_div(p.cols, kReduceCols));
    TF_LAUNCH_KERNEL(grid, block, 0, stream, dw_reduce_kernel)(
        p.dw_partial, blocks * groups_per_block, p.cols, dw);
  }
  return cudaGetLastError();
}

}  // namespace rms_norm
}  // namespace thinkfuse
