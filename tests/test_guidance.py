import math

import torch
from hypothesis import given, settings, strategies as st

from guidance import decoupled_cfg, dropout_masks, euler_sample, shift_for_tokens, three_stream_velocity, timesteps
from losses import add_noise, flow_target
from tests.helpers import tiny_dit, tiny_inputs

scales = st.floats(-10, 10)


def streams(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(3)]


def test_cfg_unit_scales_give_full_condition():
    v_0, v_y, v_yr = streams()
    torch.testing.assert_close(decoupled_cfg(v_0, v_y, v_yr, 1.0, 1.0), v_yr)


@settings(max_examples=30, deadline=None)
@given(scales)
def test_cfg_without_reference_is_classic_cfg(s_y):
    v_0, v_y, v_yr = streams()
    torch.testing.assert_close(decoupled_cfg(v_0, v_y, v_yr, s_y, 0.0), v_0 + s_y * (v_y - v_0))


@settings(max_examples=30, deadline=None)
@given(scales, scales, scales, scales, st.floats(-3, 3))
def test_cfg_is_linear_in_scales(a, b, c, d, k):
    v_0, v_y, v_yr = streams()
    f = lambda s_y, s_r: decoupled_cfg(v_0, v_y, v_yr, s_y, s_r) - v_0
    torch.testing.assert_close(f(a + k * c, b + k * d), f(a, b) + k * f(c, d))


def test_batched_three_streams_equal_three_separate_forwards():
    model = tiny_dit()
    z_t, t, y, y_mask, z_ref = tiny_inputs()
    y_0, y_0_mask = torch.randn_like(y), torch.zeros_like(y_mask)
    y_0_mask[:, 0] = True
    with torch.no_grad():
        v = three_stream_velocity(model, z_t, t, y, y_mask, y_0, y_0_mask, z_ref, 5.0, 7.5)
        v_0 = model(z_t, t, y_0, y_0_mask)
        v_y = model(z_t, t, y, y_mask)
        v_yr = model(z_t, t, y, y_mask, z_ref=z_ref)
    expected = v_0 + 5.0 * (v_y - v_0) + 7.5 * (v_yr - v_y)
    torch.testing.assert_close(v, expected, rtol=1e-4, atol=1e-4)


def test_dropout_masks_rates_independent_and_seeded():
    keep_y, keep_r = dropout_masks(40_000, 0.05, 0.20, torch.Generator().manual_seed(3))
    assert abs((~keep_y).float().mean().item() - 0.05) < 0.006
    assert abs((~keep_r).float().mean().item() - 0.20) < 0.01
    both = ((~keep_y) & (~keep_r)).float().mean().item()
    assert abs(both - 0.05 * 0.20) < 0.003  # independent
    again = dropout_masks(40_000, 0.05, 0.20, torch.Generator().manual_seed(3))
    assert torch.equal(keep_y, again[0]) and torch.equal(keep_r, again[1])


def test_timesteps_schedule():
    ts = timesteps(10)
    torch.testing.assert_close(ts, torch.linspace(1, 0, 11))
    shifted = timesteps(4, mu=math.log(3.0))  # u = 0.5 -> 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and abs(shifted[2].item() - 0.75) < 1e-6
    assert (shifted[1:] < shifted[:-1]).all()
    assert abs(shift_for_tokens(1024) - 0.95) < 1e-12 and abs(shift_for_tokens(4096) - 2.05) < 1e-12


def test_euler_with_true_velocity_recovers_data():
    g = torch.Generator().manual_seed(0)
    z_0, eps = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    z = euler_sample(lambda z, t: flow_target(z_0, eps), add_noise(z_0, eps, torch.ones(2)), timesteps(7, 1.0).double(), progress=False)
    torch.testing.assert_close(z, z_0)
