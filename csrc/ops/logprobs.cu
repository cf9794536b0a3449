// Token log-probability entry points: dtype dispatch onto the templates of
// thinkfuse/logprobs.cuh.
#include "thinkfuse/common.cuh"
#include "thinkfuse/logprobs.cuh"
#include "thinkfuse/ops.h"

namespace thinkfuse {
namespace {

bool valid_shape(int64_t rows, int64_t vocab, int64_t seq_len) {
  return rows >= 0 && rows <= kLogprobsMaxRows && vocab >= 1 && vocab <= kLogprobsMaxVocab &&
         (rows == 0 || seq_len >= 1);
}

// The fields FwdParams and BwdParams share: where the logits rows and their token ids are.
template <class Params, typename T>
void set_rows(Params& p, const void* logits, int64_t stride_batch, int64_t stride_seq,
              int64_t seq_len, const void* token_ids, bool ids_int64, int64_t rows, int64_t vocab,
              float inv_temperature) {
  p.logits = static_cast<const T*>(logits);
  p.stride_batch = stride_batch;
  p.stride_seq = stride_seq;
  p.seq_len = seq_len;
  p.ids = token_ids;
  p.ids_int64 = ids_int64;
  p.rows = rows;
  p.vocab = static_cast<int>(vocab);
  p.inv_temperature = inv_temperature;
}

}  // namespace

cudaError_t token_logprobs_forward(const void* logits, int64_t stride_batch, int64_t stride_seq,
                                   int64_t seq_len, const void* token_ids, bool ids_int64,
                                   float* logprobs, float* entropy, float* lse, int64_t rows,
                                   int64_t vocab, float inv_temperature, DType dtype,
                                   cudaStream_t stream) {
  if (!valid_shape(rows, vocab, seq_len)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    logprobs::FwdParams<T> p;
    set_rows<logprobs::FwdParams<T>, T>(p, logits, stride_batch, stride_seq, seq_len, token_ids,
                                        ids_int64, rows, vocab, inv_temperature);
    p.logprobs = logprobs;
    p.entropy = entropy;
    p.lse = lse;
    return logprobs::forward(p, stream);
  });
}

cudaError_t token_logprobs_backward(const float* grad_logprobs, const float* grad_entropy,
                                    const void* logits, int64_t stride_batch, int64_t stride_seq,
                                    int64_t seq_len, const void* token_ids, bool ids_int64,
                                    const float* lse, const float* entropy, void* grad_logits,
                                    int64_t rows, int64_t vocab, float inv_temperature,
                                    DType dtype, cudaStream_t stream) {
  if (!valid_shape(rows, vocab, seq_len)) return cudaErrorInvalidValue;
  if (grad_entropy != nullptr && entropy == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    logprobs::BwdParams<T> p;
    set_rows<logprobs::BwdParams<T>, T>(p, logits, stride_batch, stride_seq, seq_len, token_ids,
                                        ids_int64, rows, vocab, inv_temperature);
    p.lse = lse;
    p.grad_logprobs = grad_logprobs;
    p.grad_entropy = grad_entropy;
    p.entropy = entropy;
    p.grad_logits = static_cast<T*>(grad_logits);
    return logprobs::backward(p, stream);
  });
}

}  // namespace thinkfuse
