// Speculative verification of K draft tokens against the target's K+1 logits rows, with the
// semantics of kernels/mtp_verify.py and thinkfuse.reference.mtp_verify:
//   greedy (temperature 0): per position, the argmax over V (NaN counts as +inf, ties to the
//            lowest id, as torch.argmax); accept while the draft equals it; the argmax at the
//            first mismatch (or at position K) is the final token.
//   sampled: per position, the softmax statistics of logits / temperature (max m, sum of
//            exp(x - m), the same sum without the draft id); accept iff u * p(draft) < q(draft)
//            (p = 1 for a deterministic draft; an id outside [0, V) is rejected); at the first
//            rejection draw from max(q - p, 0) (deterministic draft: q without the draft id),
//            after K acceptances from q_K: one inverse-CDF draw over V in id order with
//            threshold uniforms[:, K] * total weight; when no weight is positive, the argmax.
//
// One launch, one block per batch row. Every pass over a vocabulary row is block-wide (threads
// stride over V, then a block all-reduce), so rows of 152k ids cost one read per pass. The
// sequential accept/reject walk is done redundantly by every thread on block-reduced values
// (bitwise the same in every thread), so the decisions need no broadcast; thread 0 writes. The
// inverse CDF walks tiles of kThreads * kItems consecutive ids: each thread sums its kItems,
// a block exclusive scan places them, and the first crossing is a block min.
// float32 math like the Triton kernel; exp is exp_accurate (--use_fast_math would make expf the
// approximate __expf) and divisions are IEEE (__fdiv_rn), as in torch.
#pragma once

#include <cstdint>

#include "thinkfuse/common.cuh"
#include "thinkfuse/logprobs.cuh"  // safe_shift
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

  static __device__ __forceinline__ ArgMax shfl_xor(const ArgMax& a, int mask) {
    ArgMax out;
    out.v = __shfl_xor_sync(0xffffffffu, a.v, mask);
    out.i = __shfl_xor_sync(0xffffffffu, a.i, mask);
    return out;
  }
};

// The larger value, the lower index on ties (values are never NaN here).
__device__ __forceinline__ ArgMax better(const ArgMax& a, const ArgMax& b) {
  return (a.v > b.v || (a.v == b.v && a.i < b.i)) ? a : b;
}

struct IntMin {
  int v;
  static __device__ __forceinline__ IntMin shfl_xor(const IntMin& a, int mask) {
    return IntMin{__shfl_xor_sync(0xffffffffu, a.v, mask)};
  }
};

struct IntMax {
  int v;
  static __device__ __forceinline__ IntMax shfl_xor(const IntMax& a, int mask) {
    return IntMax{__shfl_xor_sync(0xffffffffu, a.v, mask)};
  }
};

struct FloatSum {
  float v;
  static __device__ __forceinline__ FloatSum shfl_xor(const FloatSum& a, int mask) {
    return FloatSum{__shfl_xor_sync(0xffffffffu, a.v, mask)};
  }
};

// Softmax statistics: max m, total = sum exp(x - m), excl = the same sum without one id.
struct SoftmaxStats {
  float m;
  float total;
  float excl;

  static __device__ __forceinline__ SoftmaxStats shfl_xor(const SoftmaxStats& a, int mask) {
    SoftmaxStats out;
    out.m = __shfl_xor_sync(0xffffffffu, a.m, mask);
    out.total = __shfl_xor_sync(0xffffffffu, a.total, mask);
    out.excl = __shfl_xor_sync(0xffffffffu, a.excl, mask);
    return out;
  }
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

// Block argmax of row[0:V] (NaN as +inf, ties to the lowest id). The row is read in chunks of
// kVecSize<T> consecutive ids, one 16-byte load each when kAligned (the row start is 16-byte
// aligned), kChunksInFlight chunks per thread before any is compared.
template <bool kAligned, typename T>
__device__ int block_argmax(const T* row, int vocab) {
  constexpr int kVec = kVecSize<T>;
  const int step = static_cast<int>(blockDim.x) * kVec;
  ArgMax best{-INFINITY, 0};
  for (int base = static_cast<int>(threadIdx.x) * kVec; base < vocab; base += kChunksInFlight * step) {
    float x[kChunksInFlight][kVec];
#pragma unroll
    for (int u = 0; u < kChunksInFlight; ++u) {
      const int col = base + u * step;
      if (col < vocab) {
        logprobs::load_chunk<kAligned>(row + col, vocab - col, x[u]);
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) x[u][i] = -INFINITY;
      }
    }
    // Each thread visits its ids in increasing order: strict > keeps the lowest on ties.
#pragma unroll
    for (int u = 0; u < kChunksInFlight; ++u) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const int col = base + u * step + i;
        const float v = x[u][i] != x[u][i] ? INFINITY : x[u][i];
        if (col < vocab && v > best.v) best = ArgMax{v, col};
      }
    }
  }
  // A thread that saw no id > -inf keeps index 0, which only wins when every value is -inf
  // (then the answer is 0 anyway).
  return block_allreduce(best, [](const ArgMax& a, const ArgMax& b) { return better(a, b); }).i;
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
      const float x = __fdiv_rn(raw[u], temperature);
      if (x > st.m) {
        const float scale = exp_accurate(st.m - x);
        st.total *= scale;
        st.excl *= scale;
        st.m = x;
      }
      const float e = exp_accurate(x - logprobs::safe_shift(st.m));
      st.total += e;
      if (c != excluded) st.excl += e;
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

// First id whose running weight sum exceeds `threshold` (only ids of positive weight qualify);
// when rounding leaves none, the last id of positive weight; -1 if there is none.
template <typename T>
__device__ int block_inverse_cdf(const T* row, const void* probs_row, DType probs_dtype,
                                 int vocab, float temperature,
                                 float m, float total, int64_t excluded, bool residual,
                                 float threshold) {
  constexpr int kTile = kThreads * kItems;
  float carry = 0.0f;
  int last_positive = -1;
  for (int start = 0; start < vocab; start += kTile) {
    const int first_id = start + static_cast<int>(threadIdx.x) * kItems;
    float w[kItems];
    float local = 0.0f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int c = first_id + i;
      w[i] = c < vocab ? draw_weight(row, probs_row, probs_dtype, c, temperature, m, total,
                                     excluded, residual)
                       : 0.0f;
      local += w[i];
    }
    float tile_total;
    float cdf = carry + block_exclusive_scan(local, tile_total);
    int found = vocab;
    int positive = -1;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      cdf += w[i];
      if (w[i] > 0.0f) {
        positive = first_id + i;
        if (cdf > threshold && found == vocab) found = first_id + i;
      }
    }
    found = block_allreduce(IntMin{found}, [](const IntMin& a, const IntMin& b) {
              return IntMin{a.v < b.v ? a.v : b.v};
            }).v;
    if (found < vocab) return found;
    positive = block_allreduce(IntMax{positive}, [](const IntMax& a, const IntMax& b) {
                 return IntMax{a.v > b.v ? a.v : b.v};
               }).v;
    last_positive = positive > last_positive ? positive : last_positive;
    carry += tile_total;
  }
  return last_positive;
}

// Block sum of the draw weights (the residual distribution's normaliser).
template <typename T>
__device__ float block_weight_total(const T* row, const void* probs_row, DType probs_dtype,
                                    int vocab,
                                    float temperature, float m, float total, int64_t excluded,
                                    bool residual) {
  float acc = 0.0f;
  for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
    acc += draw_weight(row, probs_row, probs_dtype, c, temperature, m, total, excluded, residual);
  }
  return block_allreduce(FloatSum{acc}, [](const FloatSum& a, const FloatSum& b) {
           return FloatSum{a.v + b.v};
         }).v;
}

template <bool kAligned, typename T>
__global__ void __launch_bounds__(kThreads) greedy_kernel(const Params<T> p) {
  const int64_t b = blockIdx.x;
  const T* logits_row = p.logits + b * p.stride_lb;
  int64_t* tokens = p.tokens + b * (p.k + 1);
  int accepted = 0;
  int final_token = -1;
  for (int j = 0; j < p.k; ++j) {
    const int target = block_argmax<kAligned>(logits_row + j * p.stride_lk, p.vocab);
    const int64_t draft = p.draft[b * p.k + j];
    if (draft != target) {
      final_token = target;
      break;
    }
    if (threadIdx.x == 0) tokens[j] = draft;
    ++accepted;
  }
  if (accepted == p.k) {
    final_token = block_argmax<kAligned>(logits_row + p.k * p.stride_lk, p.vocab);
  }
  if (threadIdx.x == 0) {
    tokens[accepted] = final_token;
    for (int j = accepted + 1; j <= p.k; ++j) tokens[j] = -1;
    p.num_accepted[b] = accepted;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sampled_kernel(const Params<T> p) {
  const int64_t b = blockIdx.x;
  const T* logits_row = p.logits + b * p.stride_lb;
  const float* uniforms = p.uniforms + b * (p.k + 1);
  int64_t* tokens = p.tokens + b * (p.k + 1);
  const bool has_probs = p.probs != nullptr;
  int accepted = 0;
  bool rejected = false;
  SoftmaxStats st{0.0f, 0.0f, 0.0f};
  int64_t excluded = -1;
  for (int j = 0; j < p.k; ++j) {
    const T* position = logits_row + j * p.stride_lk;
    const int64_t draft = p.draft[b * p.k + j];
    const SoftmaxStats st_j = block_softmax_stats(position, p.vocab, p.temperature, draft);
    const bool valid = draft >= 0 && draft < p.vocab;
    const float x_draft =
        valid ? __fdiv_rn(to_float(position[draft]), p.temperature) : -INFINITY;
    const float q_draft = __fdiv_rn(exp_accurate(x_draft - st_j.m), st_j.total);
    float p_draft = 1.0f;
    if (has_probs && valid) {
      p_draft = load_prob(p.probs, p.probs_dtype, b * p.stride_pb + j * p.stride_pk + draft);
    }
    if (valid && uniforms[j] * p_draft < q_draft) {
      if (threadIdx.x == 0) tokens[j] = draft;
      ++accepted;
    } else {
      rejected = true;
      st = st_j;
      excluded = draft;
      break;
    }
  }
  if (!rejected) st = block_softmax_stats(logits_row + p.k * p.stride_lk, p.vocab, p.temperature, -1);

  const T* position = logits_row + accepted * p.stride_lk;
  // Element offset of the draft-probs row at the final position (only read on a rejection, so
  // accepted < K and the row exists).
  const void* probs_row = nullptr;
  if (has_probs) {
    const int64_t offset = b * p.stride_pb + static_cast<int64_t>(accepted) * p.stride_pk;
    probs_row = p.probs_dtype == DType::kFloat32
                    ? static_cast<const void*>(static_cast<const float*>(p.probs) + offset)
                    : static_cast<const void*>(static_cast<const uint16_t*>(p.probs) + offset);
  }
  float weight_total;
  if (has_probs) {
    weight_total = rejected ? block_weight_total(position, probs_row, p.probs_dtype, p.vocab,
                                                 p.temperature,
                                                 st.m, st.total, excluded, rejected)
                            : st.total;
  } else {
    weight_total = st.excl;
  }
  const float threshold = uniforms[p.k] * weight_total;
  // A NaN logit makes the normaliser NaN, hence every normalised weight NaN: the reference
  // (nan_to_num) then has nothing to draw from and takes the argmax. (Skipping the draw keeps
  // the finite unnormalised weights from being drawn from instead.)
  int final_token = st.total != st.total
                        ? -1
                        : block_inverse_cdf(position, probs_row, p.probs_dtype, p.vocab,
                                            p.temperature, st.m, st.total, excluded, rejected,
                                            threshold);
  // Nothing to draw from (all -inf or NaN logits): the argmax, as greedy would.
  if (final_token < 0) final_token = block_argmax<false>(position, p.vocab);
  if (threadIdx.x == 0) {
    tokens[accepted] = final_token;
    for (int j = accepted + 1; j <= p.k; ++j) tokens[j] = -1;
    p.num_accepted[b] = accepted;
  }
}

template <typename T>
cudaError_t verify(const Params<T>& p, int64_t batch, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(batch));
  if (p.uniforms == nullptr) {
    const bool aligned = rows_are_16B_aligned(p.logits, p.stride_lb) &&
                         rows_are_16B_aligned(p.logits, p.stride_lk);
    if (aligned) {
      greedy_kernel<true><<<grid, kThreads, 0, stream>>>(p);
    } else {
      greedy_kernel<false><<<grid, kThreads, 0, stream>>>(p);
    }
  } else {
    sampled_kernel<<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace mtp
}  // namespace thinkfuse
