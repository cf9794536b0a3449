"""Integrations of thinkfuse with other libraries (transformers' attention interface).

Importing this package registers attn_implementation "thinkfuse" with transformers at once
(``import thinkfuse`` registers it too, as soon as transformers' modeling code is loaded).
"""

from ..attention_interface import ATTN_IMPLEMENTATION, register_attention, thinkfuse_attention_forward, thinkfuse_attention_mask

__all__ = ["ATTN_IMPLEMENTATION", "register_attention", "thinkfuse_attention_forward", "thinkfuse_attention_mask"]

register_attention()
