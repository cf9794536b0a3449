// Shared description of one flash-attention problem, for the forward and the backward kernels
// (kernels/attention.py semantics). Plain C++ (no CUDA, no torch): the bindings fill it, the
// launchers read it, ops.h forward-declares it.
//
// Layouts. Every tensor is addressed through element strides with a unit stride on head_dim:
//   padded: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D]; cu_seqlens_q = cu_seqlens_k = nullptr and
//           sequence b has Sq = max_seqlen_q queries and Sk = max_seqlen_k keys, starting at
//           token 0 of batch row b.
//   packed: q [total_q, Hq, D], k/v [total_k, Hkv, D]; cu_seqlens_q/k int32 [batch + 1] on the
//           device; sequence b holds tokens [cu[b], cu[b+1]) (lengths may be 0); batch strides
//           are 0 and max_seqlen_* bound every length (the grid is sized from them).
//   Element (b, token t of sequence b, head h, d) of q lives at
//     q + b * q_batch_stride + (start_q(b) + t) * q_seq_stride + h * q_head_stride + d
//   with start_q(b) = cu_seqlens_q[b] (packed) or 0 (padded); likewise k, v, out.
//   lse (float32, natural log): padded [B, Hq, Sq], packed [Hq, total_q]; unit stride along the
//   sequence: lse + b * lse_batch_stride + h * lse_head_stride + start_q(b) + t.
// GQA: query head h reads kv head h / group, group = heads_q / heads_kv (K/V never expanded).
// Masks: query t of a sequence with q_len queries and k_len keys sits at key position
//   pos = t + k_len - q_len (bottom-right alignment); causal keeps keys j <= pos, a window
//   w > 0 (requires causal) keeps j > pos - w; window <= 0 means none. Rows that see no key:
//   out 0, lse -inf.
// softmax(scale * q.k): the kernels work in the exp2 domain with scale_log2 = scale * log2(e).
#pragma once

#include <cstdint>

#include "thinkfuse/ops.h"  // the kFlashAttnMax* limits

namespace thinkfuse {

struct FlashAttnParams {
  // Inputs (device pointers, storage dtype given separately as a DType).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_batch_stride = 0, q_seq_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_seq_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_seq_stride = 0, v_head_stride = 0;

  // Forward outputs (the backward reads them): out like q, lse as described above.
  void* out = nullptr;
  int64_t o_batch_stride = 0, o_seq_stride = 0, o_head_stride = 0;
  float* lse = nullptr;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;

  // Packed sequences: int32 [batch + 1] device offsets, or both nullptr (padded). Their values
  // are not checked on the host (that would synchronise): kernels clamp every offset into
  // [0, total_q] / [0, total_k] (and ends to >= starts) so bad offsets never reach memory
  // outside the tensors.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  int64_t total_q = 0;  // packed: tokens in q (q.size(0)); padded: unused
  int64_t total_k = 0;  // packed: tokens in k/v (k.size(0)); padded: unused

  int batch = 0;
  int heads_q = 0;
  int heads_kv = 0;
  int group = 1;  // heads_q / heads_kv
  int head_dim = 0;
  int max_seqlen_q = 0;  // padded: Sq; packed: >= every query length
  int max_seqlen_k = 0;  // padded: Sk; packed: >= every key length

  float softmax_scale = 1.0f;
  float scale_log2 = 1.4426950408889634f;  // softmax_scale * log2(e)
  bool causal = false;
  int window = 0;  // > 0: sliding window (causal only); <= 0: none

  bool is_varlen() const { return cu_seqlens_q != nullptr; }

  // The forward kernels' limits on the problem (head_dim aside, which is per kernel): batch and
  // query heads fit the grid, heads_q = group * heads_kv, sequence lengths in range, cu_seqlens
  // given for both or neither, and every tensor present.
  bool forward_problem_in_range() const {
    if (batch < 0 || batch > kFlashAttnMaxGridDim || heads_q < 1 || heads_q > kFlashAttnMaxGridDim ||
        heads_kv < 1 || group < 1 || heads_kv * group != heads_q) {
      return false;
    }
    if (max_seqlen_q < 0 || max_seqlen_q > kFlashAttnMaxSeqlen || max_seqlen_k < 0 ||
        max_seqlen_k > kFlashAttnMaxSeqlen) {
      return false;
    }
    if ((cu_seqlens_q == nullptr) != (cu_seqlens_k == nullptr)) return false;
    return q != nullptr && k != nullptr && v != nullptr && out != nullptr && lse != nullptr;
  }

  // Whether q, k, v and out start on 16 bytes and every batch / seq / head stride is a multiple
  // of 16 bytes for elements of `element_bytes`: the kernels move rows with 16-byte copies, and
  // a misaligned one would be a sticky CUDA error. (The bindings copy inputs that are not.)
  bool rows_16B_aligned(int element_bytes) const {
    const auto ok_ptr = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
    const auto ok_strides = [element_bytes](int64_t a, int64_t b, int64_t c) {
      return (a * element_bytes) % 16 == 0 && (b * element_bytes) % 16 == 0 &&
             (c * element_bytes) % 16 == 0;
    };
    return ok_ptr(q) && ok_ptr(k) && ok_ptr(v) && ok_ptr(out) &&
           ok_strides(q_batch_stride, q_seq_stride, q_head_stride) &&
           ok_strides(k_batch_stride, k_seq_stride, k_head_stride) &&
           ok_strides(v_batch_stride, v_seq_stride, v_head_stride) &&
           ok_strides(o_batch_stride, o_seq_stride, o_head_stride);
  }
};

}  // namespace thinkfuse
