"""The training objective (paper Sec. 3.3), one function per equation.

Flow matching (LTX-2 convention): z_t = (1 - t) z_0 + t eps, target v = eps - z_0,
t = 1 is noise, t = 0 is data. Per-sample losses are [B]; the total is their batch mean.
"""
import torch
import torch.nn.functional as F

EPS = 1e-6


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def add_noise(z_0, eps, t):
    """z_t = (1 - t) z_0 + t eps  (Sec. 3.3, forward process)."""
    t = _bcast(t, z_0)
    return (1 - t) * z_0 + t * eps


def flow_target(z_0, eps):
    """v = eps - z_0  (Sec. 3.3, velocity target)."""
    return eps - z_0


def flow_loss(v_hat, z_0, eps, weight=None):
    """L_flow = ||v^ - (eps - z_0)||^2, mean over the video latent, per sample [B]  (Sec. 3.3); with `weight`
    [B, 1, T, h, w] (not in the paper: train.py --face-weight) the weighted mean over each sample's tokens."""
    err = (v_hat.float() - flow_target(z_0, eps).float()).pow(2)
    if weight is None:
        return err.flatten(1).mean(1)
    w = weight.float().expand_as(err)
    return (err * w).flatten(1).sum(1) / w.flatten(1).sum(1)


def clean_estimate(z_t, t, v):
    """z^_0 = z_t - t v^  (Sec. 3.3, clean estimate fed to the face loss)."""
    return z_t - _bcast(t, z_t) * v


def snr(t, eps: float = 1e-4):
    """SNR(t) = ((1 - t) / (t + eps))^2  (Sec. 3.3)."""
    return ((1 - t) / (t + eps)) ** 2


def w_aux(t, gamma: float = 1.0):
    """w_aux(t) = (SNR / (SNR + 1))^gamma: ~1 near data, ~0 near noise  (Sec. 3.3)."""
    s = snr(t)
    return (s / (s + 1)) ** gamma


def identity_loss(e, e_ref, m, eps: float = EPS):
    """L_id = sum_f m_f (1 - cos(e_f, e_ref)) / (sum_f m_f + eps)  (Sec. 3.3).

    e [B, F, d] per-frame face embeddings, e_ref [B, d] from the unaugmented reference,
    m [B, F] face-present mask. Returns [B].
    """
    cos = F.cosine_similarity(e, e_ref[:, None].expand_as(e), dim=-1)
    m = m.to(cos.dtype)
    return (m * (1 - cos)).sum(1) / (m.sum(1) + eps)


def temporal_identity_loss(e, m, eps: float = EPS):
    """L_tic = sum_f m_f (1 - cos(e_f, e_bar)) / (sum_f m_f + eps),
    e_bar = sum_f m_f e_f / (sum_f m_f + eps)  (Sec. 3.3). Returns [B]."""
    m = m.to(e.dtype)
    e_bar = (m[..., None] * e).sum(1) / (m.sum(1, keepdim=True) + eps)
    return identity_loss(e, e_bar, m, eps)


def total_loss(l_flow, t, l_id=None, l_tic=None, lambda_id: float = 0.1, lambda_tic: float = 0.05, gamma: float = 1.0):
    """L = L_flow + w_aux(t) (lambda_id L_id + lambda_tic L_tic), batch mean  (Sec. 3.3)."""
    if l_id is None:
        return l_flow.mean()
    aux = lambda_id * l_id + lambda_tic * (0 if l_tic is None else l_tic)
    return (l_flow + w_aux(t, gamma).to(l_flow.dtype) * aux).mean()
