"""3D rotary position embedding (RoPE) for video + reference tokens (paper Sec. 3.2, TASS-RoPE).

Layout: rotate-half. A head of dim D holds D/2 rotation pairs (x[k], x[k + D/2]).
The pairs are split between the three axes (t, h, w): h and w get `D//2 // 3` pairs each,
t gets the rest (D=128 -> t 22, h 21, w 21; D=64 -> 12, 10, 10; D=32 -> 6, 5, 5).
Within an axis with n pairs, pair m turns at frequency theta^(-m/n), m = 0..n-1.

`rope_frequencies` returns a [D/2, 3] matrix F whose row k is zero except in the column of
its axis, so the angle of pair k at position p = (t, i, j) is simply (p @ F.T)[k]. Positions
are floats, so fractional (LTX-style) coordinates work unchanged.
"""
import math

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


def reference_positions(T: int, H: int, W: int, mode: str = "tass", far_gap: int = 16,
                        max_hw: int | None = None) -> torch.Tensor:
    """Reference token (i, j) positions, [H*W, 3], i-major (paper Sec. 3.2, Eq. TASS-RoPE).

    tass:    (T, H+i, W+j)   next frame in time, disjoint spatial block [H,2H) x [W,2W)
    shared:  (T, i, j)       next frame, same spatial grid (collides with video's spatial layout)
    far:     (T+K, i, j)     pushed K = far_gap frames beyond the clip
    tass_t0: (0, H+i, W+j)   spatial shift only, no temporal separation (ablation)

    max_hw: a bound on the height and width positions (LTX-2: LTX2_MAX_LATENT_HW). A spatial shift that
    would reach past it is cut to max_hw - H (resp. W): the reference then overlaps the video's rows
    (columns) by the rest, and stays disjoint from the video as long as the other axis keeps its full shift.
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
    t, dh, dw = offsets[mode]
    if max_hw is not None:
        dh, dw = min(dh, max(max_hw - H, 0)), min(dw, max(max_hw - W, 0))
    return base + torch.tensor((t, dh, dw), dtype=base.dtype)


def rope_angles(pos: torch.Tensor, freqs: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Angles [..., N, D/2] = pos [..., N, 3] @ freqs.T (float32 unless asked otherwise); per-head
    freqs [heads, D/2, 3] give [heads, N, D/2]."""
    return pos.to(dtype) @ freqs.to(pos.device, dtype).mT


def apply_rope(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, N, D] by positions pos [N, 3] or [B, N, 3] (rotate-half layout), with
    freqs [D/2, 3] shared by the heads or [heads, D/2, 3] per head (LTX-2).

    out[:k] = x1 cos - x2 sin, out[k:] = x2 cos + x1 sin, with (x1, x2) the two halves of x.
    Computed in float32 (float64 if x is float64) and returned in x's dtype.
    """
    ctype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if pos.dim() == 3:  # per-sample positions [B, N, 3] -> [B, 1, N, 3], broadcast over heads
        pos = pos[:, None]
    angles = rope_angles(pos, freqs, ctype)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(ctype).chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- LTX-2's RoPE
#
# LTX-2 positions a token by the centre of the pixel box it covers: time in seconds (the causal VAE
# maps latent frame f >= 1 to pixel frames [8f-7, 8f+1), frame 0 to [0, 1)), height and width in
# pixels (latent i -> [32i, 32i+32)). Each coordinate is divided by a maximum (20 s, 2048 px, 2048 px)
# and mapped to [-1, 1]. Frequencies theta^(m/(n-1)) pi/2, m < n = dim // 6, are shared across the
# *whole* attention width (all heads together), interleaved over the axes (t, h, w, t, h, w, ...)
# after (dim/2 - 3n) unused pairs at the front; head h takes pairs [h D/2, (h+1) D/2), so each head
# has its own frequencies: the table is [heads, D/2, 3], one non-zero per row, like rope_frequencies.
#
# The reference is an appended single image, placed as LTX-2.3 was pretrained to see one (diffusers'
# pipeline_ltx2_ic_lora, _prepare_keyframe_coords): one pixel frame, [8T-7, 8T-6) for latent frame T,
# the pixel frame right after the clip's last, with no causal shift of its own. Spatially, TASS's
# latent (H+i, W+j) from reference_positions is shifted by one full latent height and width (32 H,
# 32 W pixels); bounded by LTX2_MAX_LATENT_HW (2048 px) it stays inside the pretrained position range
# up to 1024 px a side, and beyond that the shift shrinks in that axis (reference_positions).

LTX2_SCALE = (8, 32, 32)  # the VAE's (time, height, width) compression
LTX2_MAX_POS = (20.0, 2048.0, 2048.0)  # seconds, pixels, pixels
LTX2_MAX_LATENT_HW = int(LTX2_MAX_POS[1]) // LTX2_SCALE[1]  # 64 latent rows or columns


def ltx2_positions(latent_pos: torch.Tensor, fps: float = 24.0, scale=LTX2_SCALE, max_pos=LTX2_MAX_POS,
                   causal_offset: int = 1, single_frame: bool = False) -> torch.Tensor:
    """Latent (t, i, j) [..., 3] -> LTX-2's normalised coordinates in [-1, 1] [..., 3] (float32).

    Follows LTX-2's arithmetic step by step (pixel box, causal shift of the first frame, seconds,
    box centre, / max, 2p - 1) so that the angles match its float32 rounding exactly. single_frame:
    an appended single image (the reference): its time box is the one pixel frame where latent frame t
    starts, [8t-7, 8t-6) (LTX-2's keyframe coordinates).
    """
    scale_t = torch.tensor(scale, dtype=torch.float32)
    start = latent_pos.float() * scale_t
    end = (latent_pos.float() + 1) * scale_t
    start[..., 0] = (start[..., 0] + causal_offset - scale[0]).clamp(min=0)  # causal VAE: frame 0 is one pixel frame
    end[..., 0] = start[..., 0] + 1 if single_frame else (end[..., 0] + causal_offset - scale[0]).clamp(min=0)
    start[..., 0], end[..., 0] = start[..., 0] / fps, end[..., 0] / fps
    centre = (start + end) / 2.0
    grid = torch.stack([centre[..., a] / max_pos[a] for a in range(3)], dim=-1)
    return grid * 2 - 1


def ltx2_rope_frequencies(dim: int, heads: int, theta: float = 10000.0) -> torch.Tensor:
    """[heads, D/2, 3] float32, D = dim / heads: LTX-2's per-head RoPE frequencies for ltx2_positions,
    in the rotate-half ("split") layout; the "interleaved" layout is the same after permuting each
    head's q and k channels (ltx2/convert.py does that to the weights)."""
    n = dim // 6
    f = (theta ** torch.linspace(0.0, 1.0, n, dtype=torch.float64) * math.pi / 2.0).float()
    table = torch.zeros(dim // 2, 3)
    pad = dim // 2 - 3 * n
    for axis in range(3):
        table[pad + axis::3, axis] = f
    return table.reshape(heads, dim // heads // 2, 3)
