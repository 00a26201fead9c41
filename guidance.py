"""Condition dropout, three-stream decoupled CFG and the Euler sampler (paper Sec. 3.4).

Three streams per step: v_0 (no text, no reference), v_y (text only), v_yr (text +
reference), run as ONE forward of batch 3B: the reference is appended for all 3B samples
and hidden from the first 2B through the per-sample key length (model.DiT's ref_keep).

Schedule (LTX-2 style shifted timesteps): a uniform grid u from 1 to 0 is warped by
t = e^mu u / (1 + (e^mu - 1) u), which spends more steps at high noise for larger mu; mu grows
linearly with the number of video tokens N, from 0.95 at N = 1024 to 2.05 at N = 4096
(extrapolated outside that range), the values LTX-Video ships.
"""
import math

import torch
from tqdm import tqdm


def decoupled_cfg(v_0, v_y, v_yr, s_y: float = 5.0, s_r: float = 7.5):
    """v = v_0 + s_y (v_y - v_0) + s_r (v_yr - v_y)  (Sec. 3.4, Eq. decoupled CFG)."""
    return v_0 + s_y * (v_y - v_0) + s_r * (v_yr - v_y)


def dropout_masks(batch: int, p_y: float = 0.05, p_r: float = 0.20, generator: torch.Generator | None = None):
    """Independent condition dropout (Sec. 3.4): (keep_text [B], keep_ref [B]) bool."""
    u = torch.rand(2, batch, generator=generator)
    return u[0] >= p_y, u[1] >= p_r


def rescale_guidance(v: torch.Tensor, v_c: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, phi: float) -> torch.Tensor:
    """LTX-2's guidance rescale, on the clean estimates x0 = z_t - t v (Lin et al. 2024, Sec. 3.4): the guided x0
    scaled to the standard deviation of the fully conditioned one's, mixed by phi; returned as a velocity."""
    x0, x0_c = z_t - t * v, z_t - t * v_c
    dims = list(range(1, v.dim()))
    x0 = phi * x0 * (x0_c.std(dim=dims, keepdim=True) / x0.std(dim=dims, keepdim=True)) + (1 - phi) * x0
    return (z_t - x0) / t


def three_stream_velocity(model, z_t, t, y, y_mask, y_0, y_0_mask, z_ref, s_y: float, s_r: float, s_stg: float = 0.0,
                          stg_blocks=(), rescale: float = 0.0):
    """One forward of batch 3B -> decoupled CFG velocity [B, ...].

    y/y_mask: the prompt's text features; y_0/y_0_mask: the empty prompt's (same length L).
    With z_ref None (a text-to-video model) it runs 2B streams: classic CFG, v_yr = v_y.
    LTX-2's guidance on top: s_stg > 0 adds a stream v_stg (the fully conditioned one with self-attention
    skipped in stg_blocks) and s_stg (v_c - v_stg), v_c = v_yr (v_y without a reference); rescale > 0
    applies rescale_guidance towards v_c.
    """
    B = z_t.shape[0]
    conds = [(y_0, y_0_mask, False), (y, y_mask, False)] + [(y, y_mask, True)] * (z_ref is not None)
    streams = conds + [conds[-1]] * (s_stg > 0)  # [v_0 | v_y | v_yr | v_stg]
    n = len(streams)
    rep = lambda x: x.repeat(n, *([1] * (x.dim() - 1)))
    keep_ref = torch.tensor([r for _, _, r in streams], device=z_t.device).repeat_interleave(B)
    stg = torch.arange(n * B, device=z_t.device) >= len(conds) * B
    v = model(rep(z_t), t.repeat(n), torch.cat([c for c, _, _ in streams]), torch.cat([m for _, m, _ in streams]),
              z_ref=None if z_ref is None else rep(z_ref), ref_keep=None if z_ref is None else keep_ref,
              stg_blocks=stg_blocks if s_stg > 0 else (), stg=stg).chunk(n)
    v_c = v[len(conds) - 1]
    out = decoupled_cfg(v[0], v[1], v_c, s_y, s_r)
    if s_stg > 0:
        out = out + s_stg * (v_c - v[-1])
    return rescale_guidance(out, v_c, z_t, t.view(-1, *[1] * (z_t.dim() - 1)), rescale) if rescale > 0 else out


def shift_for_tokens(n_tokens: int, base_shift: float = 0.95, max_shift: float = 2.05, base_n: int = 1024, max_n: int = 4096) -> float:
    """mu, linear in the number of video tokens (LTX-Video's resolution-dependent shift)."""
    return base_shift + (max_shift - base_shift) * (n_tokens - base_n) / (max_n - base_n)


def shift_time(u: torch.Tensor, mu: float) -> torch.Tensor:
    """t = e^mu u / (1 + (e^mu - 1) u): mu > 0 moves times towards noise (t = 1)."""
    s = math.exp(mu)
    return s * u / (1 + (s - 1) * u)


def stretch_to_terminal(ts: torch.Tensor, terminal: float) -> torch.Tensor:
    """Stretch times (ending in 0) so that the last non-zero one is `terminal` (diffusers' shift_terminal):
    1 - t is scaled by (1 - terminal) / (1 - t_last)."""
    one_minus = 1 - ts[:-1]
    return torch.cat([1 - one_minus * (1 - terminal) / one_minus[-1], ts[-1:]])


def timesteps(steps: int, mu: float = 0.0, terminal: float = 0.0) -> torch.Tensor:
    """steps + 1 times from 1 (noise) to 0 (data), warped by the shift mu (mu = 0: uniform), the last non-zero one
    stretched to `terminal` when > 0 (LTX-2's shipped scheduler: 0.1)."""
    ts = shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), mu)
    return (stretch_to_terminal(ts, terminal) if terminal > 0 else ts).float()


@torch.no_grad()
def euler_sample(velocity, z, ts: torch.Tensor, progress: bool = True):
    """Integrate dz/dt = v from t = ts[0] to ts[-1]: z <- z + (t_next - t) v  (Sec. 3.4)."""
    for t, t_next in tqdm(list(zip(ts[:-1], ts[1:])), desc="sampling", disable=not progress, leave=False):
        z = z + (t_next - t).item() * velocity(z, t.expand(z.shape[0]).to(z.device))
    return z
