// Argument helpers shared by the attention bindings (flash_attention*.cpp): strides of the
// padded / packed layouts, the 16-byte row rule of the kernels' async copies, cu_seqlens and
// sequence-length checks. Torch-facing; never include it from a kernel file.
#pragma once

#include <torch/extension.h>

#include <cstdint>

#include "common.h"
#include "thinkfuse/ops.h"

namespace thinkfuse::bindings {

// (batch, seq, head) element strides of a [B, S, H, D] or packed [total, H, D] tensor (no batch
// dim: 0); 0 where a dim has one element (its stride is meaningless there).
struct TokenStrides {
  int64_t b = 0, s = 0, h = 0;
};

inline TokenStrides token_strides(const at::Tensor& t, bool packed) {
  TokenStrides st;
  if (packed) {
    st.s = stride_or_zero(t, 0);
    st.h = stride_or_zero(t, 1);
  } else {
    st.b = stride_or_zero(t, 0);
    st.s = stride_or_zero(t, 1);
    st.h = stride_or_zero(t, 2);
  }
  return st;
}

// The kernels move rows in 16-byte chunks (cp.async, TMA): the base pointer and the stride of
// every dim with more than one element must be non-negative 16-byte multiples, the last dim
// unit-stride. Any other layout (an odd slice of a fused projection, an offset or transposed
// view) is copied into a fresh contiguous tensor.
inline at::Tensor with_16B_rows(const at::Tensor& t) {
  if (t.numel() == 0) return t;
  bool ok = reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % 16 == 0 && t.stride(-1) == 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    const int64_t stride = stride_or_zero(t, d);
    ok = ok && stride >= 0 && (stride * t.element_size()) % 16 == 0;
  }
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

inline void check_cu_seqlens(const at::Tensor& cu, const char* name, const at::Device& device) {
  check_device(cu, name, device);
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, name,
                    " must be 1-D with batch + 1 >= 1 entries, got shape ", cu.sizes());
  TORCH_CHECK_VALUE(cu.is_contiguous(), name, " must be contiguous");
}

inline int checked_seqlen(int64_t value, const char* name) {
  TORCH_CHECK_VALUE(value >= 0 && value <= thinkfuse::kFlashAttnMaxSeqlen, name, " must be in [0, ",
                    thinkfuse::kFlashAttnMaxSeqlen, "], got ", value);
  return static_cast<int>(value);
}

}  // namespace thinkfuse::bindings
