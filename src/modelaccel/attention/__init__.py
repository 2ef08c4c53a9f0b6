"""FlashAttention-2-class attention kernels in Triton, with the flash-attn API."""

from .interface import flash_attn_func, flash_attn_varlen_func
from .reference import attention_ref

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "attention_ref"]
