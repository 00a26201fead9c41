"""Benchmark the fused RoPE + attention kernel against PyTorch, as a markdown table.

Modes, all non-causal, no key mask (kv_len = None), B=1 by default:
  triton          fused.rope_attention, RoPE rotated inside the attention loops (fused_rope=True)
  triton-prepass  fused.rope_attention, q and k rotated once in a pre-pass (fused_rope=False)
  eager           rope.apply_rope on q, k + F.scaled_dot_product_attention (default backend)
  compile         the same, under torch.compile
  cudnn           F.scaled_dot_product_attention alone on cuDNN, no RoPE: the bound for `triton`

Sequence lengths are video tokens plus one reference frame, (T + 1) * H * W, positioned by
TASS-RoPE (rope.video_positions + rope.reference_positions):
  2560  = (9 + 1)  * 16 * 16
  6528  = (16 + 1) * 16 * 24
  26112 = (16 + 1) * 32 * 48
Any other --n uses a single row of N tokens (timing does not depend on the position values).
FLOPs: forward 4 B H N^2 D; backward 2.5x that, so forward + backward 3.5x.
TARGETS: the first GPU run's goals for `triton` (H100, bf16, B 1, H 32, D 128; docs/kernel.md).

  python -m fused.bench                       # needs a CUDA GPU
  TRITON_INTERPRET=1 python -m fused.bench --check   # tiny correctness smoke test, CPU ok
"""
import argparse
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from fused import rope_attention
from fused.rope_attention import HEAD_DIMS, rope_attention_reference
from infra.cli import add_flags, config_from, flag
from rope import apply_rope, reference_positions, rope_frequencies, video_positions

GRIDS = {2560: (9, 16, 16), 6528: (16, 16, 24), 26112: (16, 32, 48)}  # N -> (T, H, W)
MODES = ("triton", "triton-prepass", "eager", "compile", "cudnn")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TARGETS = {6528: (1.45, 5.3)}  # N -> (fwd ms, fwd+bwd ms) for `triton` on an H100


def positions(n: int) -> tuple[torch.Tensor, str]:
    """[N, 3] positions and a description of the layout."""
    if n in GRIDS:
        T, H, W = GRIDS[n]
        pos = torch.cat([video_positions(T, H, W), reference_positions(T, H, W, "tass")])
        return pos, f"({T}+1)x{H}x{W}"
    return video_positions(1, 1, n), f"1x1x{n}"


def rope_sdpa(q, k, v, pos, freqs):
    return F.scaled_dot_product_attention(apply_rope(q, pos, freqs), apply_rope(k, pos, freqs), v)


def cudnn_sdpa(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def mode_fns(pos, freqs):
    compiled = torch.compile(rope_sdpa)
    return {
        "triton": lambda q, k, v: rope_attention(q, k, v, pos, freqs),
        "triton-prepass": lambda q, k, v: rope_attention(q, k, v, pos, freqs, fused_rope=False),
        "eager": lambda q, k, v: rope_sdpa(q, k, v, pos, freqs),
        "compile": lambda q, k, v: compiled(q, k, v, pos, freqs),
        "cudnn": cudnn_sdpa,
    }


def measure(n: int, modes, dtype, B: int, H: int, D: int) -> dict[str, tuple[float, float]]:
    """mode -> (forward ms, forward + backward ms) at sequence length n (median of do_bench)."""
    pos, _ = positions(n)
    pos, freqs = pos.cuda(), rope_frequencies(D).cuda()
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    d_out = torch.randn(B, H, n, D, device="cuda", dtype=dtype)
    times = {}
    for mode, fn in mode_fns(pos, freqs).items():
        if mode not in modes:
            continue
        fn(q, k, v).backward(d_out)  # compile / autotune outside the timed region
        with torch.no_grad():
            fn(q, k, v)
            fwd = do_bench(lambda: fn(q, k, v))
        fwd_bwd = do_bench(lambda: fn(q, k, v).backward(d_out), grad_to_none=[q, k, v])
        times[mode] = fwd, fwd_bwd
    return times


def target_note(n: int, mode: str, fwd: float, fwd_bwd: float) -> str:
    """'met' / 'missed' against TARGETS for the in-loop kernel, else empty."""
    if mode != "triton" or n not in TARGETS:
        return ""
    t_fwd, t_both = TARGETS[n]
    return f"< {t_fwd} / < {t_both} ms: {'met' if fwd < t_fwd and fwd_bwd < t_both else 'missed'}"


def bench(args) -> None:
    dtype, B, H, D = DTYPES[args.dtype], args.batch, args.heads, args.dim
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"B={B}, heads={H}, D={D}, {args.dtype}\n")
    print("| N | grid (T+1)xHxW | mode | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | target |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for n in args.n:
        flops = 4 * B * H * n * n * D
        times = measure(n, args.modes, dtype, B, H, D)
        torch.cuda.empty_cache()  # measure's tensors are freed on return
        for mode, (fwd, fwd_bwd) in times.items():
            print(f"| {n} | {positions(n)[1]} | {mode} | {fwd:.3f} | {flops / fwd * 1e-9:.1f} | "
                  f"{fwd_bwd:.3f} | {3.5 * flops / fwd_bwd * 1e-9:.1f} | {target_note(n, mode, fwd, fwd_bwd)} |",
                  flush=True)
        if "triton" in times and "cudnn" in times:
            ratios.append((n, *(t / s for t, s in zip(times["triton"], times["cudnn"]))))
    if ratios:
        print("\ntime of triton (RoPE fused) / time of cuDNN SDPA (no RoPE):\n")
        print("| N | fwd | fwd+bwd |\n|---|---|---|")
        for n, fwd, fwd_bwd in ratios:
            print(f"| {n} | {fwd:.2f}x | {fwd_bwd:.2f}x |")


def check() -> bool:
    """Kernel vs rope_attention_reference on a tiny ragged case with kv_len < N, fwd + grads."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not triton.knobs.runtime.interpret:
        print("--check without a GPU needs the Triton interpreter: TRITON_INTERPRET=1 python -m fused.bench --check")
        return False
    dtype, tol = (torch.bfloat16, 3e-2) if device == "cuda" else (torch.float32, 1e-4)
    torch.manual_seed(0)
    B, H, D, (T, Hg, Wg) = 2, 2, 64, (2, 3, 5)
    pos = torch.cat([video_positions(T, Hg, Wg), reference_positions(T, Hg, Wg, "tass")]).to(device)
    N, freqs = pos.shape[0], rope_frequencies(D).to(device)
    kv_len = torch.tensor([N, T * Hg * Wg], device=device)  # sample 1 hides the reference frame
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    d_out = torch.randn(B, H, N, D, device=device, dtype=dtype)

    def run(fn, **kw):
        out = fn(q, k, v, pos, freqs, kv_len, **kw)
        return out, *torch.autograd.grad(out, (q, k, v), d_out)

    ok = True
    want = run(rope_attention_reference)
    for fused_rope in (True, False):
        for name, got, ref in zip(("out", "dq", "dk", "dv"), run(rope_attention, fused_rope=fused_rope), want):
            err = (got.float() - ref.float()).abs().max().item()
            ok &= err <= tol * max(1.0, ref.float().abs().max().item())
            print(f"fused_rope={fused_rope} {name}: max |kernel - reference| = {err:.2e}")
    print(f"check {'passed' if ok else 'FAILED'} (N={N}, D={D}, kv_len={kv_len.tolist()}, {dtype}, {device})")
    return ok


@dataclass
class BenchConfig:
    n: list = flag(list(GRIDS), "sequence lengths N (video + reference tokens)")
    batch: int = flag(1, "batch B")
    heads: int = flag(32, "attention heads H")
    dim: int = flag(128, "head dim D: 32, 64 or 128")
    dtype: str = flag("bf16", f"one of {sorted(DTYPES)}")
    modes: list = flag(list(MODES), f"implementations to time, of {list(MODES)}")
    check: bool = flag(False, "only run a tiny correctness check (works on CPU with TRITON_INTERPRET=1)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = config_from(BenchConfig, add_flags(parser, BenchConfig).parse_args(argv))
    if args.dim not in HEAD_DIMS or args.dtype not in DTYPES or not set(args.modes) <= set(MODES):
        parser.error(f"--dim must be one of {HEAD_DIMS}, --dtype one of {sorted(DTYPES)}, --modes of {list(MODES)}")
    if args.check:
        return 0 if check() else 1
    if not torch.cuda.is_available():
        print("python -m fused.bench needs a CUDA GPU (no CUDA device found); "
              "use `TRITON_INTERPRET=1 python -m fused.bench --check` for a CPU smoke test.")
        return 1
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
