// Speculative verification entry point: dtype dispatch onto the templates of
// thinkfuse/mtp_verify.cuh.
#include "thinkfuse/common.cuh"
#include "thinkfuse/mtp_verify.cuh"
#include "thinkfuse/ops.h"

namespace thinkfuse {

cudaError_t mtp_verify(const int64_t* draft, const void* logits, int64_t stride_lb,
                       int64_t stride_lk, const void* probs, int64_t stride_pb,
                       int64_t stride_pk, const float* uniforms, int64_t* tokens,
                       int64_t* num_accepted, int64_t batch, int64_t k, int64_t vocab,
                       float temperature, DType logits_dtype, DType probs_dtype,
                       cudaStream_t stream) {
  if (batch < 0 || batch > kMtpMaxBatch || k < 0 || k > kMtpMaxDrafts || vocab < 1 ||
      vocab > kMtpMaxVocab || !(temperature >= 0.0f)) {
    return cudaErrorInvalidValue;
  }
  const bool greedy = temperature == 0.0f;
  if (!greedy && uniforms == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(logits_dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    mtp::Params<T> p;
    p.draft = draft;
    p.logits = static_cast<const T*>(logits);
    p.stride_lb = stride_lb;
    p.stride_lk = stride_lk;
    p.probs = greedy ? nullptr : probs;  // draft probabilities only matter when sampling
    p.probs_dtype = probs_dtype;
    p.stride_pb = stride_pb;
    p.stride_pk = stride_pk;
    p.uniforms = greedy ? nullptr : uniforms;
    p.tokens = tokens;
    p.num_accepted = num_accepted;
    p.k = static_cast<int>(k);
    p.vocab = static_cast<int>(vocab);
    p.temperature = temperature;
    return mtp::verify(p, batch, stream);
  });
}

}  // namespace thinkfuse
