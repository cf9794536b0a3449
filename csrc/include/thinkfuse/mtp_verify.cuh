// Speculative verification of K draft tokens against the target's K+1 logits rows, with the
// semantics of kernels/mtp_verify.py and thinkfuse.reference.mtp_verify:
//   greedy (temperature 0): per position, the argmax over V ranked as torch.argmax ranks: NaN
//            above every number (+inf included), ties (NaN with NaN too) to the lowest id; accept
//            while the draft equals it; the argmax at the first mismatch (or at position K) is
//            the final token.
//   sampled: per position, the softmax statistics of logits / temperature (max m, sum of
//            exp(x - m), the same sum without the draft id); accept iff u * p(draft) < q(draft)
//            (p = 1 for a deterministic draft; an id outside [0, V) is rejected); at the first
//            rejection draw from max(q - p, 0) (deterministic draft: q without the draft id),
//            after K acceptances from q_K: one inverse-CDF draw over V in id order with
//            threshold uniforms[:, K] * total weight; when no weight is positive, the argmax.
//
// Two paths (mtp_verify's `splits`): the one-block-per-row kernels described here (splits 0),
// and the split path at the end of this file (vocabulary rows cut into slices, one block each).
//
// One-block path: one launch, one block per batch row. Every pass over a vocabulary row is
// block-wide (threads stride over V, then a block all-reduce), so rows of 152k ids cost one read
// per pass. The sequential accept/reject walk is done redundantly by every thread on
// block-reduced values (bitwise the same in every thread), so the decisions need no broadcast;
// the block then writes the row's tokens. The inverse CDF walks tiles of kThreads * kItems
// consecutive ids: each thread sums its kItems, a block exclusive scan places them, and the first
// crossing is a block min.
// float32 math like the Triton kernel; exp is exp_accurate (--use_fast_math would make expf the
// approximate __expf) and divisions are IEEE (__fdiv_rn), as in torch.
//
// The per-thread building blocks (the chunked argmax scan, the online softmax update, the
// acceptance test, the inverse CDF, the row write) are shared by both paths, so that the split
// path computes exactly what the one-block path does wherever its results must match bitwise.
#pragma once

#include <cstdint>

#include "thinkfuse/common.cuh"
#include "thinkfuse/logprobs.cuh"  // load_chunk, safe_shift
#include "thinkfuse/swiglu.cuh"    // exp_accurate

namespace thinkfuse {
namespace mtp {

using swiglu::exp_accurate;

constexpr int kThreads = 512;
constexpr int kItems = 8;  // consecutive ids per thread per inverse-CDF tile

// (value, index) pair for the block argmax.
struct ArgMax {
  float v;
  int i;
};

// torch.argmax's ranking of values: NaN above every number (+inf included), all NaNs of equal
// rank. Float compares are false for NaN, hence the explicit NaN terms (a compare or two per id
// in the argmax scan, which is bound by its loads). A NaN mapped to +inf instead would tie with
// +inf, and the lower id would win where torch picks the NaN.
__device__ __forceinline__ bool ranks_above(float a, float b) {
  return a > b || (a != a && b == b);
}

__device__ __forceinline__ bool ranks_equal(float a, float b) {
  return a == b || (a != a && b != b);
}

// The higher-ranked value, the lower index on equal rank (the first NaN, the first maximum).
__device__ __forceinline__ ArgMax better(const ArgMax& a, const ArgMax& b) {
  return (ranks_above(a.v, b.v) || (ranks_equal(a.v, b.v) && a.i < b.i)) ? a : b;
}

// Softmax statistics: max m, total = sum exp(x - m), excl = the same sum without one id.
struct SoftmaxStats {
  float m;
  float total;
  float excl;
};

__device__ __forceinline__ SoftmaxStats combine_stats(SoftmaxStats a, SoftmaxStats b) {
  const float m = fmaxf(a.m, b.m);
  const float shift = logprobs::safe_shift(m);
  const float sa = exp_accurate(a.m - shift);
  const float sb = exp_accurate(b.m - shift);
  SoftmaxStats out;
  out.m = m;
  out.total = a.total * sa + b.total * sb;
  out.excl = a.excl * sa + b.excl * sb;
  return out;
}

// Online softmax, shared by both paths: re-centres the running sums on a larger max m (false
// for a NaN m, which never becomes the max).
__device__ __forceinline__ void raise_max(SoftmaxStats& st, float m) {
  if (m > st.m) {
    const float scale = exp_accurate(st.m - m);
    st.total *= scale;
    st.excl *= scale;
    st.m = m;
  }
}

// Adds the term exp(x - shift) of id `id` to the running sums (to excl unless id is `excluded`).
// shift is safe_shift(st.m).
__device__ __forceinline__ void add_term(SoftmaxStats& st, float x, float shift, int id,
                                         int64_t excluded) {
  const float e = exp_accurate(x - shift);
  st.total += e;
  if (id != excluded) st.excl += e;
}

template <typename T>
struct Params {
  const int64_t* draft;  // [B, K] contiguous
  const T* logits;       // [B, K+1, V], unit stride on V
  int64_t stride_lb;
  int64_t stride_lk;
  const void* probs;  // [B, K, V] in probs_dtype, or nullptr
  DType probs_dtype;
  int64_t stride_pb;
  int64_t stride_pk;
  const float* uniforms;  // [B, K+1] contiguous, or nullptr when greedy
  int64_t* tokens;        // [B, K+1]
  int64_t* num_accepted;  // [B]
  int k;
  int vocab;
  float temperature;
};

// One block reads a whole vocabulary row, so each thread must keep several loads in flight to
// hide DRAM latency: a plain strided loop issues one load per iteration (measured on an H100:
// ~120 us per greedy position of 151680 bf16 logits, 0.24 ms at K=1, host-timed; latency-bound).
constexpr int kLoadsInFlight = 8;   // scalar loads per thread per step (softmax statistics)
constexpr int kChunksInFlight = 4;  // chunks of kVecSize<T> ids per thread per step (argmax)

// x[u] = row[base + u * blockDim.x] as float, -inf past V: all loads issued before any is used.
template <typename T>
__device__ __forceinline__ void load_strided(const T* row, int base, int vocab,
                                             float (&x)[kLoadsInFlight]) {
#pragma unroll
  for (int u = 0; u < kLoadsInFlight; ++u) {
    const int c = base + u * static_cast<int>(blockDim.x);
    x[u] = c < vocab ? to_float(row[c]) : -INFINITY;
  }
}

// x[u] = the kVecSize<T> ids at row[base + u * step], as floats (-inf past len), all loads
// issued before any is used. With kAligned (row 16-byte aligned; base a multiple of kVecSize<T>)
// every full chunk is one 16-byte load.
template <bool kAligned, typename T, int kChunks, int kVec>
__device__ __forceinline__ void load_chunks(const T* row, int base, int len, int step,
                                            float (&x)[kChunks][kVec]) {
#pragma unroll
  for (int u = 0; u < kChunks; ++u) {
    const int col = base + u * step;
    if (col < len) {
      logprobs::load_chunk<kAligned>(row + col, len - col, x[u]);
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) x[u][i] = -INFINITY;
    }
  }
}

// One id of a thread's argmax scan: value x at id lo + col, skipped unless col < len, ranked
// as torch.argmax (ranks_above). Each thread visits its ids in increasing order, so the strict
// ranks_above keeps the lowest id on ties (its first NaN once it has seen one).
__device__ __forceinline__ void argmax_step(ArgMax& best, float x, int lo, int col, int len) {
  if (col < len && ranks_above(x, best.v)) best = ArgMax{x, lo + col};
}

// Block argmax of row[lo:hi) (ids are row indices; torch.argmax's ranking: the first NaN if
// any, else the lowest id of the maximum), for both paths. The row is read in chunks of
// kVecSize<T> consecutive ids, kChunksInFlight chunks per thread before any is compared.
// `threads` is blockDim.x: the split kernels pass their compile-time block size, so that the
// strides are constants there. With kAligned, row + lo must be 16-byte aligned (split slices
// start at multiples of kSliceAlign ids) and every full chunk is one 16-byte load.
template <bool kAligned, typename T>
__device__ ArgMax range_argmax(const T* row, int lo, int hi, int threads) {
  constexpr int kVec = kVecSize<T>;
  const int step = threads * kVec;
  const int len = hi - lo;
  ArgMax best{-INFINITY, 0};
  for (int base = static_cast<int>(threadIdx.x) * kVec; base < len; base += kChunksInFlight * step) {
    float x[kChunksInFlight][kVec];
    load_chunks<kAligned>(row + lo, base, len, step, x);
#pragma unroll
    for (int u = 0; u < kChunksInFlight; ++u) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const int col = base + u * step + i;
        argmax_step(best, x[u][i], lo, col, len);
      }
    }
  }
  // A thread (or slice) that saw no value above -inf keeps id 0, which only wins when the whole
  // row is -inf (torch.argmax's answer is then 0 as well).
  return block_allreduce(best, [](const ArgMax& a, const ArgMax& b) { return better(a, b); });
}

// The argmax of a whole vocabulary row (the one-block kernels).
template <bool kAligned, typename T>
__device__ __forceinline__ int block_argmax(const T* row, int vocab) {
  return range_argmax<kAligned>(row, 0, vocab, static_cast<int>(blockDim.x)).i;
}

// Softmax statistics of row / temperature, excl leaving out id `excluded` (-1: none). m is 0
// when the row is all -inf (so exp(x - m) stays 0 there), as Triton's _softmax_stats.
template <typename T>
__device__ SoftmaxStats block_softmax_stats(const T* row, int vocab, float temperature,
                                            int64_t excluded) {
  SoftmaxStats st{-INFINITY, 0.0f, 0.0f};
  for (int base = threadIdx.x; base < vocab; base += kLoadsInFlight * blockDim.x) {
    float raw[kLoadsInFlight];
    load_strided(row, base, vocab, raw);
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u) {
      const int c = base + u * static_cast<int>(blockDim.x);
      if (c >= vocab) break;
      // One id at a time: a rescale whenever the max grows (slice_stats rescales once per group).
      const float x = __fdiv_rn(raw[u], temperature);
      raise_max(st, x);
      add_term(st, x, logprobs::safe_shift(st.m), c, excluded);
    }
  }
  st = block_allreduce(st, [](const SoftmaxStats& a, const SoftmaxStats& b) {
    return combine_stats(a, b);
  });
  st.m = logprobs::safe_shift(st.m);
  return st;
}

// probs[i] as float; the dtype is uniform over the block, so the switch does not diverge.
__device__ __forceinline__ float load_prob(const void* probs, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16:
      return to_float(static_cast<const __half*>(probs)[i]);
    case DType::kBFloat16:
      return to_float(static_cast<const __nv_bfloat16*>(probs)[i]);
    default:
      return static_cast<const float*>(probs)[i];
  }
}

// The draft-probs row of position j of batch row b (elements of probs_dtype), or nullptr
// without draft probabilities.
template <typename T>
__device__ __forceinline__ const void* probs_row_at(const Params<T>& p, int64_t b, int j) {
  if (p.probs == nullptr) return nullptr;
  const int64_t offset = b * p.stride_pb + static_cast<int64_t>(j) * p.stride_pk;
  return p.probs_dtype == DType::kFloat32
             ? static_cast<const void*>(static_cast<const float*>(p.probs) + offset)
             : static_cast<const void*>(static_cast<const uint16_t*>(p.probs) + offset);
}

// The acceptance test of the draft at position j < K of batch row b, given that position's max
// m (after safe_shift) and normaliser `total`: u_j * p(draft) < q(draft), p = 1 for a
// deterministic draft; an id outside [0, V) is rejected. Both paths decide with it.
template <typename T>
__device__ __forceinline__ bool draft_accepted(const Params<T>& p, int64_t b, int j, float m,
                                               float total) {
  const int64_t draft = p.draft[b * p.k + j];
  const bool valid = draft >= 0 && draft < p.vocab;
  const T* position = p.logits + b * p.stride_lb + j * p.stride_lk;
  const float x_draft = valid ? __fdiv_rn(to_float(position[draft]), p.temperature) : -INFINITY;
  const float q_draft = __fdiv_rn(exp_accurate(x_draft - m), total);
  float p_draft = 1.0f;
  if (p.probs != nullptr && valid) {
    p_draft = load_prob(p.probs, p.probs_dtype, b * p.stride_pb + j * p.stride_pk + draft);
  }
  return valid && p.uniforms[b * (p.k + 1) + j] * p_draft < q_draft;
}

// Weight of id c in the draw: exp(x - m) (target), 0 for the excluded id (rejected
// deterministic draft), or max(exp(x - m) / total - p, 0) on a rejection with draft probs.
template <typename T>
__device__ __forceinline__ float draw_weight(const T* row, const void* probs_row,
                                             DType probs_dtype, int c, float temperature,
                                             float m, float total, int64_t excluded,
                                             bool residual) {
  const float e = exp_accurate(__fdiv_rn(to_float(row[c]), temperature) - m);
  if (probs_row != nullptr) {
    if (!residual) return e;
    // fmaxf returns the number when one operand is NaN: a NaN weight counts as 0.
    return fmaxf(__fdiv_rn(e, total) - load_prob(probs_row, probs_dtype, c), 0.0f);
  }
  return c == excluded ? 0.0f : e;
}

// Block sum of fn(c) over c in [lo, hi): each thread adds its ids (lo + threadIdx.x, then every
// blockDim.x) in increasing order, then a block all-reduce. Every thread must call it.
template <typename Fn>
__device__ __forceinline__ float range_sum(const Fn& fn, int lo, int hi) {
  float acc = 0.0f;
  for (int c = lo + static_cast<int>(threadIdx.x); c < hi; c += blockDim.x) acc += fn(c);
  return block_allreduce(acc, [](float a, float b) { return a + b; });
}

// Exclusive prefix sum over the block of x (block size a multiple of 32); also returns the
// block total. Every thread must call it.
__device__ __forceinline__ float block_exclusive_scan(float x, float& block_total) {
  __shared__ float warp_totals[kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  float inclusive = x;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const float y = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += y;
  }
  // The lane below's inclusive sum (not inclusive - x, which would round differently).
  float exclusive = __shfl_up_sync(0xffffffffu, inclusive, 1);
  if (lane == 0) exclusive = 0.0f;
  if (lane == kWarpSize - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  float before = 0.0f;
  float total = 0.0f;
  for (int w = 0; w < num_warps; ++w) {
    if (w < warp) before += warp_totals[w];
    total += warp_totals[w];
  }
  __syncthreads();
  block_total = total;
  return before + exclusive;
}

// (id, running CDF before it) for the inverse CDF; the lower / higher id wins.
struct IdCarry {
  int id;
  float before;
};

constexpr int kNoId = 0x7fffffff;

// Inverse CDF over items [lo, hi) of weight fn(c) >= 0 (NaN counts as no weight), starting from
// the running sum `carry`: the first item of positive weight whose running sum exceeds
// `threshold`, with the running sum before it; when rounding leaves none, the last item of
// positive weight; id -1 when no weight is positive. Tiles of blockDim.x * kTileItems
// consecutive items: each thread sums its kTileItems, a block exclusive scan places them, and
// the first crossing is a block min. Both paths draw with it (the one-block kernel over the whole
// row, the split path over slice masses, then inside one slice). Every thread must call it and
// gets the same answer.
template <int kTileItems, typename Fn>
__device__ IdCarry range_inverse_cdf(const Fn& fn, int lo, int hi, float carry, float threshold) {
  const int tile = static_cast<int>(blockDim.x) * kTileItems;
  IdCarry last{-1, 0.0f};
  for (int start = lo; start < hi; start += tile) {
    const int first = start + static_cast<int>(threadIdx.x) * kTileItems;
    float w[kTileItems];
    float local = 0.0f;
#pragma unroll
    for (int i = 0; i < kTileItems; ++i) {
      const int c = first + i;
      w[i] = c < hi ? fn(c) : 0.0f;
      local += w[i];
    }
    float tile_total;
    float cdf = carry + block_exclusive_scan(local, tile_total);
    IdCarry found{kNoId, 0.0f};
    IdCarry positive{-1, 0.0f};
#pragma unroll
    for (int i = 0; i < kTileItems; ++i) {
      const float before = cdf;
      cdf += w[i];
      if (w[i] > 0.0f) {
        positive = IdCarry{first + i, before};
        if (cdf > threshold && found.id == kNoId) found = IdCarry{first + i, before};
      }
    }
    found = block_allreduce(found, [](const IdCarry& a, const IdCarry& b) {
      return a.id < b.id ? a : b;
    });
    if (found.id != kNoId) return found;
    positive = block_allreduce(positive, [](const IdCarry& a, const IdCarry& b) {
      return a.id > b.id ? a : b;
    });
    if (positive.id > last.id) last = positive;
    carry += tile_total;
  }
  return last;
}

// Row b's tokens: the accepted drafts, then `final_token` (unless !write_final: the split path's
// kernel 2 writes that slot), then -1; and num_accepted. Block-wide.
template <typename T>
__device__ void write_row(const Params<T>& p, int64_t b, int accepted, int final_token,
                          bool write_final) {
  int64_t* tokens = p.tokens + b * (p.k + 1);
  for (int j = threadIdx.x; j <= p.k; j += blockDim.x) {
    if (j < accepted) {
      tokens[j] = p.draft[b * p.k + j];
    } else if (j == accepted) {
      if (write_final) tokens[j] = final_token;
    } else {
      tokens[j] = -1;
    }
  }
  if (threadIdx.x == 0) p.num_accepted[b] = accepted;
}

template <bool kAligned, typename T>
__global__ void __launch_bounds__(kThreads) greedy_kernel(const Params<T> p) {
  const int64_t b = blockIdx.x;
  const T* logits_row = p.logits + b * p.stride_lb;
  int accepted = 0;
  int final_token = -1;
  for (int j = 0; j < p.k; ++j) {
    const int target = block_argmax<kAligned>(logits_row + j * p.stride_lk, p.vocab);
    if (p.draft[b * p.k + j] != target) {
      final_token = target;
      break;
    }
    ++accepted;
  }
  if (accepted == p.k) {
    final_token = block_argmax<kAligned>(logits_row + p.k * p.stride_lk, p.vocab);
  }
  write_row(p, b, accepted, final_token, true);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sampled_kernel(const Params<T> p) {
  const int64_t b = blockIdx.x;
  const T* logits_row = p.logits + b * p.stride_lb;
  int accepted = 0;
  bool rejected = false;
  SoftmaxStats st{0.0f, 0.0f, 0.0f};
  int64_t excluded = -1;
  for (int j = 0; j < p.k; ++j) {
    const int64_t draft = p.draft[b * p.k + j];
    const SoftmaxStats st_j =
        block_softmax_stats(logits_row + j * p.stride_lk, p.vocab, p.temperature, draft);
    if (!draft_accepted(p, b, j, st_j.m, st_j.total)) {
      rejected = true;
      st = st_j;
      excluded = draft;
      break;
    }
    ++accepted;
  }
  if (!rejected) st = block_softmax_stats(logits_row + p.k * p.stride_lk, p.vocab, p.temperature, -1);

  const T* position = logits_row + accepted * p.stride_lk;
  // The draft-probs row at the final position is only read on a rejection (accepted < K: the
  // row exists).
  const void* probs_row = probs_row_at(p, b, accepted);
  const auto weight = [&](int c) {
    return draw_weight(position, probs_row, p.probs_dtype, c, p.temperature, st.m, st.total,
                       excluded, rejected);
  };
  float weight_total;
  if (p.probs != nullptr) {
    weight_total = rejected ? range_sum(weight, 0, p.vocab) : st.total;
  } else {
    weight_total = st.excl;
  }
  const float threshold = p.uniforms[b * (p.k + 1) + p.k] * weight_total;
  // A NaN or +inf in the row (after the division by the temperature) makes the normaliser NaN,
  // hence every normalised weight NaN: the reference (nan_to_num) then has nothing to draw from
  // and takes the argmax. (Skipping the draw keeps the finite unnormalised weights from being
  // drawn from instead.)
  int final_token = st.total != st.total
                        ? -1
                        : range_inverse_cdf<kItems>(weight, 0, p.vocab, 0.0f, threshold).id;
  // Nothing to draw from (all -inf, NaN or +inf logits): the argmax, as greedy would.
  if (final_token < 0) final_token = block_argmax<false>(position, p.vocab);
  write_row(p, b, accepted, final_token, true);
}

template <typename T>
cudaError_t verify(const Params<T>& p, int64_t batch, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(batch));
  if (p.uniforms == nullptr) {
    const bool aligned = rows_are_16B_aligned(p.logits, p.stride_lb) &&
                         rows_are_16B_aligned(p.logits, p.stride_lk);
    if (aligned) {
      TF_LAUNCH_KERNEL(grid, kThreads, 0, stream, greedy_kernel<true>)(p);
    } else {
      TF_LAUNCH_KERNEL(grid, kThreads, 0, stream, greedy_kernel<false>)(p);
    }
  } else {
    TF_LAUNCH_KERNEL(grid, kThreads, 0, stream, sampled_kernel)(p);
  }
  return cudaGetLastError();
}


// =============================================================================================
// Split path: many blocks per batch row (mtp_verify's num_splits != 1).
//
// The one-block-per-row kernels above are latency-bound when B is small: one block reads all
// K+1 vocabulary rows of its batch row (H100, B=1, K=1, V=151680 bf16: 32.8 us for ~600 KB). Here
// each vocabulary row (b, j) is cut into `splits` slices of `slice` consecutive ids (a multiple
// of kSliceAlign, so every slice start keeps the row's 16-byte alignment), and
//
//   kernel 1, grid B * (K+1) * splits blocks (one 1-D index, b-major, then j, then the slice, so
//     the blocks of one row are dispatched together): each block reduces its slice to partials
//     in the workspace: greedy (max of the raw logits in torch.argmax's ranking, its lowest id,
//     NaN kept as NaN so that it outranks +inf across slices too); sampled
//     the same plus the softmax statistics of logits / temperature (slice max m_s, sum of
//     exp(x - m_s), the same sum without the draft id of position j < K). Thread 0 stores them,
//     __threadfence(), then takes a ticket from the row's counter (atomicAdd). The block that
//     draws the last ticket of its row (all (K+1) * splits partials are then visible: the
//     writers' fences precede their tickets, and the last block fences after its own) does the
//     sequential accept walk over the K+1 positions from the partials (read with __ldcg, at the
//     L2, never a stale L1 line), writes tokens / num_accepted, and puts the counter back to 0.
//     Sampling: the final token is drawn there too (bonus, or correction of a deterministic
//     draft): the slice masses follow from the partials (mass_s = sum_s * exp(m_s - m)), an
//     inverse CDF over the masses picks the slice and a second one inside that slice (the only
//     logits this block re-reads) picks the id.
//   kernel 2 (sampled with draft_probs only; its blocks exit at once for rows that do not need
//     it): a correction drawn from max(q - p, 0) needs the row's global max and normaliser
//     before any slice mass can be formed, so kernel 1's last block stores them and the final
//     position; blocks (b, slice) sum the residual weights of their slice, and the last one of
//     the row (second counter, same protocol) locates the slice and the id as above.
//
// Launches: a cudaMemsetAsync of the 2 * B counters, kernel 1, and kernel 2 when there are draft
// probabilities; all on the caller's stream, no host synchronisation, capturable in a CUDA graph
// (a replay re-runs the memset, and each last block also puts its counter back to 0, so a
// persistent workspace would stay valid too).
//
// Exactness against the one-block kernels (same uniforms):
//   - greedy: bit-identical. The max is order-independent and every reduction (per thread in
//     increasing id order with a strict ranks_above, across threads, across slices) keeps the
//     lowest id among equal maxima, with the same NaN-aware ranking as there.
//   - sampled: the same float32 formulas per element (x = logit / T with an IEEE division,
//     exp_accurate); the max m is the same value; the sums (normaliser Z, slice masses, the
//     running CDF) are added in a different order (per slice, then across slices), so they
//     can differ from the one-block kernel's in the last bits, and so can u * p < q at a
//     boundary and the id picked when u * W lands within a rounding error of a CDF step. Both
//     kernels implement the same exact rejection-sampling scheme (accept min(1, q/p), draw the
//     correction from normalise(max(q - p, 0)), the bonus from q_K); the only departure from the
//     exact distribution, in either, is float32 rounding of sums of non-negative terms (a
//     relative error of order V * 2^-24 at worst, far less in practice), and the CDF walked is
//     monotone, so every id of positive weight keeps an interval of the right length up to that
//     rounding. Tokens therefore match the one-block kernel and the float64 reference except on
//     such boundary events (probability ~1e-7 per decision).
//   - degenerate rows as there: a NaN or +inf anywhere in the final position's row (normaliser
//     NaN) emits the argmax of the raw logits; no positive weight emits the argmax; when rounding
//     leaves no crossing, the last id of positive weight (here: of the chosen slice).
//
// Early exit (skipping the blocks of positions after a rejection, as the one-block kernels
// stop reading) is not done: a position's verdict exists only once all its slices are in, and
// at small B all blocks run in one wave, so nothing would be skipped; at large B it could save
// the reads of rejected rows' later positions, at the price of a per-row flag that blocks poll
// before reading. Left for measurement on a GPU.
// =============================================================================================

constexpr int kSplitThreads = 256;
constexpr int kSplitWarps = kSplitThreads / kWarpSize;
// Slice starts are multiples of 8 ids: 16 bytes of bf16/fp16, 32 of fp32.
constexpr int kSliceAlign = 8;
// The heuristic's smallest slice: one 16-byte load per thread of bf16.
constexpr int kMinHeuristicSlice = kSplitThreads * 8;
// The heuristic's target: this many blocks per SM in kernel 1 (about one wave of 256-thread
// blocks with room to spare; more slices only add partials to reduce).
constexpr int kTargetBlocksPerSm = 4;
constexpr int kSplitItems = 8;  // consecutive ids per thread per tile of the in-slice draw
constexpr int kMassItems = 4;   // slices per thread per tile when locating the slice
// The heuristic's largest slice when sampling: the finishing block walks one slice for the draw,
// kSplitThreads * kSplitItems ids per step (a few block barriers each), so at most 8 steps.
constexpr int kMaxSampledSlice = 8 * kSplitThreads * kSplitItems;

// Host: ids per slice for `splits` requested slices of a vocabulary row. ceil(V / slice) is the
// number of slices actually used; feeding that number back gives the same slice (a fixed point).
inline int64_t split_slice(int64_t vocab, int64_t splits) {
  return round_up<int64_t>(ceil_div<int64_t>(vocab, splits), kSliceAlign);
}

// Device pointers into the workspace (all 4-byte words). R = B * (K+1) rows, S slices.
struct SplitWorkspace {
  int* counters;     // [B] kernel 1's tickets per row; 0 between launches
  int* counters2;    // [B] kernel 2's tickets per row; 0 between launches
  float* part_v;     // [R * S] slice max of the raw logits in torch.argmax's ranking (NaN kept)
  int* part_i;       // [R * S] its lowest id (0 for an all -inf slice)
  float* part_m;     // [R * S] sampled: slice max of logits / T (-inf for an all -inf slice)
  float* part_total; // [R * S] sampled: sum of exp(x - m_s) over the slice
  float* part_excl;  // [R * S] sampled: the same without the draft id (positions j < K)
  float* mass;       // [B * S] sampled: residual mass of each slice (kernel 2)
  int* row_pos;      // [B] sampled: position of the final token (kernel 1 -> kernel 2)
  float* row_m;      // [B] its max of logits / T (0 when all -inf)
  float* row_z;      // [B] its normaliser
  int* row_fallback; // [B] its argmax, emitted when nothing can be drawn
  int* row_status;   // [B] 1: kernel 2 draws the final token of the row; 0: done by kernel 1
};

// Host: lays the workspace out from `base` (nullptr: sizes only) and returns its size in 4-byte
// words. Offsets are computed as integers; pointers are formed only from a real base.
inline int64_t layout_split_workspace(void* base, int64_t batch, int64_t k, int64_t splits,
                                      bool sampled, SplitWorkspace* ws) {
  const int64_t parts = batch * (k + 1) * splits;
  int64_t offset = 0;
  auto take = [&](int64_t words) {
    const int64_t at = offset;
    offset += words;
    return at;
  };
  const int64_t counters = take(batch);
  const int64_t counters2 = take(batch);
  const int64_t part_v = take(parts);
  const int64_t part_i = take(parts);
  int64_t part_m = 0, part_total = 0, part_excl = 0, mass = 0;
  int64_t row_pos = 0, row_m = 0, row_z = 0, row_fallback = 0, row_status = 0;
  if (sampled) {
    part_m = take(parts);
    part_total = take(parts);
    part_excl = take(parts);
    mass = take(batch * splits);
    row_pos = take(batch);
    row_m = take(batch);
    row_z = take(batch);
    row_fallback = take(batch);
    row_status = take(batch);
  }
  if (base != nullptr && ws != nullptr) {
    int* const ints = static_cast<int*>(base);
    float* const floats = static_cast<float*>(base);
    ws->counters = ints + counters;
    ws->counters2 = ints + counters2;
    ws->part_v = floats + part_v;
    ws->part_i = ints + part_i;
    ws->part_m = sampled ? floats + part_m : nullptr;
    ws->part_total = sampled ? floats + part_total : nullptr;
    ws->part_excl = sampled ? floats + part_excl : nullptr;
    ws->mass = sampled ? floats + mass : nullptr;
    ws->row_pos = sampled ? ints + row_pos : nullptr;
    ws->row_m = sampled ? floats + row_m : nullptr;
    ws->row_z = sampled ? floats + row_z : nullptr;
    ws->row_fallback = sampled ? ints + row_fallback : nullptr;
    ws->row_status = sampled ? ints + row_status : nullptr;
  }
  return offset;
}

template <typename T>
struct SplitParams {
  Params<T> p;
  SplitWorkspace ws;
  int splits;  // slices per vocabulary row
  int slice;   // ids per slice (the last one may be shorter)
};

// Per-slice partials of the sampled kernel: softmax statistics and the raw argmax.
struct SliceStats {
  SoftmaxStats soft;
  ArgMax best;
};

// No slice yet: the identity of combine_slices.
__device__ __forceinline__ SliceStats no_slices() {
  return SliceStats{{-INFINITY, 0.0f, 0.0f}, {-INFINITY, 0}};
}

__device__ __forceinline__ SliceStats combine_slices(const SliceStats& a, const SliceStats& b) {
  return SliceStats{combine_stats(a.soft, b.soft), better(a.best, b.best)};
}


// Chunks in flight per thread in slice_stats: the per-element IEEE division and exp make that
// loop compute-heavy, and 4 chunks of 8 (bf16) spill on sm_90a.
constexpr int kStatsChunks = 2;

// Softmax statistics of row[lo:hi) / temperature (excl leaves out id `excluded`, -1: none) and
// the raw argmax, from one read. Chunked online softmax: one rescale per kStatsChunks chunks
// (block_softmax_stats rescales per id, hence the different sums; the argmax is the same).
template <bool kAligned, typename T>
__device__ SliceStats slice_stats(const T* row, int lo, int hi, float temperature,
                                  int64_t excluded) {
  constexpr int kVec = kVecSize<T>;
  constexpr int kStep = kSplitThreads * kVec;
  const int len = hi - lo;
  SliceStats st = no_slices();
  for (int base = static_cast<int>(threadIdx.x) * kVec; base < len; base += kStatsChunks * kStep) {
    float x[kStatsChunks][kVec];
    load_chunks<kAligned>(row + lo, base, len, kStep, x);
    float chunk_max = -INFINITY;
#pragma unroll
    for (int u = 0; u < kStatsChunks; ++u) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const int col = base + u * kStep + i;
        // In the same pass as the division: separate passes cost registers (spills on sm_90a).
        argmax_step(st.best, x[u][i], lo, col, len);
        // x / T, as the one-block kernel (IEEE division); past the slice: -inf (no weight).
        const float z = col < len ? __fdiv_rn(x[u][i], temperature) : -INFINITY;
        x[u][i] = z;
        if (z > chunk_max) chunk_max = z;  // false for NaN: NaN never becomes the max
      }
    }
    raise_max(st.soft, chunk_max);
    const float shift = logprobs::safe_shift(st.soft.m);
#pragma unroll
    for (int u = 0; u < kStatsChunks; ++u) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const int col = base + u * kStep + i;
        if (col < len) add_term(st.soft, x[u][i], shift, lo + col, excluded);
      }
    }
  }
  return block_allreduce(st, [](const SliceStats& a, const SliceStats& b) {
    return combine_slices(a, b);
  });
}

// Ticket protocol: thread 0 has stored this block's partials. Returns true in every thread of
// the block that arrives last among `expected` blocks sharing `counter`; that block may then
// read every partial (with __ldcg).
__device__ __forceinline__ bool arrive_last(int* counter, int expected) {
  __shared__ int last;
  if (threadIdx.x == 0) {
    __threadfence();  // release: the partials before the ticket
    const int ticket = atomicAdd(counter, 1);
    last = ticket == expected - 1 ? 1 : 0;
  }
  __syncthreads();
  const bool is_last = last != 0;
  if (is_last) __threadfence();  // acquire: the partials after the ticket
  return is_last;
}

// The draw of one final token from per-slice masses mass(s) (s < splits) and per-id weights
// weight(c) (c < vocab), threshold u * (sum of the masses): locate the slice by the masses, then
// the id inside it, continuing the running sum. -1 when no weight is positive. Block-wide.
template <typename MassFn, typename WeightFn>
__device__ int split_draw(int splits, int slice, int vocab, float u, const MassFn& mass,
                          const WeightFn& weight) {
  const float threshold = u * range_sum(mass, 0, splits);
  const IdCarry where = range_inverse_cdf<kMassItems>(mass, 0, splits, 0.0f, threshold);
  if (where.id < 0) return -1;
  const int lo = where.id * slice;
  const int hi = min(lo + slice, vocab);
  IdCarry token = range_inverse_cdf<kSplitItems>(weight, lo, hi, where.before, threshold);
  // A slice of positive mass whose ids, recomputed one by one, all underflow to 0 (a rounding
  // corner that should not occur): fall back to the whole row, as the one-block kernel walks it.
  if (token.id < 0) token = range_inverse_cdf<kSplitItems>(weight, 0, vocab, 0.0f, threshold);
  return token.id;
}

// This block's place in kernel 1's grid (one 1-D index, b-major, then position j, then slice
// s) and what it reads and writes there.
template <typename T>
struct SlicePlace {
  int64_t b;
  int j;
  int64_t slot;  // of its partials: (b * (K+1) + j) * splits + s
  const T* row;  // logits row (b, j)
  int lo;        // its slice: ids [lo, hi) of the row
  int hi;
};

template <typename T>
__device__ __forceinline__ SlicePlace<T> place_block(const SplitParams<T>& sp) {
  const Params<T>& p = sp.p;
  const int positions = p.k + 1;
  const int64_t id = blockIdx.x;
  const int64_t rj = id / sp.splits;  // b * (K+1) + j
  const int s = static_cast<int>(id - rj * sp.splits);
  SlicePlace<T> at;
  at.b = rj / positions;
  at.j = static_cast<int>(rj - at.b * positions);
  at.slot = rj * sp.splits + s;
  at.row = p.logits + at.b * p.stride_lb + at.j * p.stride_lk;
  at.lo = s * sp.slice;
  at.hi = min(at.lo + sp.slice, p.vocab);
  return at;
}

// Reduction in one warp of the partials load(s), s < n: lane l folds l, l + 32, ... in increasing
// order, then a butterfly (lane 0's result is the one to use, see warp_allreduce).
template <typename S, typename Load, typename Combine>
__device__ __forceinline__ S warp_fold(int n, S acc, const Load& load, Combine combine) {
  for (int s = threadIdx.x % kWarpSize; s < n; s += kWarpSize) acc = combine(acc, load(s));
  return warp_allreduce(acc, combine);
}

// The sequential accept walk of the block that finishes a batch row, from the partials. Warp w
// judges position j0 + w (groups of kSplitWarps positions, so one L2 round trip per group):
// judge(j, w) is called by every lane of that warp and returns lane 0's verdict (accepted or
// not); lane 0 also leaves what the caller needs from that position in the caller's shared
// arrays at index w. Every thread then walks the same shared verdicts, and at the first position
// not accepted calls take(w) (before the next group overwrites the arrays). Returns that
// position (position K is never accepted, so the last group always ends the walk).
template <typename Judge, typename Take>
__device__ int first_rejection(int positions, const Judge& judge, const Take& take) {
  __shared__ int accept[kSplitWarps];
  const int warp = threadIdx.x / kWarpSize;
  for (int j0 = 0; j0 < positions; j0 += kSplitWarps) {
    const int j = j0 + warp;
    if (j < positions) {
      const bool ok = judge(j, warp);
      if (threadIdx.x % kWarpSize == 0) accept[warp] = ok ? 1 : 0;
    }
    __syncthreads();
    const int n = min(kSplitWarps, positions - j0);
    int w = 0;
    while (w < n && accept[w] != 0) ++w;
    const bool done = w < n;
    if (done) take(w);
    __syncthreads();  // the next group overwrites the shared verdicts
    if (done) return j0 + w;
  }
  return 0;  // not reached (see above)
}

// The last block of row b: greedy walk, on the argmax of each position's partials.
template <typename T>
__device__ void greedy_finish(const SplitParams<T>& sp, int64_t b) {
  const Params<T>& p = sp.p;
  const int positions = p.k + 1;
  __shared__ int target[kSplitWarps];
  const auto judge = [&](int j, int w) {
    const int64_t base = (b * positions + j) * sp.splits;
    const ArgMax best = warp_fold(
        sp.splits, ArgMax{-INFINITY, 0},
        [&](int s) {
          return ArgMax{__ldcg(sp.ws.part_v + base + s), __ldcg(sp.ws.part_i + base + s)};
        },
        [](const ArgMax& a, const ArgMax& c) { return better(a, c); });
    if (threadIdx.x % kWarpSize != 0) return false;  // only lane 0's verdict counts
    target[w] = best.i;
    return j < p.k && p.draft[b * p.k + j] == static_cast<int64_t>(best.i);
  };
  int final_token = -1;
  const int accepted = first_rejection(positions, judge, [&](int w) { final_token = target[w]; });
  write_row(p, b, accepted, final_token, true);
  if (threadIdx.x == 0) sp.ws.counters[b] = 0;  // every ticket of this launch has been drawn
}

// The last block of row b: sampled walk (the one-block kernel's acceptance test on each
// position's combined statistics), then the draw of the final token, or its hand-over to kernel
// 2 for a correction from max(q - p, 0).
template <typename T>
__device__ void sampled_finish(const SplitParams<T>& sp, int64_t b) {
  const Params<T>& p = sp.p;
  const int positions = p.k + 1;
  __shared__ float sh_m[kSplitWarps];
  __shared__ float sh_total[kSplitWarps];
  __shared__ int sh_argmax[kSplitWarps];
  const auto judge = [&](int j, int w) {
    const int64_t base = (b * positions + j) * sp.splits;
    const SliceStats acc = warp_fold(
        sp.splits, no_slices(),
        [&](int s) {
          return SliceStats{{__ldcg(sp.ws.part_m + base + s), __ldcg(sp.ws.part_total + base + s),
                             __ldcg(sp.ws.part_excl + base + s)},
                            {__ldcg(sp.ws.part_v + base + s), __ldcg(sp.ws.part_i + base + s)}};
        },
        [](const SliceStats& a, const SliceStats& c) { return combine_slices(a, c); });
    if (threadIdx.x % kWarpSize != 0) return false;  // only lane 0's verdict counts
    const float m_j = logprobs::safe_shift(acc.soft.m);
    sh_m[w] = m_j;
    sh_total[w] = acc.soft.total;
    sh_argmax[w] = acc.best.i;
    return j < p.k && draft_accepted(p, b, j, m_j, acc.soft.total);
  };
  float m = 0.0f;
  float z = 0.0f;
  int fallback = 0;
  const int accepted = first_rejection(positions, judge, [&](int w) {
    m = sh_m[w];
    z = sh_total[w];
    fallback = sh_argmax[w];
  });
  const bool rejected = accepted < p.k;
  const bool has_probs = p.probs != nullptr;
  const T* position = p.logits + b * p.stride_lb + static_cast<int64_t>(accepted) * p.stride_lk;
  int final_token = fallback;  // NaN or +inf in the row (z is NaN): the argmax, as one-block
  bool deferred = false;
  if (z == z) {
    if (has_probs && rejected) {
      deferred = true;  // kernel 2: the residual masses need m and z, known only now
    } else {
      // Bonus (weights exp(x - m)) or a rejected deterministic draft (the same without the
      // draft id, whose slice's sum the partials hold as part_excl).
      const int64_t excluded = rejected ? p.draft[b * p.k + accepted] : -1;
      const int64_t base = (b * positions + accepted) * sp.splits;
      const float* sums = rejected ? sp.ws.part_excl : sp.ws.part_total;
      const auto mass = [&](int s) {
        return __ldcg(sums + base + s) * exp_accurate(__ldcg(sp.ws.part_m + base + s) - m);
      };
      const auto weight = [&](int c) {
        return draw_weight(position, nullptr, p.probs_dtype, c, p.temperature, m, z, excluded,
                           false);
      };
      const int drawn = split_draw(sp.splits, sp.slice, p.vocab, p.uniforms[b * positions + p.k],
                                   mass, weight);
      if (drawn >= 0) final_token = drawn;
    }
  }
  write_row(p, b, accepted, final_token, !deferred);
  if (threadIdx.x == 0) {
    sp.ws.row_status[b] = deferred ? 1 : 0;
    if (deferred) {
      sp.ws.row_pos[b] = accepted;
      sp.ws.row_m[b] = m;
      sp.ws.row_z[b] = z;
      sp.ws.row_fallback[b] = fallback;
    }
    sp.ws.counters[b] = 0;
  }
}

template <bool kAligned, typename T>
__global__ void __launch_bounds__(kSplitThreads) split_greedy_kernel(const SplitParams<T> sp) {
  const int positions = sp.p.k + 1;
  const SlicePlace<T> at = place_block(sp);
  const ArgMax best = range_argmax<kAligned>(at.row, at.lo, at.hi, kSplitThreads);
  if (threadIdx.x == 0) {
    sp.ws.part_v[at.slot] = best.v;
    sp.ws.part_i[at.slot] = best.i;
  }
  if (!arrive_last(sp.ws.counters + at.b, positions * sp.splits)) return;
  greedy_finish(sp, at.b);
}

template <bool kAligned, typename T>
__global__ void __launch_bounds__(kSplitThreads) split_sampled_kernel(const SplitParams<T> sp) {
  const Params<T>& p = sp.p;
  const int positions = p.k + 1;
  const SlicePlace<T> at = place_block(sp);
  const int64_t excluded = at.j < p.k ? p.draft[at.b * p.k + at.j] : -1;
  const SliceStats st = slice_stats<kAligned>(at.row, at.lo, at.hi, p.temperature, excluded);
  if (threadIdx.x == 0) {
    sp.ws.part_m[at.slot] = st.soft.m;
    sp.ws.part_total[at.slot] = st.soft.total;
    sp.ws.part_excl[at.slot] = st.soft.excl;
    sp.ws.part_v[at.slot] = st.best.v;
    sp.ws.part_i[at.slot] = st.best.i;
  }
  if (!arrive_last(sp.ws.counters + at.b, positions * sp.splits)) return;
  sampled_finish(sp, at.b);
}

// Kernel 2: correction tokens drawn from max(q - p, 0). Grid B * splits, block (b, s).
template <typename T>
__global__ void __launch_bounds__(kSplitThreads) split_residual_kernel(const SplitParams<T> sp) {
  const Params<T>& p = sp.p;
  const int64_t id = blockIdx.x;
  const int64_t b = id / sp.splits;
  const int s = static_cast<int>(id - b * sp.splits);
  if (sp.ws.row_status[b] != 1) return;  // written by kernel 1; uniform over the block
  const int accepted = sp.ws.row_pos[b];
  const float m = sp.ws.row_m[b];
  const float z = sp.ws.row_z[b];
  const T* position = p.logits + b * p.stride_lb + static_cast<int64_t>(accepted) * p.stride_lk;
  const void* probs_row = probs_row_at(p, b, accepted);
  const auto weight = [&](int c) {
    return draw_weight(position, probs_row, p.probs_dtype, c, p.temperature, m, z, -1, true);
  };
  const int lo = s * sp.slice;
  const float mass = range_sum(weight, lo, min(lo + sp.slice, p.vocab));
  if (threadIdx.x == 0) sp.ws.mass[b * sp.splits + s] = mass;
  if (!arrive_last(sp.ws.counters2 + b, sp.splits)) return;
  const float* masses = sp.ws.mass + b * sp.splits;
  const auto slice_mass = [&](int t) { return __ldcg(masses + t); };
  int token = split_draw(sp.splits, sp.slice, p.vocab, p.uniforms[b * (p.k + 1) + p.k],
                         slice_mass, weight);
  if (token < 0) token = sp.ws.row_fallback[b];  // nothing to draw from: the argmax
  if (threadIdx.x == 0) {
    p.tokens[b * (p.k + 1) + accepted] = token;
    sp.ws.counters2[b] = 0;
  }
}

// Launches the split path: `splits` must be a resolved count (ceil(V / split_slice(V, splits))
// == splits) and the workspace at least layout_split_workspace's size.
template <typename T>
cudaError_t verify_split(const Params<T>& p, int64_t batch, int64_t splits, void* workspace,
                         int64_t workspace_bytes, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  const int64_t slice = split_slice(p.vocab, splits);
  const int64_t rows = batch * (p.k + 1);
  if (splits < 1 || ceil_div<int64_t>(p.vocab, slice) != splits ||
      rows > int64_t{0x7fffffff} / splits) {
    return cudaErrorInvalidValue;
  }
  const bool sampled = p.uniforms != nullptr;
  SplitParams<T> sp;
  sp.p = p;
  const int64_t words = layout_split_workspace(workspace, batch, p.k, splits, sampled, &sp.ws);
  if (workspace == nullptr || workspace_bytes < words * 4) return cudaErrorInvalidValue;
  sp.splits = static_cast<int>(splits);
  sp.slice = static_cast<int>(slice);
  // Both ticket counters (the first 2 * B words) start at 0.
  TF_CUDA_TRY(cudaMemsetAsync(workspace, 0, static_cast<size_t>(2 * batch) * sizeof(int), stream));
  const dim3 grid(static_cast<unsigned>(rows * splits));
  const bool aligned = rows_are_16B_aligned(p.logits, p.stride_lb) &&
                       rows_are_16B_aligned(p.logits, p.stride_lk);
  if (!sampled) {
    if (aligned) {
      TF_LAUNCH_KERNEL(grid, kSplitThreads, 0, stream, split_greedy_kernel<true>)(sp);
    } else {
      TF_LAUNCH_KERNEL(grid, kSplitThreads, 0, stream, split_greedy_kernel<false>)(sp);
    }
    return cudaGetLastError();
  }
  if (aligned) {
    TF_LAUNCH_KERNEL(grid, kSplitThreads, 0, stream, split_sampled_kernel<true>)(sp);
  } else {
    TF_LAUNCH_KERNEL(grid, kSplitThreads, 0, stream, split_sampled_kernel<false>)(sp);
  }
  TF_CUDA_TRY(cudaGetLastError());
  if (p.probs != nullptr && p.k > 0) {
    TF_LAUNCH_KERNEL(dim3(static_cast<unsigned>(batch * splits)), kSplitThreads, 0, stream,
                     split_residual_kernel)(sp);
  }
  return cudaGetLastError();
}

}  // namespace mtp
}  // namespace thinkfuse
