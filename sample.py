"""Generate a video from a reference face image and a prompt (paper Sec. 3.4).

    python sample.py                                   # bundled model, held-out reference, default prompt
    python sample.py --ref face.png --prompt "a person nods in the snow" --out out.mp4
    python sample.py --ckpt LTX-2.3 --prompt-embeds embeds/prompt_000000.safetensors --ref face.png
                                                       # LTX-2.3 weights: a diffusers pipeline folder (transformer/, vae/)

Writes the video (.mp4 through PyAV, .gif/.webp through Pillow) and a PNG sheet
(reference | frames) beside it.
"""
import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from PIL import Image

from data import AV_SUFFIXES, PIL_SUFFIXES, contact_sheet, load_image, save_video
from infra import checkpoint
from infra.cli import add_flags, config_from, flag, parser
from infra.errors import UsageError, check_attn, check_device, check_suffix, check_writable, run_main
from ltx2.convert import LTX2_FPS, build_pipeline, find_transformer
from pipeline import Pipeline, encode_text, generate, load_text

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_CKPT = ASSETS / "stdrc-demo"


@dataclass
class SampleConfig:
    ref: str = flag(str(ASSETS / "reference.png"), "reference face image (PNG/JPEG); default: a held-out identity of "
                                                    "the synthetic world")
    no_ref: bool = flag(False, "ignore the reference: plain text-to-video with classic CFG")
    prompt: str = flag("a person turns to the left on the beach", "what the video should show (action and scene)")
    out: str = flag("out/sample.mp4", "output video: .mp4/.webm (PyAV) or .gif/.webp (Pillow)")
    sheet: str = flag("", "PNG sheet reference | frames (empty: OUT with _sheet.png)")
    ckpt: str = flag(str(DEFAULT_CKPT), "checkpoint folder or run folder written by train.py, or an LTX-2.3 "
                                        "transformer (diffusers folder or pipeline folder, or a .safetensors file)")
    vae: str = flag("", "LTX-2 VAE folder (diffusers AutoencoderKLLTX2Video) for an LTX-2.3 --ckpt; empty: vae/ of "
                        "the pipeline folder")
    prompt_embeds: str = flag("", "precomputed prompt embeddings (.safetensors from python -m ltx2 encode-prompts) used "
                                  "in place of the text encoder; --prompt then only captions the sheet")
    empty_embeds: str = flag("", "the empty prompt's embeddings (empty: empty.safetensors beside --prompt-embeds)")
    size: int = flag(0, "frame size in pixels (0: the checkpoint's; LTX-2.3: 512)", lo=0, hi=4096)
    frames: int = flag(0, "frames, 1 + tau k (0: the checkpoint's; LTX-2.3: 121)", lo=0, hi=10_000)
    fps: float = flag(0.0, "frame rate (0: the checkpoint's; LTX-2.3: 24)", lo=0.0)
    s_text: float = flag(5.0, "text guidance scale s_y")
    s_ref: float = flag(7.5, "reference guidance scale s_r")
    steps: int = flag(30, "Euler steps", lo=1, hi=10_000)
    seed: int = flag(0, "noise seed", lo=0, hi=2**31 - 1)
    device: str = flag("cpu", "cpu or cuda")
    attn: str = flag("torch", "attention backend: torch, or triton (needs a GPU)", choices=("torch", "triton"))


def parse_args(argv=None) -> SampleConfig:
    return config_from(SampleConfig, add_flags(parser("sample.py", __doc__), SampleConfig).parse_args(argv))


def check_outputs(args: SampleConfig) -> tuple[Path, Path]:
    """(video, sheet) paths of types this machine can write, checked before any sampling."""
    out = Path(args.out)
    check_suffix(args.out, AV_SUFFIXES | PIL_SUFFIXES, "--out")
    if out.suffix.lower() in AV_SUFFIXES and importlib.util.find_spec("av") is None:
        raise UsageError(f"--out {out}: writing {out.suffix} needs PyAV (pip install -e '.[video]'); or write .gif/.webp")
    sheet = Path(args.sheet) if args.sheet else out.with_name(out.stem + "_sheet.png")
    check_suffix(str(sheet), {".png", ".jpg", ".jpeg"}, "--sheet")
    check_writable(args.out, "--out")
    check_writable(str(sheet), "--sheet")
    return out, sheet


def warn_if_not_a_world_reference(args: SampleConfig, pipe: Pipeline) -> None:
    """This project's own presets are trained on the synthetic world, whose references are square renders of a
    face; a reference that is not square is most likely a photo (one warning line; a cheap check, not a detector)."""
    if pipe.text is None:  # LTX-2.3 (precomputed prompt embeddings) takes real photos
        return
    with Image.open(args.ref) as im:
        w, h = im.size
    if w != h:
        print(f"sample.py: warning: the reference is {w}x{h}, not a square synthetic-world face: this model knows "
              f"only the synthetic world's faces, so the video will not keep this identity", file=sys.stderr)


def load_pipeline(args: SampleConfig) -> Pipeline:
    """--ckpt: an LTX-2.3 transformer (with --vae) or a checkpoint written by train.py; --size/--frames/--fps."""
    if find_transformer(args.ckpt) is not None:
        pipe = build_pipeline(args.ckpt, args.vae, args.size, args.frames, args.fps or LTX2_FPS)
    else:
        pipe, _ = checkpoint.load(checkpoint.resolve(args.ckpt))
        pipe.size, pipe.frames = args.size or pipe.size, args.frames or pipe.frames
        if args.fps:  # LTX-2's RoPE reads time in seconds: the DiT follows the frame rate
            pipe.fps = pipe.dit.cfg.fps = args.fps
    return pipe.check().to(args.device)


def sample(argv=None) -> None:
    args = parse_args(argv)
    if Path(args.ckpt) == DEFAULT_CKPT and not (DEFAULT_CKPT / "model.safetensors").is_file():
        raise UsageError(f"no trained model is bundled at {DEFAULT_CKPT}; train one (README, 'Training') and pass --ckpt")
    check_attn(args.attn, check_device(args.device))
    out, sheet = check_outputs(args)
    pipe = load_pipeline(args)
    ref = None if args.no_ref else load_image(args.ref, pipe.size)
    if ref is not None:
        warn_if_not_a_world_reference(args, pipe)
    text = load_text(pipe, args.prompt_embeds, args.empty_embeds) if args.prompt_embeds else encode_text(pipe, args.prompt)
    pipe.dit.cfg.attn_backend = args.attn
    start = time.perf_counter()
    video = generate(pipe, ref, args.prompt, args.s_text, args.s_ref, args.steps, args.seed, text=text)
    save_video(out, video, pipe.fps)
    blank = torch.full_like(video[:, 0], 1.0)
    contact_sheet([(blank if ref is None else ref, video, args.prompt)]).save(sheet)
    print(f"wrote {out} and {sheet} ({video.shape[1]} frames, {pipe.size}x{pipe.size}) in {time.perf_counter() - start:.1f} s")


def main(argv=None) -> int:
    return run_main("sample.py", sample, argv)


if __name__ == "__main__":
    sys.exit(main())
