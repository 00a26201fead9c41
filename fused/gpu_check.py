"""The fused RoPE-attention kernel's first GPU run, in one command (planned for < 10 minutes on
an H100), printing one markdown table (docs/kernel.md says what to look for):

    python -m fused.gpu_check

1. tests/test_kernel.py on the hardware (one fixed config; bf16 and CUDA autocast included).
2. fused/bench.py:measure at N = 2560, 6528, 26112 (B 1, H 32, D 128, bf16): both kernel
   variants, cuDNN SDPA, eager and compiled RoPE + SDPA; forward and forward + backward ms,
   against the targets and measured anchors of docs/kernel.md.
3. The autotune choice of each kernel per key (N bucket, D, variant, dtypes), with its registers,
   spills and shared memory (compiled vs the estimate used for pruning).
4. One bf16 training step of the `small` config with each attention backend (bench/throughput.py:bench).
A section that fails puts its error in the table and the others still run.
"""
import os
import subprocess
import sys
import time

os.environ.pop("ROPE_ATTENTION_AUTOTUNE", None)  # this process autotunes; pytest's conftest fixes a config

import torch  # noqa: E402

from bench import throughput as benchmark  # noqa: E402
from fused import bench as bench_attention  # noqa: E402
from fused.rope_attention import _bwd_dkdv_kernel, _bwd_dq_kernel, _fwd_kernel, smem_bytes  # noqa: E402

NS = (2560, 6528, 26112)
B, H, D, DTYPE = 1, 32, 128, torch.bfloat16
ANCHORS = {(6528, "cudnn"): (1.045, 4.248), (6528, "eager"): (2.303, 6.859)}  # H100, measured
KERNELS = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}
CONSTANTS = ("BLOCK_M", "BLOCK_N", "HEAD_DIM", "FUSED_ROPE")


def run_tests() -> list[tuple]:
    """pytest's summary line for tests/test_kernel.py, run on the GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "pytest", "tests/test_kernel.py", "-q", "-p", "no:cacheprovider"],
                       capture_output=True, text=True, env=env, timeout=300)
    lines = p.stdout.strip().splitlines()
    failed = [line for line in lines if line.startswith("FAILED")]
    return [("tests", "tests/test_kernel.py", lines[-1] if lines else p.stderr[-200:], "all pass")] + [
        ("tests", "failure", line[:160], "") for line in failed]


def run_bench() -> list[tuple]:
    """fwd / fwd+bwd ms of every mode at each N, with its target or anchor."""
    rows = []
    for n in NS:
        for mode, (fwd, both) in bench_attention.measure(n, bench_attention.MODES, DTYPE, B, H, D).items():
            note = bench_attention.target_note(n, mode, fwd, both)
            if (n, mode) in ANCHORS:
                note = "H100 anchor %.3f / %.3f ms" % ANCHORS[n, mode]
            rows.append((f"attention N={n}", mode, f"{fwd:.3f} / {both:.3f} ms", note))
        torch.cuda.empty_cache()
    return rows


def compiled_variants(autotuner):
    """{(BLOCK_M, BLOCK_N, HEAD_DIM, FUSED_ROPE, warps, stages): (shared bytes, registers, spills)}
    of every variant Triton compiled for this kernel."""
    jit = autotuner.fn
    slots = [(jit.arg_names.index(name),) for name in CONSTANTS]
    out = {}
    for kernel_cache, *_ in jit.device_caches.values():
        for k in kernel_cache.values():
            key = tuple(k.src.constants.get(s) for s in slots) + (k.metadata.num_warps, k.metadata.num_stages)
            out[key] = (k.metadata.shared, getattr(k, "n_regs", None), getattr(k, "n_spills", None))
    return out


def run_autotune_report() -> list[tuple]:
    """Each kernel's autotune choices with registers, spills and shared memory (bf16 estimate)."""
    rows = []
    for name, kernel in KERNELS.items():
        variants = compiled_variants(kernel)
        spills = [s for _, _, s in variants.values() if s]
        rows.append((f"autotune {name}", "compiled variants", f"{len(variants)}, {len(spills)} with spills", "0 spills"))
        for key, cfg in kernel.cache.items():
            bm, bn, d = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], key[1]
            shared, regs, spill = variants.get((bm, bn, d, key[2], cfg.num_warps, cfg.num_stages), (None,) * 3)
            estimate = smem_bytes(name, bm, bn, cfg.num_stages, d, 2)
            rows.append((f"autotune {name}", f"key {key}",
                         f"{bm}x{bn} w{cfg.num_warps} s{cfg.num_stages}: {regs} regs, {spill} spills, "
                         f"{shared} B shared (estimate {estimate})", ""))
    return rows


def run_training() -> list[tuple]:
    """One bf16 training step of the `small` config per attention backend."""
    rows = []
    for attn in ("torch", "triton"):
        r = benchmark.bench("small", attn, 4, 3, torch.device("cuda"), DTYPE)
        rows.append(("train small bf16", attn, f"{r['train_ms']:.1f} ms/step, {r['train_tok_s']:.0f} tok/s, "
                                               f"{r['peak_gb']:.2f} GB peak, batch 4 x {r['tokens'] // 4} tokens", ""))
    return rows


def main() -> int:
    if not torch.cuda.is_available():
        print("python -m fused.gpu_check needs a CUDA GPU; on a CPU run "
              "`TRITON_INTERPRET=1 python -m pytest tests/test_kernel.py` instead.")
        return 1
    import triton
    start = time.time()
    rows = []
    for section in (run_tests, run_bench, run_autotune_report, run_training):
        t0 = time.time()
        try:
            rows += section()
        except Exception as e:  # a first run: report the failure, keep the other sections
            rows.append((section.__name__, "ERROR", f"{type(e).__name__}: {str(e)[:300]}", ""))
        rows.append((section.__name__, "seconds", f"{time.time() - t0:.0f}", ""))
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"B {B}, H {H}, D {D}, bf16; {time.time() - start:.0f} s in all\n")
    print("| section | item | result | target / anchor |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(x).replace("|", "/") for x in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
