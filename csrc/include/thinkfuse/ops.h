// C-style entry points of the thinkfuse CUDA kernels.
//
// Plain C++: callers (torch_bindings.cpp) need neither nvcc nor torch to include it. Pointers
// are device pointers; row strides count elements; every function only enqueues work on
// `stream` and returns the launch status (cudaSuccess, or the error to report).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace thinkfuse {

// Storage dtypes the kernels are instantiated for.
enum class DType { kFloat32, kFloat16, kBFloat16 };

// ---------------------------------------------------------------------------------------------
// RMSNorm (Hugging Face semantics), optionally fused with the residual add:
//   h = x + residual (rounded to x's dtype)          or h = x without residual
//   rstd = rsqrt(mean(float(h)^2) + eps)              float32
//   y = float(weight) * float(to_x_dtype(float(h) * rstd)), stored in y's dtype
// y's dtype is x_dtype when x_dtype == w_dtype, else float32 (torch's type promotion).
// Invalid shapes (negative sizes, cols > kRmsNormMaxCols) return cudaErrorInvalidValue.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kRmsNormMaxCols = int64_t{1} << 30;

// x, residual: [rows, cols], unit column stride, any row stride. residual has x's dtype.
// weight: [cols]. y, h_out: contiguous [rows, cols]. rstd: [rows].
// residual and h_out are both nullptr (plain norm) or both given (fused add; h_out receives h).
cudaError_t rms_norm_forward(const void* x, int64_t x_row_stride, const void* residual,
                             int64_t res_row_stride, const void* weight, void* y, void* h_out,
                             float* rstd, int64_t rows, int64_t cols, float eps, DType x_dtype,
                             DType w_dtype, cudaStream_t stream);

// Number of floats of workspace rms_norm_backward needs for rows of `cols` elements on
// `device` (the device that will run the backward). Returns -1 if the device cannot be queried.
int64_t rms_norm_backward_workspace_floats(int64_t cols, int device);

// dy: [rows, cols] in y's dtype, unit column stride. h: [rows, cols] (x_dtype), unit column
// stride: the normalised input (x, or x + residual). rstd: [rows] from the forward.
// dh: nullptr, or a contiguous [rows, cols] gradient (x_dtype) flowing into the h output of the
// fused-residual forward; it is added to dx. dx: contiguous [rows, cols] (x_dtype).
// dw: [cols] (w_dtype). workspace: rms_norm_backward_workspace_floats(cols, current device)
// floats, no initialisation needed (16-byte alignment enables the vectorised kernels).
// rows == 0 is valid (dw becomes zeros).
cudaError_t rms_norm_backward(const void* dy, int64_t dy_row_stride, const void* h,
                              int64_t h_row_stride, const void* weight, const float* rstd,
                              const void* dh, void* dx, void* dw, float* workspace, int64_t rows,
                              int64_t cols, DType x_dtype, DType w_dtype, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Rotary position embedding, half-split as transformers' rotate_half, on q and k in one launch:
//   out[..., :D/2] = x1 * cos1 - x2 * sin1,   out[..., D/2:] = x2 * cos2 + x1 * sin2
// computed in float32 and rounded once. The backward entry points apply the inverse rotation
// ((s1, s2) -> (-s2, -s1)) to the output gradients. Outputs are contiguous [B, S, H, D].
// Shapes beyond the limits below return cudaErrorInvalidValue.
// ---------------------------------------------------------------------------------------------

// Largest q_heads + k_heads and head_dim (int32 index arithmetic inside a tile).
constexpr int64_t kRotaryMaxHeads = int64_t{1} << 20;
constexpr int64_t kRotaryMaxHeadDim = int64_t{1} << 20;

// Sizes shared by q and k. head_dim is even.
struct RotaryShape {
  int64_t batch;
  int64_t seq;
  int64_t head_dim;
};

// q or k: [batch, seq, heads, head_dim] with a unit stride on head_dim; strides in elements.
struct HeadsView {
  const void* data;
  int64_t heads;
  int64_t stride_b;
  int64_t stride_s;
  int64_t stride_h;
};

// position_ids [batch or 1, seq], int32 or int64, any strides (stride_b 0 broadcasts one row).
struct PositionsView {
  const void* data;
  bool is_int64;
  int64_t stride_b;
  int64_t stride_s;
};

// cos and sin [batch or 1, seq, head_dim], one dtype, unit stride on head_dim (stride_b 0
// broadcasts one row).
struct CosSinView {
  const void* cos;
  const void* sin;
  int64_t cos_stride_b;
  int64_t cos_stride_s;
  int64_t sin_stride_b;
  int64_t sin_stride_s;
};

// rope: cos/sin = cos/sin(float(position) * inv_freq[j]) * attention_scaling in float32, never
// stored; inv_freq is float32 contiguous [head_dim / 2]. llama4_beta != 0 multiplies q's cos/sin
// (only q's) by 1 + beta * log(1 + floor(position / llama4_original_max)) (Ministral 3);
// llama4_original_max must then be > 0 (it is converted to float32, as torch does).
// q, k, q_out, k_out share `dtype`. The backward takes dq_out/dk_out in place of q/k and writes
// dq/dk; same arguments otherwise.
cudaError_t rope_forward(const RotaryShape& shape, const HeadsView& q, const HeadsView& k,
                         const PositionsView& positions, const float* inv_freq,
                         float attention_scaling, float llama4_beta, int64_t llama4_original_max,
                         void* q_out, void* k_out, DType dtype, cudaStream_t stream);
cudaError_t rope_backward(const RotaryShape& shape, const HeadsView& dq_out,
                          const HeadsView& dk_out, const PositionsView& positions,
                          const float* inv_freq, float attention_scaling, float llama4_beta,
                          int64_t llama4_original_max, void* dq, void* dk, DType dtype,
                          cudaStream_t stream);

// apply_rotary: cos/sin loaded from tensors. q and k share in_dtype, the outputs out_dtype
// (the forward's is promote(in_dtype, cos_dtype), the backward's the dtype of the forward's q).
cudaError_t apply_rotary_forward(const RotaryShape& shape, const HeadsView& q, const HeadsView& k,
                                 const CosSinView& cos_sin, void* q_out, void* k_out,
                                 DType in_dtype, DType cos_dtype, DType out_dtype,
                                 cudaStream_t stream);
cudaError_t apply_rotary_backward(const RotaryShape& shape, const HeadsView& dq_out,
                                  const HeadsView& dk_out, const CosSinView& cos_sin, void* dq,
                                  void* dk, DType in_dtype, DType cos_dtype, DType out_dtype,
                                  cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// SwiGLU: y = silu(gate) * up in float32, rounded once (silu(g) = g / (1 + exp(-g))).
// Backward, with sig = sigmoid(gate):
//   dgate = dy * up * sig * (1 + gate * (1 - sig)),   dup = dy * (gate * sig)
// Every tensor is [rows, cols] with a unit column stride and its own row stride (elements), all
// in `dtype`. The fused form (gate_up [rows, 2N]) passes its two column halves as gate and up,
// and the two halves of one [rows, 2N] gradient as dgate and dup.
// cols > kSwigluMaxCols returns cudaErrorInvalidValue.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kSwigluMaxCols = int64_t{1} << 30;

cudaError_t swiglu_forward(const void* gate, int64_t gate_row_stride, const void* up,
                           int64_t up_row_stride, void* y, int64_t y_row_stride, int64_t rows,
                           int64_t cols, DType dtype, cudaStream_t stream);

cudaError_t swiglu_backward(const void* dy, int64_t dy_row_stride, const void* gate,
                            int64_t gate_row_stride, const void* up, int64_t up_row_stride,
                            void* dgate, int64_t dgate_row_stride, void* dup,
                            int64_t dup_row_stride, int64_t rows, int64_t cols, DType dtype,
                            cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Token log-probabilities (kernels/logprobs.py semantics), z = logits * inv_temperature:
//   lse = logsumexp(z), logprob = z[id] - lse, entropy = -sum softmax(z) log softmax(z)
// A negative id gives logprob = entropy = lse = 0 (and a zero gradient); an id >= V reads
// nothing and gives a NaN logprob. Backward:
//   d logits = (g (onehot - p) - g_H p (log p + H)) * inv_temperature,  p = exp(z - lse)
// logits: [B, T, V] view with a unit stride on V and element strides stride_batch, stride_seq;
// row r = b * T + t (seq_len = T). token_ids: [rows] contiguous, int32 or int64 (ids_int64).
// Outputs float32 [rows] contiguous; entropy nullptr when not requested. grad_logits: contiguous
// [rows, V] in `dtype`. grad_entropy nullptr when the entropy has no gradient (entropy is then
// not read). rows > kLogprobsMaxRows or V outside [1, kLogprobsMaxVocab] return
// cudaErrorInvalidValue.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kLogprobsMaxVocab = int64_t{1} << 30;
constexpr int64_t kLogprobsMaxRows = (int64_t{1} << 31) - 1;  // one block per row (grid.x)

cudaError_t token_logprobs_forward(const void* logits, int64_t stride_batch, int64_t stride_seq,
                                   int64_t seq_len, const void* token_ids, bool ids_int64,
                                   float* logprobs, float* entropy, float* lse, int64_t rows,
                                   int64_t vocab, float inv_temperature, DType dtype,
                                   cudaStream_t stream);

cudaError_t token_logprobs_backward(const float* grad_logprobs, const float* grad_entropy,
                                    const void* logits, int64_t stride_batch, int64_t stride_seq,
                                    int64_t seq_len, const void* token_ids, bool ids_int64,
                                    const float* lse, const float* entropy, void* grad_logits,
                                    int64_t rows, int64_t vocab, float inv_temperature,
                                    DType dtype, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Speculative verification (kernels/mtp_verify.py semantics), no host sync.
// draft: [B, K] int64 contiguous (ids outside [0, V) are rejected). logits: [B, K+1, V] in
// logits_dtype, unit stride on V, element strides stride_lb / stride_lk. probs: nullptr or
// [B, K, V] in probs_dtype, unit stride on V. uniforms: nullptr for greedy (temperature == 0),
// else [B, K+1] float32 contiguous. tokens: [B, K+1] int64 contiguous; num_accepted [B] int64.
// batch > kMtpMaxBatch, k > kMtpMaxDrafts or V outside [1, kMtpMaxVocab] return
// cudaErrorInvalidValue; so does temperature > 0 without uniforms.
// Work split: `splits` from mtp_verify_splits. 0: one block per batch row walks the K+1
// positions (the original kernel). >= 1: every vocabulary row (b, j) is cut into `splits`
// slices, one block each, and the last block of a batch row finishes it; this path needs
// `workspace` (4-byte aligned, mtp_verify_workspace_bytes long, contents irrelevant: its
// counters are zeroed on the stream) and launches a memset and 1 (greedy, sampled without
// draft probs) or 2 kernels, all on `stream`. A workspace may be reused once the launch that
// used it is complete (stream order suffices).
// ---------------------------------------------------------------------------------------------

constexpr int64_t kMtpMaxVocab = int64_t{1} << 30;
constexpr int64_t kMtpMaxDrafts = int64_t{1} << 20;
constexpr int64_t kMtpMaxBatch = (int64_t{1} << 31) - 1;
constexpr int64_t kMtpMaxSplits = 1024;  // largest num_splits a caller may ask for

// The work split for a call: num_splits <= 0 picks one from B, K, V, the mode and the SM count
// (the split path: enough slices per row for about 4 blocks per SM, slices of at least 2048
// ids, and when sampling at most 16384, the most the finishing block re-reads for a draw);
// 1 asks for the one-block-per-row kernel (returns 0); >= 2 asks for that many slices per
// vocabulary row, fewer where V has too few ids (slices are multiples of 8 ids). Returns the
// `splits` argument of mtp_verify: 0 or the number of slices actually used. num_splits >
// kMtpMaxSplits is the caller's error (the binding refuses it); it is clamped here.
int64_t mtp_verify_splits(int64_t batch, int64_t k, int64_t vocab, bool sampled,
                          int64_t num_splits, int64_t sm_count);
// Bytes of workspace mtp_verify needs for `splits` (0 for splits == 0).
int64_t mtp_verify_workspace_bytes(int64_t batch, int64_t k, int64_t splits, bool sampled);

cudaError_t mtp_verify(const int64_t* draft, const void* logits, int64_t stride_lb,
                       int64_t stride_lk, const void* probs, int64_t stride_pb,
                       int64_t stride_pk, const float* uniforms, int64_t* tokens,
                       int64_t* num_accepted, int64_t batch, int64_t k, int64_t vocab,
                       float temperature, DType logits_dtype, DType probs_dtype, int64_t splits,
                       void* workspace, int64_t workspace_bytes, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Flash attention forward (kernels/attention.py semantics; tensor cores, sm80+). The problem
// (layouts, strides, cu_seqlens, GQA group, scale, causal, window) is described by
// FlashAttnParams in thinkfuse/flash_attention_params.cuh (include it to fill one). float16 and
// bfloat16 only; head_dim one of those flash_attention_forward_head_dim_supported accepts. q, k,
// v, out need 16-byte aligned rows (base pointer and every batch / seq / head stride a multiple
// of 16 bytes); out and lse are written for every row of every sequence (rows of a packed q
// outside all sequences are left untouched). Returns cudaErrorInvalidValue for float32, other
// head dims, max_seqlen_* > kFlashAttnMaxSeqlen, batch or heads_q > kFlashAttnMaxGridDim.
// ---------------------------------------------------------------------------------------------

struct FlashAttnParams;

constexpr int kFlashAttnMaxSeqlen = 1 << 28;
constexpr int kFlashAttnMaxGridDim = 65535;  // batch and heads_q are CUDA grid dims y and z

constexpr bool flash_attention_forward_head_dim_supported(int64_t head_dim) {
  return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 96 ||
         head_dim == 128 || head_dim == 256;
}

cudaError_t flash_attention_forward(const FlashAttnParams& params, DType dtype,
                                    cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Flash attention backward (kernels/attention.py semantics; tensor cores, sm80+). The problem is
// the forward's FlashAttnParams (q, k, v, the forward's out and lse, cu_seqlens, sizes, scale,
// causal, window); FlashAttnBwdArgs adds the output gradient, the optional lse gradient, the
// outputs and the workspaces. With P = exp(scale q.k - lse):
//   delta = rowsum(dO * O) - dlse,  dS = P (dP - delta),  dP = dO V^T,
//   dQ = scale dS K,  dK = scale dS^T Q,  dV = P^T dO   (dK, dV summed over the GQA group).
// float16 / bfloat16 only; head_dim in flash_attention_backward_head_dim_supported. q, k, v and
// dout need 16-byte aligned rows (base pointer and every batch / seq / head stride a multiple of
// 16 bytes); out, lse and dlse any strides (unit along D / the sequence). Outputs contiguous in
// the inputs' dtype: dq [rows_q, Hq, D], dk and dv [rows_k, Hkv, D], rows = B * S (padded) or
// total (packed). dq is written for every row (zeros outside all sequences); dk and dv for every
// key of every sequence (packed rows outside all sequences are left untouched: zero them first).
// Workspaces (float32, no initialisation needed): dq_accum rows_q * Hq * D floats, 16-byte
// aligned; lse_log2 and delta each laid out like a contiguous lse (B * Hq * Sq or Hq * total_q).
// Returns cudaErrorInvalidValue for float32, other head dims, max_seqlen_* >
// kFlashAttnMaxSeqlen, heads_kv > kFlashAttnMaxGridDim or a group that does not divide.
// ---------------------------------------------------------------------------------------------

struct FlashAttnBwdArgs {
  const void* dout = nullptr;  // like q (dtype, shape, 16-byte aligned rows and strides)
  int64_t do_batch_stride = 0, do_seq_stride = 0, do_head_stride = 0;
  const float* dlse = nullptr;  // gradient into lse, laid out like lse; nullptr: none
  int64_t dlse_batch_stride = 0, dlse_head_stride = 0;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* dq_accum = nullptr;
  float* lse_log2 = nullptr;
  float* delta = nullptr;
};

constexpr bool flash_attention_backward_head_dim_supported(int64_t head_dim) {
  return head_dim == 64 || head_dim == 96 || head_dim == 128;
}

cudaError_t flash_attention_backward(const FlashAttnParams& params, const FlashAttnBwdArgs& args,
                                     DType dtype, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Decode attention over a KV cache (kernels/decode_attention.py semantics; flash-decoding with
// mma.sync for float16 / bfloat16 and CUDA-core FMAs for float32; sm80+). q [B, Sq, Hq, D],
// k_cache and v_cache [B, S_max, Hkv, D] (HeadsView: unit stride on D, any other strides in
// elements; heads must match the shape). cache_seqlens [B] int32 contiguous: valid keys per row,
// the Sq query tokens included, clamped to [0, S_max] on the device. Query t of row b sits at
// key position pos = L - Sq + t and sees the keys j <= pos, and with window > 0 only
// j > pos - window (window <= 0: none). Rows that see no key output 0. out: contiguous
// [B, Sq, Hq, D] in dtype. num_splits must come from decode_attention_num_splits (same shape
// and dtype, current device); when it is > 1 the caller provides the float32 workspaces o_part
// [B, num_splits, Hq * Sq, D] and lse_part [B, num_splits, Hq * Sq] (contiguous, no
// initialisation needed); else both may be nullptr. out, o_part and lse_part must be 16-byte
// aligned. Invalid shapes (see decode_attention_shape_valid) or an inconsistent num_splits
// return cudaErrorInvalidValue.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kDecodeMaxQueries = 16;                 // Sq
constexpr int64_t kDecodeMaxSeqlenK = int64_t{1} << 29;   // S_max (int key positions)
constexpr int64_t kDecodeMaxHeads = int64_t{1} << 16;     // Hq (int row arithmetic)

struct DecodeAttentionShape {
  int64_t batch;         // B
  int64_t seqlen_q;      // Sq, 1 .. kDecodeMaxQueries
  int64_t q_heads;       // Hq, a multiple of kv_heads, <= kDecodeMaxHeads
  int64_t kv_heads;      // Hkv >= 1
  int64_t head_dim;      // decode_attention_head_dim_supported
  int64_t max_seqlen_k;  // S_max, 0 .. kDecodeMaxSeqlenK
};

constexpr bool decode_attention_head_dim_supported(int64_t head_dim) {
  return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 96 ||
         head_dim == 128 || head_dim == 256;
}

constexpr bool decode_attention_shape_valid(const DecodeAttentionShape& s) {
  return s.batch >= 0 && s.seqlen_q >= 1 && s.seqlen_q <= kDecodeMaxQueries && s.kv_heads >= 1 &&
         s.q_heads >= 0 && s.q_heads <= kDecodeMaxHeads && s.q_heads % s.kv_heads == 0 &&
         decode_attention_head_dim_supported(s.head_dim) && s.max_seqlen_k >= 0 &&
         s.max_seqlen_k <= kDecodeMaxSeqlenK;
}

// The key-axis split count decode_attention runs with: requested > 0 asks for that many splits
// (fewer when S_max is short: every split holds at least one key tile); requested <= 0 picks
// one from the shapes and the current device (SM count, resident blocks), never from the
// lengths. Returns >= 1, or -1 for an invalid shape or a failed device query.
int64_t decode_attention_num_splits(const DecodeAttentionShape& shape, int64_t requested,
                                    DType dtype);

cudaError_t decode_attention(const DecodeAttentionShape& shape, const HeadsView& q,
                             const HeadsView& k_cache, const HeadsView& v_cache,
                             const int32_t* cache_seqlens, const int32_t* cache_leftpad,
                             float softmax_scale, int64_t window, int64_t num_splits,
                             float* o_part, float* lse_part, void* out, DType dtype,
                             cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Flash attention forward for Hopper (sm_90a: wgmma, TMA, warp specialisation; FA3-style),
// torch.ops.thinkfuse_C.flash_attention_fwd_sm90: the same problem (FlashAttnParams), outputs and
// semantics as flash_attention_forward. float16 / bfloat16, head_dim in
// flash_attention_forward_sm90_head_dim_supported. q, k, v and out need a 16-byte aligned base
// and 16-byte multiple batch / seq / head strides. Returns cudaErrorInvalidValue for invalid
// params (as flash_attention_forward; also packed totals beyond int32 TMA coordinates),
// cudaErrorNotSupported when the current device is not compute capability 9.0 or the extension
// holds no sm_90a code for the kernel (or the driver cannot encode tensor maps), and
// cudaErrorInvalidPitchValue when q / k / v / out are not 16-byte aligned as above or the driver
// refuses to encode their strides as a TMA tensor map (the caller may retry with contiguous
// copies).
// ---------------------------------------------------------------------------------------------

constexpr bool flash_attention_forward_sm90_head_dim_supported(int64_t head_dim) {
  return head_dim == 64 || head_dim == 128;
}

cudaError_t flash_attention_forward_sm90(const FlashAttnParams& params, DType dtype,
                                         cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Flash attention backward for Hopper (sm_90a: wgmma, TMA, warp specialisation; FA3-style),
// torch.ops.thinkfuse_C.flash_attention_bwd_sm90: the same problem, arguments, workspaces and
// outputs as flash_attention_backward (its preprocess and convert kernels run around the Hopper
// dK / dV kernel). float16 / bfloat16, head_dim in
// flash_attention_backward_sm90_head_dim_supported. Returns cudaErrorInvalidValue for invalid
// params (as flash_attention_backward; also packed totals beyond int32 TMA coordinates),
// cudaErrorNotSupported when the current device is not compute capability 9.0, the extension
// holds no sm_90a code for the kernel or the driver cannot encode tensor maps, and
// cudaErrorInvalidPitchValue when the driver refuses a tensor map of q / k / v / dout (the
// caller may retry with contiguous copies).
// ---------------------------------------------------------------------------------------------

constexpr bool flash_attention_backward_sm90_head_dim_supported(int64_t head_dim) {
  return head_dim == 128;
}

cudaError_t flash_attention_backward_sm90(const FlashAttnParams& params,
                                          const FlashAttnBwdArgs& args, DType dtype,
                                          cudaStream_t stream);

}  // namespace thinkfuse
