"""fused.rope_attention against an independent float64 RoPE + masked-softmax attention.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before anything imports `kernels`). The interpreter cannot do tl.dot on
bfloat16 (it multiplies the raw bit patterns; unsupported upstream), so bf16 runs only on a GPU;
fp16 covers the 16-bit path on CPU.
"""
import math
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fused import rope_attention
from fused.rope_attention import rope_attention_reference
from rope import apply_rope, reference_positions, rope_frequencies, video_positions

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
LOW_PRECISION = [torch.float16] if INTERPRET else [torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # atol = rtol


def attention64(q, k, v, pos, freqs, kv_len, d_out):
    """Output and (dq, dk, dv) of RoPE attention, all in float64 via autograd."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    N, D = q.shape[-2:]
    qr, kr = apply_rope(q, pos, freqs), apply_rope(k, pos, freqs)
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


def check(q, k, v, pos, freqs, kv_len, d_out):
    """Kernel output and gradients match the float64 reference within the dtype's tolerance."""
    pos, freqs = pos.to(DEVICE), freqs.to(DEVICE)
    kv_len = None if kv_len is None else kv_len.to(DEVICE)
    out = rope_attention(q, k, v, pos, freqs, kv_len)
    assert out.shape == q.shape and out.dtype == q.dtype
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    ref_out, ref_grads = attention64(q, k, v, pos, freqs, kv_len, d_out)
    tol = TOL[q.dtype]
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def test_tass_video_plus_reference():
    T, H, W = 2, 3, 4  # N = 24 video + 12 reference tokens
    q, k, v, d_out = inputs(2, 2, (T + 1) * H * W, 32, torch.float32)
    kv_len = torch.tensor([36, 24])  # sample 1 drops the reference: keys < 24 only
    check(q, k, v, tass_positions(T, H, W), rope_frequencies(32), kv_len, d_out)


def test_per_sample_fractional_positions():
    g = torch.Generator().manual_seed(1)
    q, k, v, d_out = inputs(2, 1, 45, 64, torch.float32, seed=1)
    pos = torch.rand(2, 45, 3, generator=g) * 30 - 5
    check(q, k, v, pos, rope_frequencies(64), torch.tensor([45, 17]), d_out)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision(dtype):
    q, k, v, d_out = inputs(2, 2, 50, 64, dtype, seed=2)
    check(q, k, v, tass_positions(1, 5, 5), rope_frequencies(64), torch.tensor([50, 25]), d_out)


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
    return B, H, N, D, pos, kv_len, dtype, seed


@settings(max_examples=25, deadline=None)
@given(cases())
def test_matches_float64_reference(case):
    B, H, N, D, pos, kv_len, dtype, seed = case
    q, k, v, d_out = inputs(B, H, N, D, dtype, seed)
    check(q, k, v, pos, rope_frequencies(D), kv_len, d_out)


def test_dit_triton_backend_matches_torch_backend():
    """The model's two attention backends agree, forward and backward, with a dropped reference."""
    from tests.helpers import tiny_dit, tiny_inputs

    z_t, t, y, y_mask, z_ref = tiny_inputs(B=2, T=2, H=3, W=3)
    outs, grads = [], []
    for backend in ("torch", "triton"):
        model = tiny_dit(attn_backend=backend)
        z = z_t.clone().requires_grad_(True)
        v = model(z, t, y, y_mask, z_ref=z_ref, ref_keep=torch.tensor([True, False]))
        v.square().sum().backward()
        outs.append(v.detach())
        grads.append((z.grad, model.blocks[0].attn1.to_q.weight.grad))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
