"""A DiT fine-tuned here -> diffusers' LTX2VideoTransformer3DModel folder (`python -m ltx2 export`): the inverse of
convert.py. The video branch's tensors are written back under the base checkpoint's diffusers names (each head's
q/k channels permuted back for an "interleaved" checkpoint) in its dtype; everything model.py does not hold (the
audio branch, the audio-video cross-attention) is copied from the base, so the folder is a whole LTX-2.3
transformer that diffusers' LTX2Pipeline (and convert.py) load."""
import contextlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from infra import checkpoint
from ltx2.convert import (ROPE_PERMUTED, LazySafetensors, dit_config_from_diffusers, find_transformer, map_key,
                          split_to_interleaved)


def to_diffusers_state_dict(state: Mapping, base: Mapping, heads: int, rope_type: str = "split") -> dict:
    """model.py's DiT state dict -> the keys of `base` (a diffusers LTX-2 transformer state dict, read lazily): the
    video branch from `state` in base's dtypes, the rest of base as is. Raises one ValueError listing the keys of
    either side that have no counterpart."""
    out, placed, missing = {}, set(), []
    for key in base.keys():
        name = map_key(key)
        if name is None:  # not model.py's (audio, audio-video): the base's tensor
            out[key] = base[key]
        elif name not in state:
            missing.append(name)
        else:
            w = state[name]
            if rope_type == "interleaved" and ROPE_PERMUTED.match(name):
                w = split_to_interleaved(w, heads)
            out[key] = w.detach().to(base[key].dtype).contiguous()
            placed.add(name)
    unplaced = sorted(set(state) - placed)
    if missing or unplaced:
        raise ValueError(f"the DiT does not match the base LTX-2.3 transformer: {len(missing)} of its keys missing "
                         f"{sorted(missing)}; {len(unplaced)} with no place in it {unplaced}")
    return out


def export_transformer(state: Mapping, base: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write `state` (model.py's DiT) into out/ as diffusers' LTX2VideoTransformer3DModel (config.json +
    diffusion_pytorch_model.safetensors), on top of `base`: a diffusers transformer or pipeline folder."""
    found = find_transformer(base)
    if found is None or found[1] is None:
        raise ValueError(f"--base {base} is not a diffusers LTX-2.3 transformer folder (config.json of "
                         f"LTX2VideoTransformer3DModel): export writes diffusers' layout on top of one")
    files, config = found
    cfg, rope_type = dit_config_from_diffusers(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt")) for f in files]
        weights = to_diffusers_state_dict(state, LazySafetensors(*handles), cfg.heads, rope_type)
        save_file(weights, str(out / "diffusion_pytorch_model.safetensors"))
    shutil.copyfile(files[0].parent / "config.json", out / "config.json")
    return out


def export_checkpoint(ckpt: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A checkpoint written by train.py --config ltx2 (its inference weights: the EMA) -> export_transformer."""
    pipe, _ = checkpoint.load(checkpoint.resolve(ckpt))
    return export_transformer(pipe.dit.state_dict(), base, out)
