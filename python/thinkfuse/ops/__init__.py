"""Public ops of thinkfuse: argument checks, autograd and backend dispatch.

Every op takes a keyword-only ``backend=`` ("cuda", "triton", "torch" or None for the
selection described in ``thinkfuse.backend``).
"""

from .rms_norm import rms_norm

__all__ = ["rms_norm"]
