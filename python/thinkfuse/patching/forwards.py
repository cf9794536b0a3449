"""Replacement forwards bound onto transformers modules by the rule tables.

Each keeps the original forward's parameters and reads the module's own attributes (the
contract of Hugging Face's `kernels` library), so weights, names and state_dict are untouched.
The optional keyword-only ``backend`` is filled in by patch_model when a backend was named.
"""

from __future__ import annotations

from .. import ops


def rms_norm_forward(self, hidden_states, *, backend=None):
    """Forward of Qwen2RMSNorm / MistralRMSNorm / Ministral3RMSNorm (attributes weight,
    variance_epsilon)."""
    return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon, backend=backend)
