"""Public ops of thinkfuse: argument checks, autograd and backend dispatch.

Every op takes a keyword-only ``backend=`` ("cuda", "triton", "torch" or None for the
selection described in ``thinkfuse.backend``).
"""

from ..rope_params import RopeParams, rope_params
from .causal_lm_loss import causal_lm_loss
from .logprobs import fused_linear_token_logprobs, token_logprobs
from .mtp_verify import mtp_verify
from .rms_norm import rms_norm
from .rope import apply_rotary_pos_emb, rope
from .swiglu import swiglu, swiglu_fused

__all__ = ["RopeParams", "apply_rotary_pos_emb", "rms_norm", "rope", "rope_params", "swiglu", "swiglu_fused"]
__all__ += ["causal_lm_loss", "fused_linear_token_logprobs", "token_logprobs"]
__all__ += ["mtp_verify"]
from .attention import decode_attention, flash_attention  # noqa: E402
__all__ += ["decode_attention", "flash_attention"]
