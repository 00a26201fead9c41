"""fused.rope_attention against an independent float64 RoPE + masked-softmax attention.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before anything imports `fused`). The interpreter cannot do tl.dot on
bfloat16 (it multiplies the raw bit patterns; unsupported upstream), so bf16 runs only on a GPU;
fp16 covers the 16-bit path on CPU (and CPU autocast runs in fp16); bf16 is checked on a GPU.
Every parity test runs both rotation variants: in-loop (fused_rope=True) and pre-pass (False).
"""
import math
import os

import pytest
import torch
import triton
from hypothesis import given, settings, strategies as st

from fused import rope_attention
from fused.rope_attention import prune_configs, rope_attention_reference, rope_rotate, smem_bytes
from rope import ltx2_positions, ltx2_rope_frequencies, reference_positions, rope_frequencies, video_positions

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
LOW_PRECISION = [torch.float16] if INTERPRET else [torch.float16, torch.bfloat16]
AUTOCAST = torch.float16 if INTERPRET else torch.bfloat16
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # atol = rtol
VARIANTS = pytest.mark.parametrize("fused_rope", [True, False], ids=["in_loop", "pre_pass"])


def rope64(x, pos, freqs, sign=1.0):
    """x rotated in float64 by the RoPE angles sign * pos @ F^T, angles formed in fp32 as the
    kernel's contract says (LTX-2's reach ~1e4 rad, where fp32 rounding is visible)."""
    if pos.dim() == 3:  # [B, N, 3] -> [B, 1, N, 3]
        pos = pos[:, None]
    angles = sign * (pos.float() @ freqs.float().mT).double()  # [(B,) (heads,) N, D/2]
    x1, x2 = x.double().chunk(2, dim=-1)
    return torch.cat([x1 * angles.cos() - x2 * angles.sin(), x2 * angles.cos() + x1 * angles.sin()], -1)


def attention64(q, k, v, pos, freqs, kv_len, d_out):
    """Output and (dq, dk, dv) of RoPE attention, all in float64 via autograd."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    N, D = q.shape[-2:]
    qr, kr = rope64(q, pos, freqs), rope64(k, pos, freqs)
    scores = qr @ kr.transpose(-1, -2) / math.sqrt(D)
    if kv_len is not None:
        visible = torch.arange(N, device=q.device)[None, :] < kv_len.to(q.device)[:, None]
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = scores.softmax(-1) @ v
    grads = torch.autograd.grad(out, (q, k, v), d_out.double())
    return out.detach(), grads


def inputs(B, H, N, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, d_out = (torch.randn(B, H, N, D, generator=g).to(DEVICE, dtype) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), d_out


def tass_positions(T, H, W):
    """Video tokens then one reference frame, as the model lays them out."""
    return torch.cat([video_positions(T, H, W), reference_positions(T, H, W, "tass")])


def check(q, k, v, pos, freqs, kv_len, d_out, fused_rope=True, autocast=None, fn=rope_attention):
    """Kernel output and gradients match the float64 reference within the tolerance of the
    attention dtype (the autocast dtype if given, else q's); gradients come back in each input's dtype."""
    pos, freqs = pos.to(DEVICE), freqs.to(DEVICE)
    kv_len = None if kv_len is None else kv_len.to(DEVICE)
    with torch.autocast(DEVICE, autocast or torch.float16, enabled=autocast is not None):
        out = fn(q, k, v, pos, freqs, kv_len, fused_rope=fused_rope)
    dtype = autocast or q.dtype
    assert out.shape == q.shape and out.dtype == dtype
    grads = torch.autograd.grad(out, (q, k, v), d_out.to(dtype))
    assert [g.dtype for g in grads] == [x.dtype for x in (q, k, v)]
    ref_out, ref_grads = attention64(q, k, v, pos, freqs, kv_len, d_out.to(dtype))
    tol = TOL[dtype]
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


@VARIANTS
def test_tass_video_plus_reference(fused_rope):
    T, H, W = 2, 3, 4  # N = 24 video + 12 reference tokens
    q, k, v, d_out = inputs(2, 2, (T + 1) * H * W, 32, torch.float32)
    kv_len = torch.tensor([36, 24])  # sample 1 drops the reference: keys < 24 only
    check(q, k, v, tass_positions(T, H, W), rope_frequencies(32), kv_len, d_out, fused_rope)


def test_per_sample_fractional_positions():
    g = torch.Generator().manual_seed(1)
    q, k, v, d_out = inputs(2, 1, 45, 64, torch.float32, seed=1)
    pos = torch.rand(2, 45, 3, generator=g) * 30 - 5
    check(q, k, v, pos, rope_frequencies(64), torch.tensor([45, 17]), d_out)


@VARIANTS
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision(dtype, fused_rope):
    q, k, v, d_out = inputs(2, 2, 50, 64, dtype, seed=2)
    check(q, k, v, tass_positions(1, 5, 5), rope_frequencies(64), torch.tensor([50, 25]), d_out, fused_rope)


@VARIANTS
def test_autocast_mixed_dtypes(fused_rope):
    """Under autocast, fp32 q/k (q_norm/k_norm with fp32 weights) and half v (to_v) run in the
    autocast dtype; q/k gradients come back in fp32."""
    q, k, _, d_out = inputs(2, 2, 30, 32, torch.float32, seed=6)
    v = inputs(2, 2, 30, 32, AUTOCAST, seed=7)[2]
    check(q, k, v, tass_positions(1, 3, 5), rope_frequencies(32), torch.tensor([30, 15]), d_out,
          fused_rope, autocast=AUTOCAST)


def test_mixed_dtypes_outside_autocast_rejected():
    q = torch.zeros(1, 1, 10, 32, device=DEVICE)
    with pytest.raises(ValueError):
        rope_attention(q, q, q.half(), torch.zeros(10, 3), rope_frequencies(32))


@VARIANTS
def test_per_head_ltx2_table(fused_rope):
    """LTX-2's per-head [heads, D/2, 3] table on its normalised positions, per-sample kv_len."""
    heads, D = 2, 64
    q, k, v, d_out = inputs(2, heads, 40, D, torch.float32, seed=8)
    pos = ltx2_positions(tass_positions(3, 2, 5))
    check(q, k, v, pos, ltx2_rope_frequencies(heads * D, heads), torch.tensor([40, 30]), d_out, fused_rope)


@pytest.mark.parametrize("inverse", [False, True])
def test_rope_rotate(inverse):
    """The pre-pass rotation, and its inverse (the same with negated angles)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 2, 21, 32, generator=g).to(DEVICE)
    pos, freqs = (torch.rand(2, 21, 3, generator=g) * 10).to(DEVICE), ltx2_rope_frequencies(64, 2).to(DEVICE)
    want = rope64(x, pos, freqs, -1.0 if inverse else 1.0)
    torch.testing.assert_close(rope_rotate(x, pos, freqs, inverse).double(), want, atol=1e-5, rtol=1e-5)


def test_head_dim_128():
    q, k, v, d_out = inputs(1, 1, 20, 128, torch.float32, seed=3)
    check(q, k, v, tass_positions(1, 2, 5), rope_frequencies(128), None, d_out)


def test_strided_inputs_and_output_layout():
    """q, k, v as the model makes them ([B, N, heads, D] memory viewed as [B, heads, N, D])."""
    B, N, H, D = 2, 19, 2, 32
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, N, H, D, generator=g).to(DEVICE).transpose(1, 2).requires_grad_()
               for _ in range(3))
    d_out = torch.randn(B, H, N, D, generator=g).to(DEVICE)
    pos = torch.rand(N, 3, generator=g) * 8
    check(q, k, v, pos, rope_frequencies(D), torch.tensor([19, 7]), d_out)
    out = rope_attention(q, k, v, pos.to(DEVICE), rope_frequencies(D).to(DEVICE))
    assert out.transpose(1, 2).is_contiguous()  # so the model's transpose + flatten is free


def test_reference_function_matches_float64():
    q, k, v, d_out = inputs(2, 2, 18, 32, torch.float32, seed=5)
    pos, freqs, kv_len = tass_positions(2, 2, 3).to(DEVICE), rope_frequencies(32).to(DEVICE), torch.tensor([18, 6])
    ref_out, _ = attention64(q, k, v, pos, freqs, kv_len, d_out)
    out = rope_attention_reference(q, k, v, pos, freqs, kv_len.to(DEVICE))
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("D, pos_shape, freq_rows, kv_len", [
    (48, (10, 3), 24, None),  # unsupported head dim
    (32, (9, 3), 16, None),  # pos does not match N
    (32, (10, 3), 8, None),  # freqs not [D/2, 3]
    (32, (10, 3), 16, torch.tensor([10, 10])),  # kv_len not [B]
])
def test_rejects_bad_shapes(D, pos_shape, freq_rows, kv_len):
    q = torch.zeros(1, 1, 10, D, device=DEVICE)
    with pytest.raises(ValueError):
        rope_attention(q, q, q, torch.zeros(pos_shape), torch.zeros(freq_rows, 3), kv_len)


@st.composite
def cases(draw):
    B, H, D = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([32, 64]))
    layout = draw(st.sampled_from(["tass", "fractional", "fractional_per_sample"]))
    seed = draw(st.integers(0, 2**16))
    if layout == "tass":
        T, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
        N = (T + 1) * h * w
        pos = tass_positions(T, h, w)
    else:
        N = draw(st.integers(1, 80))
        shape = (B, N, 3) if layout == "fractional_per_sample" else (N, 3)
        pos = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 40 - 8
    kv_len = draw(st.none() | st.lists(st.integers(1, N), min_size=B, max_size=B).map(torch.tensor))
    dtype = draw(st.sampled_from([torch.float32, *LOW_PRECISION]))
    freqs = draw(st.sampled_from([rope_frequencies(D), ltx2_rope_frequencies(H * D, H)]))
    return B, H, N, D, pos, freqs, kv_len, dtype, draw(st.booleans()), seed


@settings(max_examples=25, deadline=None)
@given(cases())
def test_matches_float64_reference(case):
    B, H, N, D, pos, freqs, kv_len, dtype, fused_rope, seed = case
    q, k, v, d_out = inputs(B, H, N, D, dtype, seed)
    check(q, k, v, pos, freqs, kv_len, d_out, fused_rope)


LTX23 = dict(rope="ltx2", gated_attention=True, cross_attention_adaln=True, caption_projection=False)


@pytest.mark.parametrize("features", [{}, LTX23], ids=["axes", "ltx2"])
def test_dit_triton_backend_matches_torch_backend(features):
    """The model's two attention backends agree, forward and backward, with a dropped reference;
    "ltx2" is the tiny config with the ltx2-video features (per-head RoPE table)."""
    from tests.helpers import tiny_dit, tiny_inputs

    z_t, t, y, y_mask, z_ref = tiny_inputs(B=2, T=2, H=3, W=3)
    outs, grads = [], []
    for backend in ("torch", "triton"):
        model = tiny_dit(attn_backend=backend, **features)
        z = z_t.clone().requires_grad_(True)
        v = model(z, t, y, y_mask, z_ref=z_ref, ref_keep=torch.tensor([True, False]))
        v.square().sum().backward()
        outs.append(v.detach())
        grads.append((z.grad, model.blocks[0].attn1.to_q.weight.grad))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@VARIANTS
def test_torch_compile(fused_rope):
    """The registered ops under torch.compile (fullgraph, so no graph break) and autocast. On the
    CPU interpreter they are opaque to inductor; on a GPU inductor traces into the kernels."""
    q, k, _, d_out = inputs(1, 2, 24, 32, torch.float32, seed=10)
    v = inputs(1, 2, 24, 32, AUTOCAST, seed=11)[2]
    check(q, k, v, tass_positions(1, 3, 4), rope_frequencies(32), None, d_out, fused_rope,
          autocast=AUTOCAST, fn=torch.compile(rope_attention, fullgraph=True))


def test_smem_estimate_by_hand():
    # forward, 128 x 128 tiles, 3 stages, D 128, bf16: q tile + 3 x (k, v tiles) + P tile
    assert smem_bytes("fwd", 128, 128, 3, 128, 2) == 2 * (128 * 128 + 3 * 2 * 128 * 128 + 128 * 128)
    # dK/dV, 64 x 128, 2 stages, D 64, fp32: k, v tiles + 2 x (q, dO tiles) + P^T tile
    assert smem_bytes("dkdv", 64, 128, 2, 64, 4) == 4 * (2 * 128 * 64 + 2 * 2 * 64 * 64 + 64 * 128)
    # dQ, 128 x 64, 2 stages, D 128, fp16: q, dO tiles + 2 x (k, v tiles) + dS tile
    assert smem_bytes("dq", 128, 64, 2, 128, 2) == 2 * (2 * 128 * 128 + 2 * 2 * 64 * 128 + 128 * 64)


def test_prune_configs():
    def config(bm, bn, stages):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=stages)

    def tiles(configs):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) for c in configs]

    configs = [config(128, 128, 3), config(128, 128, 2), config(64, 64, 3), config(16, 16, 1)]
    # Hopper's 227 KB, D 128, bf16: 128 x 128 x 3 stages needs 256 KB (test above), x 2 needs 192 KB.
    assert tiles(prune_configs("fwd", configs, 8192, 128, 2, 232448)) == [(128, 128, 2), (64, 64, 3), (16, 16, 1)]
    # N = 40 rounds up to 64: no block larger than that.
    assert tiles(prune_configs("fwd", configs, 64, 128, 2, 232448)) == [(64, 64, 3), (16, 16, 1)]
    # Nothing fits: the smallest config is kept.
    assert tiles(prune_configs("fwd", configs[:3], 16, 128, 2, 232448)) == [(64, 64, 3)]
