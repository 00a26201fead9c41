"""Model surgery for train.py: the pipeline a run starts from (a preset, --init, --vae, LTX-2.3 weights),
a checkpoint's preset checked, a DiT grown by identity blocks (--depth), moved onto a VAE of another
latent width (--vae), or given LoRA adapters (--lora-rank)."""
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from infra import checkpoint
from infra.errors import UsageError, read_safetensors
from infra.lora import add_lora
from ltx2.convert import build_pipeline as build_ltx2_pipeline, find_transformer
from model import identity_blocks
from pipeline import Pipeline, build_pipeline


def preset_checkpoint(path: str, preset: str, flag: str) -> tuple[Path, dict]:
    """The checkpoint folder `path` names, which must have been trained with --config preset (one-line exit),
    and its config.json."""
    src = checkpoint.resolve(path)
    saved = json.loads((src / "config.json").read_text())
    trained = saved.get("preset")
    if trained != preset:
        raise ValueError(f"{flag} {src} was trained with --config {trained}, not {preset}; "
                         f"pass --config {trained} or start from a checkpoint of {preset}")
    return src, saved


def deepened(weights: dict[str, torch.Tensor], dit: nn.Module) -> dict[str, torch.Tensor]:
    """--init's weights for a DiT with as many or more blocks: the blocks the checkpoint lacks are `dit`'s own,
    made the identity (model.identity_blocks), so the deeper DiT computes --init's function at step 0."""
    n = len({k.split(".")[2] for k in weights if k.startswith("dit.blocks.")})
    if n == 0 or n == len(dit.blocks):
        return weights
    if n > len(dit.blocks):
        raise ValueError(f"a DiT of {len(dit.blocks)} blocks is shallower than --init's DiT ({n} blocks; a DiT only "
                         f"grows): pass --depth {n} or more, also with --resume of a grown run")
    identity_blocks(dit, n)
    return {**checkpoint.state_dict({"dit": dit}), **weights}


def rewidened(weights: dict[str, torch.Tensor], dit: nn.Module) -> dict[str, torch.Tensor]:
    """--init's weights for a DiT on latents of another width (a --vae with more or fewer latent channels):
    the DiT's 1x1x1 patchify and output projection, the only layers that see a latent channel, are `dit`'s own
    (fresh: random in, zero out); every block, the text path and the timestep embedding are --init's."""
    own = {k: v for k, v in checkpoint.state_dict({"dit": dit}).items() if k.split(".")[1] in ("patchify", "proj_out")}
    if all(weights.get(k, v).shape == v.shape for k, v in own.items()):
        return weights
    print(f"--init's DiT takes {weights['dit.patchify.weight'].shape[1]} latent channels, the VAE gives "
          f"{dit.cfg.in_channels}: its patchify and proj_out start fresh", file=sys.stderr)
    return {**weights, **own}


def build(cfg, device) -> Pipeline:
    """train.py's pipeline: fresh for this preset, from --init (a checkpoint of the same preset), or for
    --config ltx2 from LTX-2.3 weights (or a checkpoint of an ltx2 run, rebuilt from its config)."""
    overrides = dict(ref_mode=None if cfg.ref == "none" else cfg.ref, attn_backend=cfg.attn, depth=cfg.depth or None,
                     grad_checkpoint=cfg.grad_checkpoint, fps=cfg.fps, rope_theta=cfg.rope_theta or None)
    from_ltx2 = bool(cfg.init) and find_transformer(cfg.init) is not None
    if from_ltx2 and cfg.config != "ltx2":
        raise UsageError(f"--init {cfg.init} is an LTX-2.3 transformer checkpoint: pass --config ltx2")
    if cfg.config == "ltx2" and cfg.stage == "vae":
        raise UsageError("--config ltx2 keeps the LTX-2 VAE frozen; --stage vae trains the project's own VAE")
    if cfg.config == "ltx2" and cfg.latent_channels:
        raise UsageError("--latent-channels sizes the project's own VAE; the LTX-2 VAE has its own 128")
    if cfg.config == "ltx2" and cfg.depth:
        raise UsageError("--depth grows the project's own DiT presets; an LTX-2.3 DiT keeps its 48 blocks")
    if cfg.config == "ltx2" and not cfg.init:
        raise UsageError("--config ltx2 starts from LTX-2.3 weights: pass --init <LTX-2.3 transformer: diffusers "
                 "folder or .safetensors> and --vae <LTX-2 VAE folder>")
    try:
        if from_ltx2:
            dtype = None if cfg.fsdp else torch.float32  # FSDP: left memory-mapped, shard() makes fp32 shards
            pipe = build_ltx2_pipeline(cfg.init, cfg.vae, cfg.size, cfg.frames, dtype=dtype, **overrides)
        else:
            src, saved = preset_checkpoint(cfg.init, cfg.config, "--init") if cfg.init else (None, None)
            if cfg.config == "ltx2":  # a checkpoint of an ltx2 run describes its own pipeline
                pipe, _ = checkpoint.load(src)
                for name, value in overrides.items():  # runtime switches; the blocks share this config
                    if value is not None:
                        setattr(pipe.dit.cfg, name, value)
            else:
                if src and not cfg.rope_theta:  # --init's (and so --resume's) RoPE unless --rope-theta changes it
                    overrides["rope_theta"] = saved["dit"]["rope_theta"]
                pipe = build_pipeline(cfg.config, cfg.latent_channels, **overrides)
                if src:
                    weights = read_safetensors(src / "model.safetensors")
                    if cfg.vae:  # --vae's VAE replaces --init's, which may be of another latent width
                        weights = rewidened({k: v for k, v in weights.items() if not k.startswith("vae.")}, pipe.dit)
                    checkpoint.load_state(pipe.modules(), deepened(weights, pipe.dit), strict=False)
                if cfg.vae:  # another checkpoint's VAE (e.g. one trained further) in place of --init's
                    vae_src, _ = preset_checkpoint(cfg.vae, cfg.config, "--vae")
                    checkpoint.load_state({"vae": pipe.vae}, read_safetensors(vae_src / "model.safetensors"))
            pipe.size, pipe.frames, pipe.fps = cfg.size or pipe.size, cfg.frames or pipe.frames, cfg.fps
        pipe.with_frame(cfg.height, cfg.width).check()
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"{e}")
    if cfg.fsdp:  # the trained modules stay on the CPU (memory-mapped where loaded): wrap() shards them
        pipe.vae.to(device)
        return pipe
    return pipe.to(device)


def apply_lora(cfg, pipe: Pipeline) -> None:
    """--lora-rank: LoRA on the DiT's blocks, the rest of the pipeline frozen."""
    if cfg.lora_rank and (cfg.stage != "dit" or cfg.fsdp):
        raise UsageError("--lora-rank trains adapters on the DiT (--stage dit) without --fsdp (not supported yet)")
    if cfg.lora_rank:
        for module in pipe.modules().values():  # all frozen, then adapters on the DiT
            module.requires_grad_(False)
        add_lora(pipe.dit, cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank)
