"""Model surgery for train.py --init: check a checkpoint's preset, grow a DiT by identity blocks
(--depth), move a DiT onto a VAE of another latent width (--vae)."""
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from infra import checkpoint
from model import identity_blocks


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
