"""Triton kernels: fused 3D-RoPE + FlashAttention (see kernels/rope_attention.py)."""
from kernels.rope_attention import rope_attention

__all__ = ["rope_attention"]
