// Decode attention entry points: shape checks, the split count, and the dispatch on dtype, head
// dim and rows per block onto the templates of thinkfuse/decode_attention.cuh.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "thinkfuse/common.cuh"
#include "thinkfuse/decode_attention.cuh"
#include "thinkfuse/ops.h"

namespace thinkfuse {
namespace {

template <int kValue>
using IntTag = std::integral_constant<int, kValue>;

template <typename F>
cudaError_t dispatch_head_dim(int64_t head_dim, F&& f) {
  switch (head_dim) {
    case 16:
      return f(IntTag<16>{});
    case 32:
      return f(IntTag<32>{});
    case 64:
      return f(IntTag<64>{});
    case 96:
      return f(IntTag<96>{});
    case 128:
      return f(IntTag<128>{});
    case 256:
      return f(IntTag<256>{});
    default:
      return cudaErrorInvalidValue;
  }
}

// Rows of a block: the smallest of 8, 16, 32 that holds the G * Sq rows of a kv head (more
// rows take several row tiles of 32). Fewer rows than 8 still use 8: the padding rows cost FMAs
// only, and at <= 8 rows the kernel is bound by memory, not FMAs.
int block_rows(const DecodeAttentionShape& s) {
  const int64_t rows = s.q_heads / s.kv_heads * s.seqlen_q;
  return rows <= 8 ? 8 : rows <= 16 ? 16 : 32;
}

template <typename F>
cudaError_t dispatch_rows(int rows, F&& f) {
  switch (rows) {
    case 8:
      return f(IntTag<8>{});
    case 16:
      return f(IntTag<16>{});
    case 32:
      return f(IntTag<32>{});
    default:
      return cudaErrorInvalidValue;
  }
}

// Calls f(TypeTag<T>, IntTag<D>, IntTag<rows>) for the instantiation serving `shape`.
template <typename F>
cudaError_t dispatch(DType dtype, const DecodeAttentionShape& shape, F&& f) {
  return dispatch_dtype(dtype, [&](auto type) {
    return dispatch_head_dim(shape.head_dim, [&](auto dim) {
      return dispatch_rows(block_rows(shape), [&](auto rows) { return f(type, dim, rows); });
    });
  });
}

int64_t row_tiles(const DecodeAttentionShape& s, int rows) {
  return ceil_div<int64_t>(s.q_heads / s.kv_heads * s.seqlen_q, rows);
}

}  // namespace

int64_t decode_attention_num_splits(const DecodeAttentionShape& shape, int64_t requested,
                                    DType dtype) {
  if (!decode_attention_shape_valid(shape)) return -1;
  int64_t result = -1;
  const cudaError_t err = dispatch(dtype, shape, [&](auto type, auto dim, auto rows) {
    using T = typename decltype(type)::type;
    constexpr int kD = decltype(dim)::value;
    constexpr int kRows = decltype(rows)::value;
    constexpr int kTileN = decode_attn::Config<T, kD, kRows>::kTileN;
    const int64_t smax = shape.max_seqlen_k;
    if (requested > 0) {
      result = decode_attn::splits_for(smax, decode_attn::chunk_for(smax, requested, kTileN));
      return cudaSuccess;
    }
    int device = 0;
    int sms = 0;
    TF_CUDA_TRY(current_device_sms(&device, &sms));
    int per_sm = 0;
    TF_CUDA_TRY((decode_attn::blocks_per_sm<T, kD, kRows>(device, &per_sm)));
    const int64_t tiles = row_tiles(shape, kRows);
    const int64_t base_blocks = shape.batch * shape.kv_heads * tiles;
    // A split writes rows * D * 4 bytes of partial output (read back once by the combine) for
    // chunk * D * 2 * sizeof(T) bytes of K/V it reads: >= 64 * rows / sizeof(T) keys per split
    // keep that under ~6%, and >= 256 keys keep the per-block prologue/epilogue small.
    const int64_t real_rows =
        std::min<int64_t>(kRows, shape.q_heads / shape.kv_heads * shape.seqlen_q);
    const int64_t min_chunk =
        std::max<int64_t>(256, 64 * real_rows / static_cast<int64_t>(sizeof(T)));
    const int64_t splits = decode_attn::choose_num_splits(
        base_blocks, static_cast<int64_t>(sms) * per_sm, smax, min_chunk, kTileN);
    result = decode_attn::splits_for(smax, decode_attn::chunk_for(smax, splits, kTileN));
    return cudaSuccess;
  });
  return err == cudaSuccess ? result : -1;
}

cudaError_t decode_attention(const DecodeAttentionShape& shape, const HeadsView& q,
                             const HeadsView& k_cache, const HeadsView& v_cache,
                             const int32_t* cache_seqlens, const int32_t* cache_leftpad,
                             float softmax_scale, int64_t window, int64_t num_splits,
                             float* o_part, float* lse_part, void* out, DType dtype,
                             cudaStream_t stream) {
  if (!decode_attention_shape_valid(shape) || q.heads != shape.q_heads ||
      k_cache.heads != shape.kv_heads || v_cache.heads != shape.kv_heads || num_splits < 1) {
    return cudaErrorInvalidValue;
  }
  if (shape.batch == 0 || shape.q_heads == 0) return cudaSuccess;  // empty output
  const auto misaligned = [](const void* ptr) {
    return reinterpret_cast<std::uintptr_t>(ptr) % 16 != 0;
  };
  if (out == nullptr || misaligned(out) || cache_seqlens == nullptr) return cudaErrorInvalidValue;
  if (num_splits > 1 && (o_part == nullptr || lse_part == nullptr || misaligned(o_part) ||
                         misaligned(lse_part))) {
    return cudaErrorInvalidValue;
  }
  return dispatch(dtype, shape, [&](auto type, auto dim, auto rows) {
    using T = typename decltype(type)::type;
    constexpr int kD = decltype(dim)::value;
    constexpr int kRows = decltype(rows)::value;
    using C = decode_attn::Config<T, kD, kRows>;
    const int64_t smax = shape.max_seqlen_k;
    const int64_t chunk = decode_attn::chunk_for(smax, num_splits, C::kTileN);
    // The workspace was sized for num_splits: refuse a count this shape would not run with.
    if (decode_attn::splits_for(smax, chunk) != num_splits) return cudaErrorInvalidValue;
    const int64_t tiles = row_tiles(shape, kRows);
    if (shape.batch * shape.kv_heads * num_splits * tiles > 0x7fffffff) {
      return cudaErrorInvalidValue;  // one block per (b, kv head, split, row tile) in grid.x
    }

    decode_attn::Params<T> p;
    p.q = static_cast<const T*>(q.data);
    p.q_sb = q.stride_b;
    p.q_ss = q.stride_s;
    p.q_sh = q.stride_h;
    p.k = static_cast<const T*>(k_cache.data);
    p.k_sb = k_cache.stride_b;
    p.k_ss = k_cache.stride_s;
    p.k_sh = k_cache.stride_h;
    p.v = static_cast<const T*>(v_cache.data);
    p.v_sb = v_cache.stride_b;
    p.v_ss = v_cache.stride_s;
    p.v_sh = v_cache.stride_h;
    p.seqlens = cache_seqlens;
    p.leftpad = cache_leftpad;  // nullptr: every row starts at key 0
    p.out = static_cast<T*>(out);
    p.o_part = o_part;
    p.lse_part = lse_part;
    p.batch = static_cast<int>(shape.batch);
    p.seqlen_q = static_cast<int>(shape.seqlen_q);
    p.q_heads = static_cast<int>(shape.q_heads);
    p.kv_heads = static_cast<int>(shape.kv_heads);
    p.group = static_cast<int>(shape.q_heads / shape.kv_heads);
    p.max_seqlen_k = static_cast<int>(smax);
    // A window of >= S_max keys hides nothing (pos <= S_max - 1): drop it, which also keeps
    // every window bound inside int.
    p.window = window > 0 && window < smax ? static_cast<int>(window) : 0;
    p.num_splits = static_cast<int>(num_splits);
    p.chunk = static_cast<int>(chunk);
    p.row_tiles = static_cast<int>(tiles);
    p.scale_log2 = softmax_scale * decode_attn::kLog2e;
    p.kv_aligned = rows_are_16B_aligned(p.k, k_cache.stride_b) &&
                   rows_are_16B_aligned(p.k, k_cache.stride_s) &&
                   rows_are_16B_aligned(p.k, k_cache.stride_h) &&
                   rows_are_16B_aligned(p.v, v_cache.stride_b) &&
                   rows_are_16B_aligned(p.v, v_cache.stride_s) &&
                   rows_are_16B_aligned(p.v, v_cache.stride_h);
    return decode_attn::launch<T, kD, kRows>(p, stream);
  });
}

}  // namespace thinkfuse
