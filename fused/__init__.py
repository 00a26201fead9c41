"""Triton kernels: fused 3D-RoPE + FlashAttention (fused/rope_attention.py; benchmark: python -m fused.bench)."""
from fused.rope_attention import rope_attention

__all__ = ["rope_attention"]
