"""Checkpoints of the pipeline: atomic folders, run folders, loading.

A checkpoint is a folder: `model.safetensors` (weights, keys prefixed `vae.`, `text.`, `dit.`;
EMA weights when training kept them), `config.json` (every config, so the folder rebuilds the
pipeline by itself; an LTX-2.3 pipeline has `"text": null` and a `"kind": "ltx2"` VAE holding
diffusers' AutoencoderKLLTX2Video config) and, for training, `state.pt` (raw weights, optimizer, step), which
holds only tensors, numbers, strings and containers of them: it is read with torch.load(weights_only=True),
so loading a checkpoint runs no code. Folders are written under a temporary name and renamed into place, so
a crash never leaves a half-written checkpoint (clean_partial removes what an interrupted save left); a run
folder's `latest` file names its newest checkpoint.
"""
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from infra.errors import UsageError, one_line, open_safetensors, read_safetensors
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


def read_state(path: str | os.PathLike, **load_args) -> dict:
    """A checkpoint's state.pt, read without running code (weights_only=True), or a ValueError that says why not."""
    try:
        return torch.load(path, weights_only=True, **load_args)
    except Exception as e:  # a damaged file fails in many ways (zip reader, unpickler, struct, decoding)
        code = re.search(r"GLOBAL ([\w.]+)", str(e))
        if code:  # weights_only refuses anything but tensors and plain data
            raise ValueError(f"{path} holds a pickled object ({code[1]}) that loading would run as code: refused; "
                             f"only state.pt files of tensors and plain data load") from None
        why = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        raise ValueError(f"{path} is damaged or not a state.pt of train.py "
                         f"({why[1] if why else one_line(e)[:100]})") from None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file under a temporary name, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_latest(run: str | os.PathLike, name: str) -> None:
    write_text_atomic(Path(run) / "latest", name + "\n")


PARTIAL = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)\d+")  # save()'s and write_text_atomic's temporary names


def clean_partial(run: str | os.PathLike) -> list[str]:
    """Clear what an interrupted save left in a run folder, -> what it did, one entry each: a `.NAME.tmpPID` (a
    checkpoint or file being written) is removed; a `.NAME.oldPID` whose NAME is gone is the previous version of
    a checkpoint that a kill caught mid-swap in save(): it is put back, otherwise removed."""
    run, done = Path(run), []
    for p in sorted(run.iterdir()) if run.is_dir() else []:
        m = PARTIAL.fullmatch(p.name)
        if m is None:
            continue
        if m["kind"] == "old" and not (run / m["name"]).exists():
            p.rename(run / m["name"])
            done.append(f"restored {m['name']} from {p.name}")
        else:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            done.append(f"removed {p.name}")
    return done


def step_folders(run: str | os.PathLike) -> list[Path]:
    """A run folder's checkpoints `step_NNNNNN`, oldest first."""
    run = Path(run)
    return sorted(p for p in run.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)) if run.is_dir() else []


def checkpoints(run: str | os.PathLike) -> list[Path]:
    """A run folder's checkpoints, the one `latest` names first, then the others newest first."""
    found, latest = step_folders(run)[::-1], Path(run) / "latest"
    name = latest.read_text().strip() if latest.is_file() else None
    return sorted(found, key=lambda p: p.name != name)  # stable: the others stay newest first


def load_for_resume(run: str | os.PathLike, **load_args) -> tuple[Path, dict, list[Path], list[str]]:
    """The newest checkpoint of a run folder that loads (checkpoints() order) and its state.pt, read with
    torch.load(**load_args) -> (folder, state, the checkpoints skipped, a line for each that says why)."""
    skipped, why = [], []
    for folder in checkpoints(run):
        try:
            json.loads(resolve(folder).joinpath("config.json").read_text())
            with open_safetensors(folder / "model.safetensors"):  # the header, checked against the file's size
                pass
            if not (folder / "state.pt").is_file():
                raise FileNotFoundError(f"{folder / 'state.pt'} is missing")
            return folder, read_state(folder / "state.pt", **load_args), skipped, why
        except (ValueError, FileNotFoundError) as e:
            skipped.append(folder)
            why.append(f"skipped {folder.name}, which does not load: {one_line(e)}")
    raise FileNotFoundError(f"no checkpoint in {run} to --resume" + (f" ({len(why)} do not load: {why[0]})" if
                            why else "") + ": start a fresh run without --resume, or pass the right --out")


def set_aside(folder: Path) -> Path:
    """Rename a checkpoint that does not load to `NAME.damaged`: kept for a look, out of the run's rotation."""
    return folder.rename(folder.with_name(folder.name + ".damaged"))


def open_run(run: Path, resume: bool, overwrite: bool, steps: int, main_process: bool, **load_args):
    """A run folder before training starts: --resume -> (the newest checkpoint that loads, its state, a line for each
    one that does not, which the main process sets aside), refused when it is already at `steps`; a fresh run ->
    (None, None, []), refused in a folder that holds an earlier run's results unless `overwrite`."""
    if not resume:
        earlier = earlier_run(run)
        if earlier and not overwrite:
            raise UsageError(f"{run} holds an earlier run ({', '.join(p.name for p in earlier[:3])}): pass "
                             f"--resume to continue it, --overwrite to start afresh there (deletes it), or another --out")
        return None, None, []
    src, state, skipped, why = load_for_resume(run, **load_args)
    if state["step"] >= steps:
        raise UsageError(f"--resume: {src} is at step {state['step']}, so --steps {steps} leaves nothing to train: "
                         f"pass a larger --steps")
    if not main_process:
        return src, state, []
    notes = [f"{line}; renamed {set_aside(folder).name}" for folder, line in zip(skipped, why)]
    if skipped:
        write_latest(run, src.name)
    return src, state, notes


RUN_FILES = ("latest", "metrics.jsonl", "train_config.json", "step_*", "sample_*.gif")  # what train.py writes in --out


def run_files(run: str | os.PathLike) -> list[Path]:
    """What train.py wrote in a run folder (RUN_FILES)."""
    run = Path(run)
    return sorted(p for pattern in RUN_FILES for p in run.glob(pattern)) if run.is_dir() else []


def earlier_run(run: str | os.PathLike) -> list[Path]:
    """What in a run folder holds an earlier run's results (checkpoints, `latest`, metric rows, samples); empty for
    a new folder or one whose run stopped before its first step."""
    return [p for p in run_files(run) if p.name != "train_config.json" and not (p.name == "metrics.jsonl" and
                                                                               p.stat().st_size == 0)]


def clear_run(run: str | os.PathLike) -> None:
    """Delete what train.py wrote in a run folder (train.py --overwrite)."""
    for p in run_files(run):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


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
    weights = {k: v.float() for k, v in read_safetensors(path / "model.safetensors").items()}
    load_state(pipe.modules(), weights, assign=True)
    pipe.dit.reset_rope_table()
    return pipe.to(device), cfg
