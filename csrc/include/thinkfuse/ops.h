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
// Speculative verification (kernels/mtp_verify.py semantics), one launch, no host sync.
// draft: [B, K] int64 contiguous (ids outside [0, V) are rejected). logits: [B, K+1, V] in
// logits_dtype, unit stride on V, element strides stride_lb / stride_lk. probs: nullptr or
// [B, K, V] in probs_dtype, unit stride on V. uniforms: nullptr for greedy (temperature == 0),
// else [B, K+1] float32 contiguous. tokens: [B, K+1] int64 contiguous; num_accepted [B] int64.
// batch > kMtpMaxBatch, k > kMtpMaxDrafts or V outside [1, kMtpMaxVocab] return
// cudaErrorInvalidValue; so does temperature > 0 without uniforms.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kMtpMaxVocab = int64_t{1} << 30;
constexpr int64_t kMtpMaxDrafts = int64_t{1} << 20;
constexpr int64_t kMtpMaxBatch = (int64_t{1} << 31) - 1;

cudaError_t mtp_verify(const int64_t* draft, const void* logits, int64_t stride_lb,
                       int64_t stride_lk, const void* probs, int64_t stride_pb,
                       int64_t stride_pk, const float* uniforms, int64_t* tokens,
                       int64_t* num_accepted, int64_t batch, int64_t k, int64_t vocab,
                       float temperature, DType logits_dtype, DType probs_dtype,
                       cudaStream_t stream);

}  // namespace thinkfuse
