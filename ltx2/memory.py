"""Memory per GPU for full fine-tuning of ltx2-video with FSDP2 (`python -m ltx2 memory-plan`; the
model is described in the package docstring)."""
import math

import torch

from infra.lora import LORA_TARGETS
from model import DiT, DiTConfig
from pipeline import PRESETS

def lora_parameters(model: DiT, rank: int) -> int:
    """LoRA's trained parameters on `model`: r (in + out) per linear layer infra.lora targets."""
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and LORA_TARGETS.match(name))


def memory_plan(gpus: int, frames: int, height: int, width: int, batch: int, ema: bool = True,
                cfg: DiTConfig = PRESETS["ltx2-video"].dit, lora_rank: int = 0) -> dict:
    """GiB per GPU (see the module docstring for the model of memory) for full fine-tuning on `gpus` (FSDP2), or
    with lora_rank > 0 for LoRA as train.py --lora-rank runs it (data-parallel: every GPU holds the frozen DiT in
    fp32; the adapters' weights, gradients, AdamW moments and EMA)."""
    with torch.device("meta"):
        model = DiT(cfg)
    P = sum(p.numel() for p in model.parameters())
    P_block = sum(p.numel() for p in model.blocks[0].parameters())
    h, w = height // 32, width // 32  # LTX-2's VAE: 32x spatial, 8x temporal after the first frame
    n = (1 + (frames - 1) // 8) * h * w + h * w  # video tokens + one reference frame
    b = math.ceil(batch / gpus)
    gib = 2**30
    if lora_rank:
        P_lora = lora_parameters(model, lora_rank)
        plan = {"params": (4 * P + 4 * P_lora) / gib, "grads": 4 * P_lora / gib, "adamw": 8 * P_lora / gib,
                "ema": 4 * P_lora / gib * ema, "lora_params": P_lora}
    else:
        plan = {"params": (4 * P / gpus + 2 * 2 * P_block) / gib, "grads": 4 * P / gpus / gib,
                "adamw": 8 * P / gpus / gib, "ema": 4 * P / gpus / gib * ema}
    plan.update(gpus=gpus, micro_batch=b, tokens=n,
                activations=b * (cfg.depth * 2 * n * cfg.dim + 34 * n * cfg.dim) / gib)
    plan["total"] = plan["params"] + plan["grads"] + plan["adamw"] + plan["ema"] + plan["activations"]
    return plan


def print_memory_plan(args) -> None:
    for rank in (0, args.lora_rank) if args.lora_rank else (0,):
        plans = [memory_plan(g, args.frames, args.height, args.width, args.batch, not args.no_ema, lora_rank=rank)
                 for g in (1, 2, 4, 8, 16, 32, 64)]
        what = (f"LoRA rank {rank} ({plans[0]['lora_params'] / 1e6:.0f} M trained parameters; data-parallel, the "
                f"frozen DiT in fp32 on every GPU)" if rank else "full fine-tune (FSDP2)")
        print(f"ltx2-video {what}, {args.frames} frames {args.height}x{args.width}, global batch {args.batch}, "
              f"{plans[0]['tokens']} tokens per sample (video + reference); GiB per GPU")
        print(f"{'GPUs':>5} {'micro-b':>7} {'params':>8} {'grads':>8} {'AdamW':>8} {'EMA':>8} {'activ.':>8} "
              f"{'total':>8}  80GB 96GB")
        for q in plans:
            fits = ["yes" if q["total"] <= 0.9 * cap * 1e9 / 2**30 else "no" for cap in (80, 96)]
            print(f"{q['gpus']:>5} {q['micro_batch']:>7} {q['params']:>8.1f} {q['grads']:>8.1f} {q['adamw']:>8.1f} "
                  f"{q['ema']:>8.1f} {q['activations']:>8.1f} {q['total']:>8.1f}  {fits[0]:>4} {fits[1]:>4}")
        for cap in (80, 96):
            ok = [q["gpus"] for q in plans if q["total"] <= 0.9 * cap * 1e9 / 2**30]
            print(f"smallest GPU count for batch {args.batch} on {cap} GB GPUs (10 % headroom): "
                  f"{ok[0] if ok else 'none up to 64'}")
