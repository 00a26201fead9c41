"""A DiT fine-tuned here -> diffusers' LTX2VideoTransformer3DModel folder (`python -m ltx2 export`): the inverse of
convert.py. The video branch's tensors are written back under the base checkpoint's diffusers names (each head's
q/k channels permuted back for an "interleaved" checkpoint) in its dtype; everything model.py does not hold (the
audio branch, the audio-video cross-attention) is copied from the base, so the folder is a whole LTX-2.3
transformer that diffusers' LTX2Pipeline (and convert.py) load. A LoRA run's adapter (infra/lora.py) is also
written in diffusers' LoRA layout (pytorch_lora_weights.safetensors, for LTX2Pipeline.load_lora_weights)."""
import contextlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

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


def adapter_to_diffusers(adapter: Mapping, base_keys, heads: int, rope_type: str, scale: float) -> dict:
    """A DiT's LoRA tensors (`[dit.]blocks.N.<module>.lora_{A,B}.weight`) -> diffusers' LoRA state dict of
    LTX2VideoTransformer3DModel (`transformer.<diffusers module>.lora_{A,B}.weight`): module names through the key
    map backwards (from the base checkpoint's keys), lora_B scaled by alpha / r (diffusers' default alpha is r) and,
    for an "interleaved" checkpoint, its attn1 q/k rows permuted back."""
    diffusers_module = {map_key(k): k.removesuffix(".weight") for k in base_keys if k.endswith(".weight")}
    out = {}
    for key, w in adapter.items():
        module, _, leaf = key.removeprefix("dit.").partition(".lora_")
        if leaf == "B.weight":
            w = w * scale
            w = split_to_interleaved(w, heads) if rope_type == "interleaved" and ROPE_PERMUTED.match(module + ".") else w
        out[f"transformer.{diffusers_module[module + '.weight']}.lora_{leaf}"] = w.contiguous()
    return out


def export_adapter(folder: Path, base: str | os.PathLike, out: Path) -> None:
    """A LoRA checkpoint's adapter.safetensors -> out/pytorch_lora_weights.safetensors (adapter_to_diffusers)."""
    files, config = find_transformer(base)
    cfg, rope_type = dit_config_from_diffusers(config)
    lora = json.loads((folder / "adapter_config.json").read_text())
    with contextlib.ExitStack() as stack:
        keys = [k for f in files for k in stack.enter_context(safe_open(str(f), framework="pt")).keys()]
    adapter = load_file(str(folder / "adapter.safetensors"))
    save_file(adapter_to_diffusers(adapter, keys, cfg.heads, rope_type, lora["lora_alpha"] / lora["r"]),
              str(out / "pytorch_lora_weights.safetensors"))


def export_checkpoint(ckpt: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A checkpoint written by train.py --config ltx2 (its inference weights: the EMA; LoRA merged) ->
    export_transformer, and a LoRA run's adapter alone -> export_adapter."""
    folder = checkpoint.resolve(ckpt)
    pipe, _ = checkpoint.load(folder)
    out = export_transformer(pipe.dit.state_dict(), base, out)
    if (folder / "adapter.safetensors").is_file():
        export_adapter(folder, base, out)
    return out
