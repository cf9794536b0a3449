// Per-token log-probabilities log_softmax(logits / T)[token] and the entropy of
// softmax(logits / T), forward and backward, with the semantics of kernels/logprobs.py:
//   forward:  one pass over a row with an online logsumexp. Per thread (then per block) it keeps
//             the running max m, s = sum exp(z - m) and, for the entropy, u = sum exp(z - m) (z - m)
//             (z = logits * (1 / T)), so lse = m + log s and entropy = log s - u / s.
//             logprob = z[token] - lse; a negative token id gives 0 (logprob, entropy and lse)
//             and skips the pass; an id >= V reads nothing and gives NaN.
//   backward: p = exp(z - lse), d logits = (g (onehot - p) - g_H p (log p + H)) / T, written in
//             the logits' dtype; ignored rows (negative id) get zeros.
//
// Work decomposition: one block of kThreads per row (r = b * T + t of a [B, T, V] view with a
// unit stride on V and any strides on B and T). A row is read in chunks of kVec = 16 / sizeof(T)
// consecutive elements, one chunk per thread per step: one 16-byte load when the row starts are
// 16-byte aligned, element-wise loads otherwise and for the row's last, partial chunk. Offsets
// are int64, column indices int (V <= kLogprobsMaxVocab).
//
// Accuracy: the build uses --use_fast_math, which turns expf into __expf, whose error grows with
// |x| (~25 ulp at |x| = 20: the rounding of x * log2(e) is amplified by the exponent). The
// forward's sum s = sum exp(z - m) uses it anyway: the terms where it is inaccurate are tiny next
// to exp(0) = 1 (see fold_chunk). The per-element p of the backward and the rescaling factors go
// through exp_accurate (swiglu.cuh, ~2 ulp, Cody-Waite reduced). logf becomes __logf (lg2.approx: ~2^-22 absolute error), applied once per
// row to s in [1, V]: at most ~1e-7 absolute on lse and the log-probs, well inside the 1e-5
// float32 tolerance. Divisions that reach an output are IEEE (__fdiv_rn).
#pragma once

#include <cstdint>

#include "thinkfuse/common.cuh"
#include "thinkfuse/swiglu.cuh"  // exp_accurate

namespace thinkfuse {

namespace logprobs {

using swiglu::exp_accurate;

constexpr int kThreads = 256;

// Running statistics of the online logsumexp: max m, s = sum exp(z - m), u = sum exp(z - m)(z - m)
// (u only tracked with the entropy). A thread that has seen only -inf has m = -inf and s = 0.
struct LseStats {
  float m;
  float s;
  float u;
};

__device__ __forceinline__ LseStats empty_stats() {
  LseStats st;
  st.m = -INFINITY;
  st.s = 0.0f;
  st.u = 0.0f;
  return st;
}

// The shift used for exp(z - shift): the max, or 0 while the max is still -inf (keeps NaN out).
__device__ __forceinline__ float safe_shift(float m) { return m == -INFINITY ? 0.0f : m; }

// a's statistics re-centred on the max `shift` (>= a.m): scale s and u, and move u's centre:
// sum e^(z-m')(z-m') = scale * (u + (m - m') s). s > 0 implies a finite m; the guard keeps
// 0 * inf out.
template <bool kEntropy>
__device__ __forceinline__ void recentre(LseStats& a, float shift) {
  const float scale = exp_accurate(a.m - shift);
  if constexpr (kEntropy) {
    a.u = scale * (a.u + (a.s > 0.0f ? (a.m - shift) * a.s : 0.0f));
  }
  a.s *= scale;
}

// Commutative merge of two partial statistics (symmetric expression: bitwise the same for
// combine(a, b) and combine(b, a)).
template <bool kEntropy>
__device__ __forceinline__ LseStats combine(LseStats a, LseStats b) {
  const float m = fmaxf(a.m, b.m);
  const float shift = safe_shift(m);
  recentre<kEntropy>(a, shift);
  recentre<kEntropy>(b, shift);
  LseStats out;
  out.m = m;
  out.s = a.s + b.s;
  out.u = kEntropy ? a.u + b.u : 0.0f;
  return out;
}

// Folds n (<= N) values z[0..n) into st: one rescale per chunk, one exp per element.
template <bool kEntropy, int N>
__device__ __forceinline__ void fold_chunk(LseStats& st, const float (&z)[N], int n) {
  float chunk_max = -INFINITY;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (i < n) chunk_max = fmaxf(chunk_max, z[i]);
  }
  if (chunk_max > st.m) {
    recentre<kEntropy>(st, chunk_max);
    st.m = chunk_max;
  }
  const float shift = safe_shift(st.m);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (i < n) {
      const float d = z[i] - shift;  // exact: z and the max are close where it matters
      // The hardware exp (ex2.approx of d * log2(e)) is ~2 ulp for the terms near the max that
      // make up s; its error grows with |d| only in terms e^d that add < 2^-20 of s. With
      // exp_accurate here the forward ran at 1.75-1.88 TB/s on an H100, the Triton kernel (hardware
      // exp) at ~2.9 TB/s.
      const float e = __expf(d);
      st.s += e;
      if constexpr (kEntropy) st.u += e > 0.0f ? e * d : 0.0f;
    }
  }
}

template <typename T>
struct FwdParams {
  const T* logits;
  int64_t stride_batch;  // elements
  int64_t stride_seq;    // elements
  int64_t seq_len;
  const void* ids;  // [rows], int32 or int64
  bool ids_int64;
  float* logprobs;  // [rows]
  float* entropy;   // [rows], or nullptr
  float* lse;       // [rows]
  int64_t rows;
  int vocab;
  float inv_temperature;
};

template <typename T>
struct BwdParams {
  const T* logits;
  int64_t stride_batch;
  int64_t stride_seq;
  int64_t seq_len;
  const void* ids;
  bool ids_int64;
  const float* lse;            // [rows]
  const float* grad_logprobs;  // [rows]
  const float* grad_entropy;   // [rows], or nullptr (then entropy is unused)
  const float* entropy;        // [rows]
  // Contiguous [rows, vocab]. May be `logits` itself (then contiguous too): every element is
  // read before the thread that read it overwrites it, with plain (coherent) loads.
  T* grad_logits;
  int64_t rows;
  int vocab;
  float inv_temperature;
};

__device__ __forceinline__ int64_t load_id(const void* ids, bool is_int64, int64_t row) {
  return is_int64 ? static_cast<const int64_t*>(ids)[row]
                  : static_cast<int64_t>(static_cast<const int32_t*>(ids)[row]);
}

__device__ __forceinline__ int64_t row_offset(int64_t row, int64_t seq_len, int64_t stride_batch,
                                              int64_t stride_seq) {
  const int64_t b = row / seq_len;
  return b * stride_batch + (row - b * seq_len) * stride_seq;
}

// Loads the chunk at `ptr` (valid elements left in the row: `valid`, > 0) as floats.
template <bool kAligned, int N, typename T>
__device__ __forceinline__ void load_chunk(const T* ptr, int valid, float (&x)[N]) {
  if (kAligned && valid >= N) {
    load_floats<true>(ptr, valid, x);
  } else {
    load_floats<false>(ptr, valid, x);
  }
}

template <bool kAligned, bool kEntropy, typename T>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const FwdParams<T> p) {
  constexpr int kVec = kVecSize<T>;
  const int64_t row = blockIdx.x;
  const int64_t target = load_id(p.ids, p.ids_int64, row);
  if (target < 0) {  // ignored row: uniform over the block, so the early exit is safe
    if (threadIdx.x == 0) {
      p.logprobs[row] = 0.0f;
      p.lse[row] = 0.0f;
      if constexpr (kEntropy) p.entropy[row] = 0.0f;
    }
    return;
  }
  const T* x_row = p.logits + row_offset(row, p.seq_len, p.stride_batch, p.stride_seq);
  LseStats st = empty_stats();
  for (int col = threadIdx.x * kVec; col < p.vocab; col += kThreads * kVec) {
    const int valid = p.vocab - col;
    float z[kVec];
    load_chunk<kAligned>(x_row + col, valid, z);
#pragma unroll
    for (int i = 0; i < kVec; ++i) z[i] *= p.inv_temperature;
    fold_chunk<kEntropy>(st, z, valid);
  }
  st = block_allreduce(st, [](const LseStats& a, const LseStats& b) {
    return combine<kEntropy>(a, b);
  });
  if (threadIdx.x == 0) {
    // A row with no finite logit has s = 0: lse = -inf, entropy 0 (finish_lse in Triton).
    // s == 0: no finite logit (lse -inf). A NaN s (a NaN logit: fmaxf skips it, expf does not)
    // stays NaN rather than reading as an empty row.
    const float s_safe = st.s == 0.0f ? 1.0f : st.s;
    const float log_s = logf(s_safe);
    const float lse = st.m + log_s;
    float logprob = NAN;
    if (target < p.vocab) {
      logprob = to_float(x_row[target]) * p.inv_temperature - lse;
    }
    p.logprobs[row] = logprob;
    p.lse[row] = lse;
    if constexpr (kEntropy) p.entropy[row] = log_s - __fdiv_rn(st.u, s_safe);
  }
}

template <bool kAligned, bool kDEntropy, typename T>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const BwdParams<T> p) {
  constexpr int kVec = kVecSize<T>;
  const int64_t row = blockIdx.x;
  const int64_t target = load_id(p.ids, p.ids_int64, row);
  T* d_row = p.grad_logits + row * static_cast<int64_t>(p.vocab);
  if (target < 0) {  // every row is written: the gradient buffer starts uninitialised
    float zeros[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) zeros[i] = 0.0f;
    for (int col = threadIdx.x * kVec; col < p.vocab; col += kThreads * kVec) {
      const int valid = p.vocab - col;
      if (kAligned && valid >= kVec) {
        store_floats<true>(d_row + col, valid, zeros);
      } else {
        store_floats<false>(d_row + col, valid, zeros);
      }
    }
    return;
  }
  const T* x_row = p.logits + row_offset(row, p.seq_len, p.stride_batch, p.stride_seq);
  const float lse = p.lse[row];
  const float g = p.grad_logprobs[row];
  const float g_h = kDEntropy ? p.grad_entropy[row] : 0.0f;
  const float entropy = kDEntropy ? p.entropy[row] : 0.0f;
  for (int col = threadIdx.x * kVec; col < p.vocab; col += kThreads * kVec) {
    const int valid = p.vocab - col;
    float x[kVec];
    load_chunk<kAligned>(x_row + col, valid, x);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float logp = x[i] * p.inv_temperature - lse;
      const float prob = exp_accurate(logp);
      const float onehot = col + i == target ? 1.0f : 0.0f;
      float grad = g * (onehot - prob);
      if constexpr (kDEntropy) {
        // d entropy / dz_j = -p_j (log p_j + H); p_j = 0 contributes nothing.
        grad -= g_h * prob * (prob > 0.0f ? logp + entropy : 0.0f);
      }
      x[i] = grad * p.inv_temperature;
    }
    if (kAligned && valid >= kVec) {
      store_floats<true>(d_row + col, valid, x);
    } else {
      store_floats<false>(d_row + col, valid, x);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side. Vectorised kernels when every row start is 16-byte aligned (the row's last partial
// chunk, if any, is read element-wise); element-wise kernels otherwise.
// ---------------------------------------------------------------------------------------------

template <typename T>
bool logits_rows_aligned(const T* logits, int64_t stride_batch, int64_t stride_seq) {
  return rows_are_16B_aligned(logits, stride_batch) && rows_are_16B_aligned(logits, stride_seq);
}

template <typename T>
cudaError_t forward(const FwdParams<T>& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const bool aligned = logits_rows_aligned(p.logits, p.stride_batch, p.stride_seq);
  const bool entropy = p.entropy != nullptr;
  const dim3 grid(static_cast<unsigned>(p.rows));
  if (aligned && entropy) {
    TF_LAUNCH_KERNEL(grid, kThreads, 0, stream, fwd_kernel<true, true>)(p);
  } else if (aligned) {
    TF_LAUNCH_KERNEL(grid, kThreads, 0, stream, fwd_kernel<true, false>)(p);
  } else if (entropy) {
    TF_LAUNCH_KERNEL(grid, kThreads, 0, stream, fwd_kernel<false, true>)(p);
  } else {
    TF_LAUNCH_KERNEL(grid, kThreads, 0, stream, fwd_kernel<false, false>)(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward(const BwdParams<T>& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const bool aligned = logits_rows_aligned(p.logits, p.stride_batch, p.stride_seq) &&
                       rows_are_16B_aligned(p.grad_logits, static_cast<int64_t>(p.vocab));
  const bool d_entropy = p.grad_entropy != nullptr;
  const dim3 grid(static_cast<unsigned>(p.rows));
  if (aligned && d_entropy) {
    TF_LAUNCH_KERNEL(grid, kThreads, 0, stream, bwd_kernel<true, true>)(p);
  } else if (aligned) {
    TF_LAUNCH_KERNEL(grid, kThreads, 0, stream, bwd_kernel<true, false>)(p);
  } else if (d_entropy) {
    TF_LAUNCH_KERNEL(grid, kThreads, 0, stream, bwd_kernel<false, true>)(p);
  } else {
    TF_LAUNCH_KERNEL(grid, kThreads, 0, stream, bwd_kernel<false, false>)(p);
  }
  return cudaGetLastError();
}

}  // namespace logprobs
}  // namespace thinkfuse
