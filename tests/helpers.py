"""Small shared fixtures for the tests."""
import torch

from model import DiT, with_overrides
from pipeline import PRESETS


def tiny_dit(seed: int = 0, **overrides) -> DiT:
    """The tiny DiT with every parameter randomised, so zero-initialised gates and output
    layers do not make branches vanish (which would let wrong code pass)."""
    torch.manual_seed(seed)
    model = DiT(with_overrides(PRESETS["tiny"].dit, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def tiny_inputs(B=2, T=3, H=4, W=5, L=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z_t = torch.randn(B, 8, T, H, W, generator=g, dtype=dtype)
    t = torch.rand(B, generator=g, dtype=dtype)
    y = torch.randn(B, L, 64, generator=g, dtype=dtype)
    y_mask = torch.ones(B, L, dtype=torch.bool)
    y_mask[0, L // 2:] = False
    z_ref = torch.randn(B, 8, H, W, generator=g, dtype=dtype)
    return z_t, t, y, y_mask, z_ref
