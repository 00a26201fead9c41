import torch
from hypothesis import given, settings, strategies as st

from rope import apply_rope, axis_pairs, reference_positions, rope_frequencies, video_positions

dims = st.integers(1, 6)


def as_set(pos):
    return {tuple(p) for p in pos.long().tolist()}


@settings(max_examples=60, deadline=None)
@given(dims, dims, dims)
def test_tass_never_collides_with_video(T, H, W):
    video, ref = video_positions(T, H, W), reference_positions(T, H, W, "tass")
    assert video.shape == (T * H * W, 3) and ref.shape == (H * W, 3)
    assert not as_set(video) & as_set(ref)
    # the reference block keeps its internal offsets: (T, H + i, W + j), i-major
    ii, jj = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    assert torch.equal(ref[:, 0], torch.full((H * W,), float(T)))
    assert torch.equal(ref[:, 1], (H + ii).flatten().float())
    assert torch.equal(ref[:, 2], (W + jj).flatten().float())


@settings(max_examples=30, deadline=None)
@given(dims, dims, dims)
def test_shared_collides_spatially_and_far_is_beyond(T, H, W):
    video = video_positions(T, H, W)
    shared = reference_positions(T, H, W, "shared")
    assert torch.equal(shared[:, 1:], video[: H * W, 1:])  # same (i, j) as every video frame
    far = reference_positions(T, H, W, "far", far_gap=5)
    assert torch.all(far[:, 0] == T + 5)


def test_video_positions_t_major():
    pos = video_positions(2, 2, 3)
    assert pos[:6, 0].eq(0).all() and pos[6:, 0].eq(1).all()
    assert pos[4].tolist() == [0.0, 1.0, 1.0]


def test_frequency_split():
    assert axis_pairs(128) == (22, 21, 21) and axis_pairs(32) == (6, 5, 5)
    f = rope_frequencies(64, theta=100.0)
    assert f.shape == (32, 3) and (f > 0).sum(1).eq(1).all()  # one axis per pair
    n_t = axis_pairs(64)[0]
    assert torch.allclose(f[1, 0], torch.tensor(100.0 ** (-1 / n_t)))


def complex_rope(x, pos, freqs):
    """Independent reference: pair (x[k], x[k + D/2]) as a complex number times e^{i angle}."""
    x = x.double()
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:])
    angle = (pos.double()[..., None, :] * freqs.double()).sum(-1)  # [..., N, D/2]
    if angle.dim() == 3:
        angle = angle[:, None]
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


def test_apply_rope_matches_complex_rotation_per_batch_positions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 32, generator=g, dtype=torch.float64)
    pos = torch.rand(2, 7, 3, generator=g) * 20  # fractional, per sample
    freqs = rope_frequencies(32)
    torch.testing.assert_close(apply_rope(x, pos, freqs), complex_rope(x, pos, freqs), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(apply_rope(x[1:], pos[1], freqs), complex_rope(x[1:], pos[1], freqs), rtol=1e-6, atol=1e-6)


def test_zero_angle_is_identity():
    x = torch.randn(1, 2, 5, 64)
    torch.testing.assert_close(apply_rope(x, torch.zeros(5, 3), rope_frequencies(64)), x)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-30, 30), min_size=9, max_size=9))
def test_rope_is_relative(v):
    p, p2, d = torch.tensor(v, dtype=torch.float64).view(3, 1, 3)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 1, 1, 1, 32, generator=g, dtype=torch.float64)
    freqs = rope_frequencies(32)
    dot = (apply_rope(q, p, freqs) * apply_rope(k, p2, freqs)).sum()
    dot_shifted = (apply_rope(q, p + d, freqs) * apply_rope(k, p2 + d, freqs)).sum()
    torch.testing.assert_close(dot, dot_shifted, rtol=1e-9, atol=1e-9)
