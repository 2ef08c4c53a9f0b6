"""FlashAttention-2-class attention kernels in Triton, with the flash-attn API."""

from .interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from .padding import pad_input, unpad_input
from .reference import attention_ref

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "pad_input", "unpad_input", "attention_ref"]
