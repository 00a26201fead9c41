"""The entry points' one error path, and the input checks they share.

An expected error (bad input, a missing or damaged file, a device or backend this machine lacks) is one
line on stderr that says what is wrong and what to do, and exit status 2. The library raises ValueError
(UsageError is one) or FileNotFoundError for those, with such a message; any other exception is a bug
and keeps its traceback.
"""
import contextlib
import importlib.util
import math
import os
import sys
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad input: the message says what is wrong and what to do."""


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def run_main(prog: str, body, argv=None) -> int:
    """Run the command body(argv) -> exit status: 0, or 2 with every expected error as one line `prog: ...` on
    stderr. A `sys.exit("prog: ...")` deeper down is such a line already; argparse's exits keep their status."""
    try:
        body(argv)
        return 0
    except (ValueError, FileNotFoundError) as e:
        message = one_line(e)
        print(message if message.startswith(prog + ":") else f"{prog}: {message}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:
        if isinstance(e.code, str):
            print(one_line(e.code), file=sys.stderr)
            return EXIT_USAGE
        return e.code or 0


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_flags(cfg) -> None:
    """Every float flag of the config dataclass finite, every flag with bounds (infra.cli.flag's lo, hi) inside them."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag_name(f.name)} {value}: must be a finite number")
        lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                (lo is not None and value < lo) or (hi is not None and value > hi)):
            raise UsageError(f"{flag_name(f.name)} {value}: must be {bounds(lo, hi)}")


def bounds(lo, hi) -> str:
    if hi is None:
        return f"at least {lo}"
    if lo is None:
        return f"at most {hi}"
    return f"from {lo} to {hi}"


def check_device(device: str) -> torch.device:
    """The device a --device names, if this machine has it."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device}: not a device name; use cpu or cuda (cuda:N for GPU N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: this torch build or machine has no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPUs")
    elif dev.type != "cpu":
        raise UsageError(f"--device {device}: use cpu or cuda")
    return dev


def check_attn(attn: str, device: torch.device) -> None:
    """--attn triton needs Triton and a CUDA device."""
    if attn == "triton" and (device.type != "cuda" or importlib.util.find_spec("triton") is None):
        raise UsageError("--attn triton runs the fused kernel on a CUDA GPU with Triton installed; "
                         f"this run is on {device.type}: use --attn torch")


def check_suffix(path: str, suffixes, flag: str) -> None:
    """`path` ends in one of `suffixes` (lower-case, with the dot)."""
    if Path(path).suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {path}: the file type must be one of {', '.join(sorted(suffixes))}")


def check_writable(path: str, flag: str) -> None:
    """The folder of an output file exists (made now if need be) and can be written to."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot make its folder ({e.strerror}); pass another path") from None
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: its folder is not writable; pass another path")


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike):
    """safe_open of a .safetensors file (its header read and checked against the file's size), with a ValueError
    that names a damaged file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): it is damaged or incomplete; copy it "
                         f"again or pass another") from None


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or a ValueError that names a damaged file."""
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}
