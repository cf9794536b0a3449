// Speculative verification entry point: work-split choice and dtype dispatch onto the templates
// of thinkfuse/mtp_verify.cuh.
#include "thinkfuse/common.cuh"
#include "thinkfuse/mtp_verify.cuh"
#include "thinkfuse/ops.h"

namespace thinkfuse {

namespace {

constexpr int64_t kMaxGridBlocks = 0x7fffffff;  // gridDim.x

bool bad_shape(int64_t batch, int64_t k, int64_t vocab) {
  return batch < 0 || batch > kMtpMaxBatch || k < 0 || k > kMtpMaxDrafts || vocab < 1 ||
         vocab > kMtpMaxVocab;
}

}  // namespace

int64_t mtp_verify_splits(int64_t batch, int64_t k, int64_t vocab, bool sampled,
                          int64_t num_splits, int64_t sm_count) {
  if (bad_shape(batch, k, vocab) || batch == 0 || num_splits == 1) return 0;
  const int64_t rows = batch * (k + 1);  // <= 2^51: no overflow
  if (rows > kMaxGridBlocks) return 0;   // not even one slice per row fits the grid
  int64_t want;
  if (num_splits <= 0) {
    // Enough blocks to fill the GPU (small B: many slices per row; large B: one block per
    // vocabulary row, still all K+1 positions in parallel), slices of at least
    // kMinHeuristicSlice ids so that a block has a full load per thread.
    const int64_t target = (sm_count > 0 ? sm_count : 1) * mtp::kTargetBlocksPerSm;
    want = ceil_div<int64_t>(target, rows);
    const int64_t by_vocab = ceil_div<int64_t>(vocab, mtp::kMinHeuristicSlice);
    want = want < by_vocab ? want : by_vocab;
    if (sampled) {  // bound the finishing block's walk through one slice
      const int64_t by_draw = ceil_div<int64_t>(vocab, mtp::kMaxSampledSlice);
      want = want > by_draw ? want : by_draw;
    }
    want = want < kMtpMaxSplits ? want : kMtpMaxSplits;
  } else {
    want = num_splits < kMtpMaxSplits ? num_splits : kMtpMaxSplits;
  }
  const int64_t by_grid = kMaxGridBlocks / rows;
  want = want < by_grid ? want : by_grid;
  want = want > 1 ? want : 1;
  return ceil_div<int64_t>(vocab, mtp::split_slice(vocab, want));
}

int64_t mtp_verify_workspace_bytes(int64_t batch, int64_t k, int64_t splits, bool sampled) {
  if (splits <= 0 || batch <= 0 || k < 0) return 0;
  return 4 * mtp::layout_split_workspace(nullptr, batch, k, splits, sampled, nullptr);
}

cudaError_t mtp_verify(const int64_t* draft, const void* logits, int64_t stride_lb,
                       int64_t stride_lk, const void* probs, int64_t stride_pb,
                       int64_t stride_pk, const float* uniforms, int64_t* tokens,
                       int64_t* num_accepted, int64_t batch, int64_t k, int64_t vocab,
                       float temperature, DType logits_dtype, DType probs_dtype, int64_t splits,
                       void* workspace, int64_t workspace_bytes, cudaStream_t stream) {
  if (bad_shape(batch, k, vocab) || !(temperature >= 0.0f) || splits < 0 ||
      splits > kMtpMaxSplits) {
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
    if (splits == 0) return mtp::verify(p, batch, stream);
    return mtp::verify_split(p, batch, splits, workspace, workspace_bytes, stream);
  });
}

}  // namespace thinkfuse
