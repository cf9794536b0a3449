// Definitions of the kernels' dynamic shared memory. A kernel's
//   extern __shared__ __align__(A) unsigned char smem_raw[];
// compiles (cuda_emu.h: __shared__ is thread_local) into a block-scope declaration of an extern
// thread_local array of the kernel's enclosing namespace, defined here, one per namespace and
// name. A kernel in a new namespace (or with a new array name) needs one more line, else the
// link fails with an undefined reference to <namespace>::<name>.
#include "thinkfuse_emu/runtime.h"

#define EMU_DYNAMIC_SMEM(NS, NAME, TAG)                                                       \
  namespace NS {                                                                              \
  alignas(1024) thread_local unsigned char NAME[::emu::kMaxDynamicSmem];                      \
  }                                                                                           \
  static ::emu::SmemRegistrar emu_smem_##TAG([]() -> unsigned char* { return NS::NAME; },     \
                                             #NS "::" #NAME)

EMU_DYNAMIC_SMEM(thinkfuse::flash_fwd, smem_raw, flash_fwd);
EMU_DYNAMIC_SMEM(thinkfuse::flash_bwd, smem_raw, flash_bwd);
EMU_DYNAMIC_SMEM(thinkfuse::decode_attn, smem_raw, decode_attn);
EMU_DYNAMIC_SMEM(thinkfuse::flash_fwd_sm90, smem_raw, flash_fwd_sm90);
EMU_DYNAMIC_SMEM(thinkfuse::flash_bwd_sm90, smem_raw, flash_bwd_sm90);
