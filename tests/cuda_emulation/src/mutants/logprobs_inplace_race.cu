// Kernel mutant LOGPROBS_INPLACE_RACE (emulator.py KERNEL_MUTANTS; never part of a GPU build):
// csrc/ops/logprobs.cu compiled unchanged, except that every specialisation of
// thinkfuse::logprobs::bwd_kernel is replaced (explicit specialisations, declared before the real
// launchers instantiate it) by a variant with an in-place ordering bug.
//
// The variant special-cases the target column: thread 0 reads the target's logit before the
// loop, the loop is the real one, and after a barrier thread 0 rewrites the target's gradient
// from the logit it read. Out of place that gives the real kernel's result bit for bit. In place
// the thread that owns the target's chunk overwrites the logit with its gradient, and nothing
// orders that store after thread 0's load (the barrier that would is missing): whenever the owner
// runs first, thread 0 computes the target's gradient from a gradient. On a GPU that is a race
// between warps; in the emulator, where a thread runs until its next synchronisation point, it
// shows whenever the scheduler starts the owner before thread 0.
// test_mutated_emulator_fails checks that the in-place cases then fail.
#include "thinkfuse/common.cuh"
#include "thinkfuse/logprobs.cuh"

namespace thinkfuse {
namespace logprobs {

template <bool kAligned, bool kDEntropy, typename T>
__device__ void racy_bwd(const BwdParams<T>& p) {
  constexpr int kVec = kVecSize<T>;
  const int64_t row = blockIdx.x;
  const int64_t target = load_id(p.ids, p.ids_int64, row);
  T* d_row = p.grad_logits + row * static_cast<int64_t>(p.vocab);
  if (target < 0) {
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
  const bool has_target = target < p.vocab;
  // MUTATION: read here, overwritten by the target's owner in place, no barrier in between.
  const float target_x = threadIdx.x == 0 && has_target ? to_float(x_row[target]) : 0.0f;
  auto grad_of = [&](float x, bool onehot) {
    const float logp = x * p.inv_temperature - lse;
    const float prob = exp_accurate(logp);
    float grad = g * ((onehot ? 1.0f : 0.0f) - prob);
    if constexpr (kDEntropy) grad -= g_h * prob * (prob > 0.0f ? logp + entropy : 0.0f);
    return grad * p.inv_temperature;
  };
  for (int col = threadIdx.x * kVec; col < p.vocab; col += kThreads * kVec) {
    const int valid = p.vocab - col;
    float x[kVec];
    load_chunk<kAligned>(x_row + col, valid, x);
#pragma unroll
    for (int i = 0; i < kVec; ++i) x[i] = grad_of(x[i], col + i == target);
    if (kAligned && valid >= kVec) {
      store_floats<true>(d_row + col, valid, x);
    } else {
      store_floats<false>(d_row + col, valid, x);
    }
  }
  __syncthreads();  // every store of the loop is done: thread 0's rewrite lands last
  if (threadIdx.x == 0 && has_target) d_row[target] = from_float<T>(grad_of(target_x, true));
}

#define TF_RACY_BWD(A, E, T)                                 \
  template <>                                                \
  __global__ void bwd_kernel<A, E, T>(const BwdParams<T> p) { \
    racy_bwd<A, E, T>(p);                                    \
  }
#define TF_RACY_BWD_T(T)         \
  TF_RACY_BWD(true, true, T)     \
  TF_RACY_BWD(true, false, T)    \
  TF_RACY_BWD(false, true, T)    \
  TF_RACY_BWD(false, false, T)
TF_RACY_BWD_T(float)
TF_RACY_BWD_T(__half)
TF_RACY_BWD_T(__nv_bfloat16)
#undef TF_RACY_BWD_T
#undef TF_RACY_BWD

}  // namespace logprobs
}  // namespace thinkfuse

// The real entry points (and launchers), now instantiating the specialisations above.
#include "../../../../csrc/ops/logprobs.cu"
