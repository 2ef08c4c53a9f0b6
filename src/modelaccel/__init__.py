"""modelaccel: fast transformer attention, decoding and GEMM tuning for NVIDIA Hopper GPUs."""

__version__ = "0.1.0"

from . import integrations
from .attention import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, pad_input, unpad_input

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "pad_input", "unpad_input", "__version__"]
