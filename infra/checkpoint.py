"""Checkpoints of the pipeline: atomic folders, run folders, loading.

A checkpoint is a folder: `model.safetensors` (weights, keys prefixed `vae.`, `text.`, `dit.`;
EMA weights when training kept them), `config.json` (every config, so the folder rebuilds the
pipeline by itself; an LTX-2.3 pipeline has `"text": null` and a `"kind": "ltx2"` VAE holding
diffusers' AutoencoderKLLTX2Video config) and, for training, `state.pt` (raw weights, optimizer, step, RNG).
Folders are written under a temporary name and renamed into place, so a crash never leaves
a half-written checkpoint; a run folder's `latest` file names its newest checkpoint.
"""
import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline import Pipeline, pipeline_from_config


def state_dict(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()}


def load_state(modules: dict[str, nn.Module], weights: dict[str, torch.Tensor], strict: bool = True,
               assign: bool = False) -> None:
    for name, m in modules.items():
        part = {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}
        if not part and not strict:
            continue
        own = m.state_dict()
        missing = [k for k in own if k not in part]
        unexpected = [k for k in part if k not in own]
        resized = [f"{k} {tuple(part[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in part and part[k].shape != own[k].shape]
        if missing or unexpected or resized:
            raise ValueError(f"checkpoint does not fit the {name} module (a checkpoint of another config or "
                             f"--latent-channels?): missing {missing[:3]}, unexpected {unexpected[:3]}, shape {resized[:3]}")
        m.load_state_dict(part, assign=assign)


def save(folder: str | os.PathLike, pipe: Pipeline, weights: dict[str, torch.Tensor] | None = None,
         state: dict | None = None, extra: dict | None = None) -> Path:
    """Write a checkpoint folder atomically (temp folder + rename)."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights if weights is not None else state_dict(pipe.modules()), str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps({**pipe.config(), **(extra or {})}, indent=2))
    if state is not None:
        torch.save(state, tmp / "state.pt")
    old = folder.with_name(f".{folder.name}.old{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file under a temporary name, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_latest(run: str | os.PathLike, name: str) -> None:
    write_text_atomic(Path(run) / "latest", name + "\n")


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run folder (its `latest` checkpoint)."""
    path = Path(path)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: expected model.safetensors and config.json "
                                f"(a folder written by train.py, or a run folder with a `latest` file)")
    return path


def load(path: str | os.PathLike, device="cpu") -> tuple[Pipeline, dict]:
    """Rebuild the pipeline a checkpoint folder describes and load its weights: the DiT, built on the meta device,
    takes the file's memory-mapped tensors (read where used, copy-on-write), so even a 13 B DiT is neither
    initialised nor held twice."""
    path = resolve(path)
    cfg = json.loads((path / "config.json").read_text())
    pipe = pipeline_from_config(cfg)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        weights = {k: f.get_tensor(k).float() for k in f.keys()}
    load_state(pipe.modules(), weights, assign=True)
    pipe.dit.reset_rope_table()
    return pipe.to(device), cfg
