"""Seconds per DiT training step (forward, backward, AdamW) of a preset, eager against
torch.compile of the Denoiser, on synthetic batches; blocks eager/compiled/eager/compiled so a
change in the machine's load shows. python -m experiments.compile_speed [config] [steps]"""
import sys
import time

import torch

import data
import train
from pipeline import build_pipeline

torch.set_num_threads(1)
config, steps = (sys.argv[1] if len(sys.argv) > 1 else "demo"), int(sys.argv[2]) if len(sys.argv) > 2 else 15
cfg = train.parse_args(["--config", config, "--batch", "16", "--framing", "closeup"])
pipe = build_pipeline(config)
trained = train.Denoiser(pipe.text, pipe.dit)
pipe.vae.requires_grad_(False).eval()
opt = torch.optim.AdamW(trained.parameters(), lr=1e-4)
compiled = torch.compile(trained)
batches = [data.synth_batch(16, pipe.size, pipe.frames, torch.Generator().manual_seed(k), "cross", framing="closeup")
           for k in range(4)]


def run(model, n):
    times = []
    for k in range(n):
        g = torch.Generator().manual_seed(k)
        start = time.perf_counter()
        loss, _, _ = train.dit_step(cfg, pipe, model, None, batches[k % 4], g, torch.autocast("cpu", enabled=False))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


start = time.perf_counter()
run(compiled, 3)
print(f"compile + 3 warm-up steps: {time.perf_counter() - start:.0f} s", flush=True)
run(trained, 2)
for block in range(2):
    print(f"block {block}: eager {run(trained, steps):.3f} s/step, compiled {run(compiled, steps):.3f} s/step "
          "(medians)", flush=True)
