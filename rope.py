"""3D rotary position embedding (RoPE) for video + reference tokens (paper Sec. 3.2, TASS-RoPE).

Layout: rotate-half. A head of dim D holds D/2 rotation pairs (x[k], x[k + D/2]).
The pairs are split between the three axes (t, h, w): h and w get `D//2 // 3` pairs each,
t gets the rest (D=128 -> t 22, h 21, w 21; D=64 -> 12, 10, 10; D=32 -> 6, 5, 5).
Within an axis with n pairs, pair m turns at frequency theta^(-m/n), m = 0..n-1.

`rope_frequencies` returns a [D/2, 3] matrix F whose row k is zero except in the column of
its axis, so the angle of pair k at position p = (t, i, j) is simply (p @ F.T)[k]. Positions
are floats, so fractional (LTX-style) coordinates work unchanged.
"""
import torch

REFERENCE_MODES = ("tass", "shared", "far", "tass_t0")


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Number of rotation pairs given to (t, h, w)."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    half = head_dim // 2
    n_hw = half // 3
    if n_hw < 1:
        raise ValueError(f"head_dim must be >= 6 to give each axis a pair, got {head_dim}")
    return half - 2 * n_hw, n_hw, n_hw


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """[D/2, 3] float32: row k holds pair k's angular frequency in the column of its axis."""
    freqs = torch.zeros(head_dim // 2, 3)
    start = 0
    for axis, n in enumerate(axis_pairs(head_dim)):
        freqs[start:start + n, axis] = theta ** (-torch.arange(n, dtype=torch.float64) / n)
        start += n
    return freqs


def _grid(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """All (t, i, j) for t in `t`, i < h, j < w, t-major then i then j, as float [len(t)*h*w, 3]."""
    tt, ii, jj = torch.meshgrid(t.float(), torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    return torch.stack([tt, ii, jj], dim=-1).reshape(-1, 3)


def video_positions(T: int, H: int, W: int) -> torch.Tensor:
    """Video token (t, i, j) sits at RoPE position (t, i, j): [T*H*W, 3], t-major."""
    return _grid(torch.arange(T), H, W)


def reference_positions(T: int, H: int, W: int, mode: str = "tass", far_gap: int = 16) -> torch.Tensor:
    """Reference token (i, j) positions, [H*W, 3], i-major (paper Sec. 3.2, Eq. TASS-RoPE).

    tass:    (T, H+i, W+j)   next frame in time, disjoint spatial block [H,2H) x [W,2W)
    shared:  (T, i, j)       next frame, same spatial grid (collides with video's spatial layout)
    far:     (T+K, i, j)     pushed K = far_gap frames beyond the clip
    tass_t0: (0, H+i, W+j)   spatial shift only, no temporal separation (ablation)
    """
    base = _grid(torch.zeros(1), H, W)
    offsets = {
        "tass": (T, H, W),
        "shared": (T, 0, 0),
        "far": (T + far_gap, 0, 0),
        "tass_t0": (0, H, W),
    }
    if mode not in offsets:
        raise ValueError(f"unknown reference mode {mode!r}; choose one of {REFERENCE_MODES}")
    return base + torch.tensor(offsets[mode], dtype=base.dtype)


def rope_angles(pos: torch.Tensor, freqs: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Angles [..., N, D/2] = pos [..., N, 3] @ freqs.T (float32 unless asked otherwise)."""
    return pos.to(dtype) @ freqs.to(pos.device, dtype).T


def apply_rope(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, N, D] by positions pos [N, 3] or [B, N, 3] (rotate-half layout).

    out[:k] = x1 cos - x2 sin, out[k:] = x2 cos + x1 sin, with (x1, x2) the two halves of x.
    Computed in float32 (float64 if x is float64) and returned in x's dtype.
    """
    ctype = torch.float64 if x.dtype == torch.float64 else torch.float32
    angles = rope_angles(pos, freqs, ctype)
    if angles.dim() == 3:  # per-sample positions [B, N, D/2] -> broadcast over heads
        angles = angles[:, None]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(ctype).chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)
