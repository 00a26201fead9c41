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

from data import AV_SUFFIXES, PIL_SUFFIXES, contact_sheet, load_image, portrait_framing, read_image, save_video, to_tensor
from faces import crop_face
from infra import checkpoint
from infra.cli import add_flags, config_from, flag, parser
from infra.errors import UsageError, check_attn, check_device, check_suffix, check_writable, run_main
from ltx2.convert import LTX2_FPS, build_pipeline, find_transformer
from pipeline import Pipeline, encode_text, generate, load_text
from world.face_nets import FACE_THRESHOLD, load_synth_detector

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
    height: int = flag(0, "frame height in pixels for non-square video (0: --size)", lo=0, hi=4096)
    width: int = flag(0, "frame width in pixels for non-square video (0: --size)", lo=0, hi=4096)
    frames: int = flag(0, "frames, 1 + tau k (0: the checkpoint's; LTX-2.3: 121)", lo=0, hi=10_000)
    fps: float = flag(0.0, "frame rate (0: the checkpoint's; LTX-2.3: 24)", lo=0.0)
    s_text: float = flag(5.0, "text guidance scale s_y")
    s_ref: float = flag(7.5, "reference guidance scale s_r")
    stg_scale: float = flag(0.0, "spatio-temporal guidance scale (LTX-2: 1.0; 0: off): s_stg (v_c - v_stg), v_stg the "
                                  "fully conditioned stream with self-attention skipped in --stg-blocks", lo=0.0)
    stg_blocks: list = flag([28], "DiT blocks whose self-attention STG skips (LTX2Pipeline's default: 28)")
    guidance_rescale: float = flag(0.0, "guidance rescale phi on the clean estimate (LTX-2: 0.7; 0: off)", lo=0.0, hi=1.0)
    steps: int = flag(30, "Euler steps", lo=1, hi=10_000)
    seed: int = flag(0, "noise seed", lo=0, hi=2**31 - 1)
    ref_crop: bool = flag(False, "--ref is a photo: detect its largest face (InsightFace SCRFD when the buffalo_l pack "
                                 "is found, else the synthetic world's detector) and crop it to the ID-photo framing "
                                 "of the synthetic world's portrait references")
    face_models: str = flag("", "folder of the InsightFace buffalo_l pack (det_10g.onnx) for --ref-crop (empty: "
                                "STDRC_FACE_MODELS or InsightFace's default folder)")
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
    face; a reference that is not square, or one cropped from a photo (--ref-crop), is most likely a real person's
    (one warning line; a cheap check, not a detector)."""
    if pipe.text is None:  # LTX-2.3 (precomputed prompt embeddings) takes real photos
        return
    with Image.open(args.ref) as im:
        w, h = im.size
    if args.ref_crop or w != h:
        what = "a photo (--ref-crop)" if args.ref_crop else f"{w}x{h}, not a square synthetic-world face"
        print(f"sample.py: warning: the reference is {what}: this model knows only the synthetic world's faces, so the "
              f"video will not keep this identity", file=sys.stderr)


def load_pipeline(args: SampleConfig) -> Pipeline:
    """--ckpt: an LTX-2.3 transformer (with --vae) or a checkpoint written by train.py; --size/--frames/--fps."""
    if find_transformer(args.ckpt) is not None:
        pipe = build_pipeline(args.ckpt, args.vae, args.size, args.frames, args.fps or LTX2_FPS)
    else:
        pipe, _ = checkpoint.load(checkpoint.resolve(args.ckpt))
        pipe.size, pipe.frames = args.size or pipe.size, args.frames or pipe.frames
        if args.fps:  # LTX-2's RoPE reads time in seconds: the DiT follows the frame rate
            pipe.fps = pipe.dit.cfg.fps = args.fps
    return pipe.with_frame(args.height, args.width).check().to(args.device)


def detect_faces(image: torch.Tensor, face_models: str) -> torch.Tensor:
    """Every face's 5 landmarks [K, 5, 2] in an image [3, H, W] in [-1, 1]: InsightFace SCRFD when its pack is
    found (or named by --face-models), else the synthetic world's detector (one face at most)."""
    try:
        from interop.scrfd import FaceDetector
        detector = FaceDetector(face_models or None)
    except (ImportError, FileNotFoundError):
        if face_models:
            raise
        print("sample.py: --ref-crop: no InsightFace pack found, the synthetic world's face detector crops the reference",
              file=sys.stderr)
        landmarks, score = load_synth_detector().detect_batch(image[None])
        return landmarks[score > FACE_THRESHOLD]
    return torch.stack([torch.as_tensor(kps, dtype=torch.float32) for _, kps, _ in detector.detect(image)] or
                       [torch.zeros(0, 5, 2)]).reshape(-1, 5, 2)


def load_reference(args: SampleConfig, size: tuple[int, int]) -> torch.Tensor | None:
    """--ref as [3, H, W] (size): the image centre-cropped, or with --ref-crop its largest face in the ID-photo
    framing."""
    if args.no_ref:
        return None
    if not args.ref_crop:
        return load_image(args.ref, size)
    image = to_tensor(read_image(args.ref))
    faces = detect_faces(image, args.face_models)
    if not len(faces):
        raise ValueError(f"no face found in {args.ref}: pass a photo with a face, or drop --ref-crop")
    return crop_face(image, faces, portrait_framing(), size)


def stg_blocks(args: SampleConfig, depth: int) -> tuple[int, ...]:
    """--stg-blocks as block indices of a DiT of `depth` blocks (none when --stg-scale is 0)."""
    if not args.stg_scale:
        return ()
    blocks = tuple(int(b) for b in args.stg_blocks)
    if not all(0 <= b < depth for b in blocks):
        raise ValueError(f"--stg-blocks {list(blocks)}: the DiT has blocks 0..{depth - 1}")
    return blocks


def sample(argv=None) -> None:
    args = parse_args(argv)
    if Path(args.ckpt) == DEFAULT_CKPT and not (DEFAULT_CKPT / "model.safetensors").is_file():
        raise UsageError(f"no trained model is bundled at {DEFAULT_CKPT}; train one (README, 'Training') and pass --ckpt")
    check_attn(args.attn, check_device(args.device))
    out, sheet = check_outputs(args)
    pipe = load_pipeline(args)
    ref = load_reference(args, pipe.hw)
    if ref is not None:
        warn_if_not_a_world_reference(args, pipe)
    text = load_text(pipe, args.prompt_embeds, args.empty_embeds) if args.prompt_embeds else encode_text(pipe, args.prompt)
    blocks = stg_blocks(args, pipe.dit.cfg.depth)
    pipe.dit.cfg.attn_backend = args.attn
    start = time.perf_counter()
    video = generate(pipe, ref, args.prompt, args.s_text, args.s_ref, args.steps, args.seed, text=text,
                     s_stg=args.stg_scale, stg_blocks=blocks, rescale=args.guidance_rescale)
    save_video(out, video, pipe.fps)
    blank = torch.full_like(video[:, 0], 1.0)
    contact_sheet([(blank if ref is None else ref, video, args.prompt)]).save(sheet)
    print(f"wrote {out} and {sheet} ({video.shape[1]} frames, {pipe.hw[0]}x{pipe.hw[1]}) in {time.perf_counter() - start:.1f} s")


def main(argv=None) -> int:
    return run_main("sample.py", sample, argv)


if __name__ == "__main__":
    sys.exit(main())
