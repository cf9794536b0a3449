// SwiGLU y = silu(gate) * up, forward and backward, elementwise on [rows, cols] views with a
// unit column stride and any row stride (the fused gate_up form passes its two column halves).
// float32 math, each output rounded once:
//   forward:  y = (gate / (1 + exp(-gate))) * up                  torch's silu, then the product
//   backward: sig = 1 / (1 + exp(-gate))
//             dgate = dy * up * sig * (1 + gate * (1 - sig)),  dup = dy * (gate * sig)
//
// Work decomposition: a row is cut into chunks of kVec = 16 / sizeof(T) consecutive elements,
// one per thread. A block is (tx chunks) x (ty rows) with tx the smallest power of two covering
// a row's chunks (at most the whole block), so narrow rows still fill the block. The grid covers
// the columns (x) and loops over rows (y, grid-stride: gridDim.y is capped at 65535). Offsets
// are int64 (row * row_stride), column indices int (cols <= kSwigluMaxCols).
#pragma once

#include <algorithm>
#include <cstdint>

#include "thinkfuse/common.cuh"

namespace thinkfuse {
namespace swiglu {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

template <typename T>
struct FwdParams {
  const T* gate;
  int64_t gate_stride;
  const T* up;
  int64_t up_stride;
  T* y;
  int64_t y_stride;
  int64_t rows;
  int cols;
};

template <typename T>
struct BwdParams {
  const T* dy;
  int64_t dy_stride;
  const T* gate;
  int64_t gate_stride;
  const T* up;
  int64_t up_stride;
  T* dgate;
  int64_t dgate_stride;
  T* dup;
  int64_t dup_stride;
  int64_t rows;
  int cols;
};

// exp(x) for float32 x, within about 2 ulp (the accuracy of CUDA's expf), whatever the flags:
// --use_fast_math turns expf into __expf = ex2.approx(x * log2(e)), whose error grows with |x|
// (the rounding of x * log2(e) is amplified by the exponent: ~25 ulp at |x| = 20).
// Here x = j * ln2 + f with j = rint(x / ln2) and f reduced by Cody-Waite (ln2 split in a high
// part with trailing zero bits, so j * kLn2Hi is exact, and a low part), |f| <= ln2 / 2; then
// exp(f) = ex2.approx(f * log2(e)) has the SFU's 2^-22 relative error only, and 2^j is applied
// exactly as two power-of-two factors (each within the normal range for the clamped x).
// NaN propagates; x past the clamp saturates to 0 / inf as expf does.
__device__ __forceinline__ float exp_accurate(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;  // 0x3f317200: 16 significant bits
  constexpr float kLn2Lo = 1.42860682030941723e-6f;  // ln 2 - kLn2Hi
  // exp(-104) is below the smallest float32 denormal and exp(89) above FLT_MAX. Written with
  // comparisons (false for NaN) rather than fminf/fmaxf, which would turn NaN into a number.
  const float xc = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
  const float j = rintf(__fmul_rn(xc, kLog2e));  // in [-150, 128]
  float f = fmaf(-j, kLn2Hi, xc);
  f = fmaf(-j, kLn2Lo, f);
  const float e = __expf(f);  // ex2.approx(f * log2(e)), |f * log2(e)| <= ~0.5
  const int ji = static_cast<int>(j);  // NaN converts to 0; e is then NaN already
  const int j1 = ji / 2;               // j1, j2 in [-75, 64]: 2^j1, 2^j2 are normal floats
  const int j2 = ji - j1;
  return e * __int_as_float((j1 + 127) << 23) * __int_as_float((j2 + 127) << 23);
}

template <bool kAligned, typename T>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const FwdParams<T> p) {
  constexpr int kVec = kVecSize<T>;
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  const int col_step = gridDim.x * blockDim.x * kVec;
  const int first_col = (blockIdx.x * blockDim.x + threadIdx.x) * kVec;
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < p.rows;
       row += row_step) {
    for (int col = first_col; col < p.cols; col += col_step) {
      const int valid = p.cols - col;
      float g[kVec], u[kVec], y[kVec];
      load_floats<kAligned>(p.gate + row * p.gate_stride + col, valid, g);
      load_floats<kAligned>(p.up + row * p.up_stride + col, valid, u);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        // IEEE division: --use_fast_math would make `/` the approximate __fdividef.
        const float silu = __fdiv_rn(g[i], __fadd_rn(1.0f, exp_accurate(-g[i])));
        y[i] = silu * u[i];
      }
      store_floats<kAligned>(p.y + row * p.y_stride + col, valid, y);
    }
  }
}

template <bool kAligned, typename T>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const BwdParams<T> p) {
  constexpr int kVec = kVecSize<T>;
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  const int col_step = gridDim.x * blockDim.x * kVec;
  const int first_col = (blockIdx.x * blockDim.x + threadIdx.x) * kVec;
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < p.rows;
       row += row_step) {
    for (int col = first_col; col < p.cols; col += col_step) {
      const int valid = p.cols - col;
      float dy[kVec], g[kVec], u[kVec], dg[kVec], du[kVec];
      load_floats<kAligned>(p.dy + row * p.dy_stride + col, valid, dy);
      load_floats<kAligned>(p.gate + row * p.gate_stride + col, valid, g);
      load_floats<kAligned>(p.up + row * p.up_stride + col, valid, u);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float sig = __frcp_rn(__fadd_rn(1.0f, exp_accurate(-g[i])));
        const float silu = g[i] * sig;
        // d silu(g) / dg = sig * (1 + g * (1 - sig)); the Triton kernel's order of products.
        dg[i] = dy[i] * u[i] * sig * (1.0f + g[i] * (1.0f - sig));
        du[i] = dy[i] * silu;
      }
      store_floats<kAligned>(p.dgate + row * p.dgate_stride + col, valid, dg);
      store_floats<kAligned>(p.dup + row * p.dup_stride + col, valid, du);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host-side launch configuration.
// ---------------------------------------------------------------------------------------------

struct LaunchShape {
  dim3 grid;
  dim3 block;
};

inline LaunchShape plan(int64_t rows, int cols, int vec) {
  const int chunks = ceil_div(cols, vec);
  int tx = 1;
  while (tx < chunks && tx < kThreads) tx *= 2;
  const int ty = kThreads / tx;
  LaunchShape shape;
  shape.block = dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  shape.grid = dim3(static_cast<unsigned>(ceil_div(chunks, tx)),
                    static_cast<unsigned>(std::min(ceil_div<int64_t>(rows, ty), kMaxGridY)));
  return shape;
}

// Vectorised kernels when the width is a whole number of chunks and every row start of every
// tensor is 16-byte aligned (so every chunk is); element-wise kernels otherwise.
template <typename T>
cudaError_t forward(const FwdParams<T>& p, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  const LaunchShape s = plan(p.rows, p.cols, kVecSize<T>);
  const bool aligned = p.cols % kVecSize<T> == 0 && rows_are_16B_aligned(p.gate, p.gate_stride) &&
                       rows_are_16B_aligned(p.up, p.up_stride) &&
                       rows_are_16B_aligned(p.y, p.y_stride);
  if (aligned) {
    TF_LAUNCH_KERNEL(s.grid, s.block, 0, stream, fwd_kernel<true>)(p);
  } else {
    TF_LAUNCH_KERNEL(s.grid, s.block, 0, stream, fwd_kernel<false>)(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward(const BwdParams<T>& p, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  const LaunchShape s = plan(p.rows, p.cols, kVecSize<T>);
  const bool aligned = p.cols % kVecSize<T> == 0 && rows_are_16B_aligned(p.dy, p.dy_stride) &&
                       rows_are_16B_aligned(p.gate, p.gate_stride) &&
                       rows_are_16B_aligned(p.up, p.up_stride) &&
                       rows_are_16B_aligned(p.dgate, p.dgate_stride) &&
                       rows_are_16B_aligned(p.dup, p.dup_stride);
  if (aligned) {
    TF_LAUNCH_KERNEL(s.grid, s.block, 0, stream, bwd_kernel<true>)(p);
  } else {
    TF_LAUNCH_KERNEL(s.grid, s.block, 0, stream, bwd_kernel<false>)(p);
  }
  return cudaGetLastError();
}

}  // namespace swiglu
}  // namespace thinkfuse
