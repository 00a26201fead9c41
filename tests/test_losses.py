import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from losses import add_noise, clean_estimate, flow_loss, flow_target, identity_loss, temporal_identity_loss, total_loss, w_aux


def test_clean_estimate_recovers_z0_with_true_velocity():
    z_0, eps, t = torch.randn(4, 3, 2, 5, 5, dtype=torch.float64), torch.randn(4, 3, 2, 5, 5, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    z_t = add_noise(z_0, eps, t)
    torch.testing.assert_close(clean_estimate(z_t, t, flow_target(z_0, eps)), z_0)


def test_w_aux_range_monotone_and_limits():
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    w = w_aux(t)
    assert w.min() >= 0 and w.max() <= 1
    assert (w[1:] <= w[:-1]).all()
    assert abs(w[0].item() - 1.0) < 1e-7 and w[-1] == 0.0
    # hand value at t = 0.5: SNR = (0.5 / 0.5001)^2, w = SNR / (SNR + 1)
    s = (0.5 / (0.5 + 1e-4)) ** 2
    assert math.isclose(w[500].item(), s / (s + 1), rel_tol=1e-12)
    assert math.isclose(w_aux(t[500], gamma=2.0).item(), (s / (s + 1)) ** 2, rel_tol=1e-12)


def hand_losses(e, e_ref, m, eps=1e-6):
    """Loops in float64, written from the paper's formulas."""
    B, F_, _ = e.shape
    lid, ltic = [], []
    for b in range(B):
        msum = sum(m[b, f].item() for f in range(F_))
        cos = lambda a, c: (a @ c / (a.norm() * c.norm())).item()
        faces = [f for f in range(F_) if m[b, f] > 0]  # terms with m_f = 0 vanish
        lid.append(sum(m[b, f].item() * (1 - cos(e[b, f], e_ref[b])) for f in faces) / (msum + eps))
        e_bar = sum(m[b, f] * e[b, f] for f in faces) / (msum + eps)
        ltic.append(sum(m[b, f].item() * (1 - cos(e[b, f], e_bar)) for f in faces) / (msum + eps))
    return torch.tensor(lid, dtype=torch.float64), torch.tensor(ltic, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(0, 10_000))
def test_identity_losses_match_hand_computation(B, F_, seed):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(B, F_, 8, generator=g, dtype=torch.float64)
    e_ref = torch.randn(B, 8, generator=g, dtype=torch.float64)
    m = (torch.rand(B, F_, generator=g) > 0.3).double()
    lid, ltic = hand_losses(e, e_ref, m)
    torch.testing.assert_close(identity_loss(e, e_ref, m), lid)
    torch.testing.assert_close(temporal_identity_loss(e, m), ltic)


def test_identical_and_constant_embeddings_give_zero():
    e_ref = torch.randn(2, 16, dtype=torch.float64)
    e = e_ref[:, None].repeat(1, 5, 1) * 3.0  # same direction, other norm
    m = torch.ones(2, 5, dtype=torch.float64)
    assert identity_loss(e, e_ref, m).abs().max() < 1e-12
    assert temporal_identity_loss(e, m).abs().max() < 1e-12


def test_masked_frames_change_neither_value_nor_gradient():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(2, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    e_ref = torch.randn(2, 8, generator=g, dtype=torch.float64)
    m = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.float64)
    e2 = e.detach().clone()
    e2[m == 0] = torch.randn(int((m == 0).sum()), 8, generator=g, dtype=torch.float64) * 10
    e2.requires_grad_(True)
    for fn in (lambda x: identity_loss(x, e_ref, m), lambda x: temporal_identity_loss(x, m)):
        a, b = fn(e), fn(e2)
        torch.testing.assert_close(a, b)
        ga, = torch.autograd.grad(a.sum(), e)
        gb, = torch.autograd.grad(b.sum(), e2)
        assert ga[m == 0].abs().max() == 0 and gb[m == 0].abs().max() == 0
        torch.testing.assert_close(ga[m == 1], gb[m == 1])


def test_total_loss_formula():
    l_flow, l_id, l_tic = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.2]), torch.tensor([0.1, 0.4])
    t = torch.tensor([0.25, 0.75])
    s = ((1 - t) / (t + 1e-4)) ** 2
    w = s / (s + 1)
    expected = (l_flow + w * (0.1 * l_id + 0.05 * l_tic)).mean()
    torch.testing.assert_close(total_loss(l_flow, t, l_id, l_tic), expected)
    torch.testing.assert_close(total_loss(l_flow, t), l_flow.mean())


def test_weighted_flow_loss_against_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    v, z_0, eps = (torch.randn(2, 3, 2, 2, 2, generator=g) for _ in range(3))
    w = 1 + 4 * (torch.rand(2, 1, 2, 2, 2, generator=g) > 0.5).float()
    vd, zd, ed, wd = v.double(), z_0.double(), eps.double(), w.double()
    for b in range(2):
        num = den = 0.0
        for c in range(3):
            for i in range(2):
                for j in range(2):
                    for k in range(2):
                        err = (vd[b, c, i, j, k] - (ed[b, c, i, j, k] - zd[b, c, i, j, k])) ** 2
                        num, den = num + wd[b, 0, i, j, k] * err, den + wd[b, 0, i, j, k]
        assert flow_loss(v, z_0, eps, w)[b].item() == pytest.approx(num.item() / den.item(), rel=1e-6)
    torch.testing.assert_close(flow_loss(v, z_0, eps, torch.ones_like(w)), flow_loss(v, z_0, eps))  # weight 1: the mean
