"""Throughput benchmark: DiT training step and sampling latency, per attention backend.

    python -m bench.throughput --config small                       # CPU
    python -m bench.throughput --config small --device cuda --attn torch triton

Prints a markdown table: training tokens/s (video + reference tokens, forward + backward +
AdamW), peak memory, one three-stream sampling step, and a whole sample (30 steps + decode).
Random weights and inputs of the preset's shapes: speed does not depend on training.
"""
import argparse
import time
from dataclasses import dataclass

import torch

from guidance import three_stream_velocity
from infra.cli import add_flags, config_from, flag
from infra.distributed import peak_memory_gb
from pipeline import build_pipeline


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat: int) -> float:
    """Median seconds of `repeat` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench(preset: str, attn: str, batch: int, repeat: int, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    pipe = build_pipeline(preset, attn_backend=attn).to(device)
    dit = pipe.dit
    C, T = dit.cfg.in_channels, pipe.vae.latent_frames(pipe.frames)
    h = pipe.size // pipe.vae.config.spatial
    z = torch.randn(batch, C, T, h, h, device=device)
    z_ref = torch.randn(batch, C, h, h, device=device)
    y = torch.randn(batch, 64, dit.cfg.text_dim, device=device)
    y_mask = torch.ones(batch, 64, dtype=torch.bool, device=device)
    t = torch.rand(batch, device=device)
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-5)
    autocast = torch.autocast(device.type, dtype, enabled=dtype != torch.float32)

    def train_step():
        with autocast:
            v = dit(z, t, y, y_mask, z_ref=z_ref)
        v.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sample_step():
        with autocast:
            three_stream_velocity(dit, z[:1], t[:1], y[:1], y_mask[:1], y[:1], y_mask[:1], z_ref[:1], 5.0, 7.5)

    @torch.no_grad()
    def decode():
        pipe.vae.decode(z[:1])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dit.train()
    t_train = timed(train_step, device, repeat)
    mem = peak_memory_gb(device)
    dit.eval()
    t_step = timed(sample_step, device, repeat)
    t_decode = timed(decode, device, max(1, repeat // 2))
    tokens = batch * (T + 1) * h * h
    return {"preset": preset, "attn": attn, "device": str(device), "batch": batch, "tokens": tokens,
            "train_tok_s": tokens / t_train, "train_ms": 1e3 * t_train, "peak_gb": mem,
            "sample_step_ms": 1e3 * t_step, "sample_30_s": 30 * t_step + t_decode}


@dataclass
class ThroughputConfig:
    config: str = flag("small", "model preset (pipeline.PRESETS)")
    device: str = flag("cpu", "cpu or cuda")
    attn: list = flag(["torch"], "attention backends to compare (torch, triton)")
    batch: int = flag(4, "training batch (sampling uses 1 clip = 3 streams)")
    repeat: int = flag(5, "timed repetitions (median reported)")
    dtype: str = flag("auto", "autocast dtype: auto (bf16 on GPU), fp32 or bf16")
    threads: int = flag(0, "CPU threads (0: torch default)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = config_from(ThroughputConfig, add_flags(p, ThroughputConfig).parse_args(argv))
    if args.dtype not in ("auto", "fp32", "bf16"):
        p.error("--dtype must be auto, fp32 or bf16")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[args.dtype]
    rows = [bench(args.config, attn, args.batch, args.repeat, device, dtype) for attn in args.attn]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.config} config on {name}, {dtype}, torch {torch.__version__}\n")
    print("| attn | batch | tokens/step | train step ms | train tokens/s | peak GB | sampling step ms (3 streams) | 30-step sample s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['attn']} | {r['batch']} | {r['tokens']} | {r['train_ms']:.1f} | {r['train_tok_s']:.0f} | {r['peak_gb']:.2f} "
              f"| {r['sample_step_ms']:.1f} | {r['sample_30_s']:.2f} |")


if __name__ == "__main__":
    main()
