"""Generate a video from a reference face image and a prompt (paper Sec. 3.4).

    python sample.py                                   # bundled model, held-out reference, default prompt
    python sample.py --ref face.png --prompt "a person nods in the snow" --out out.mp4
    python sample.py --ckpt LTX-2.3 --prompt-embeds embeds/prompt_000000.safetensors --ref face.png
                                                       # LTX-2.3 weights: a diffusers pipeline folder (transformer/, vae/)

Writes the video (.mp4 through PyAV, .gif/.webp through Pillow) and a PNG sheet
(reference | frames) beside it.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

import checkpoint
import ltx2
from data import contact_sheet, load_image, save_video
from guidance import euler_sample, shift_for_tokens, three_stream_velocity, timesteps
from text import EMPTY_PROMPT, check_text_width, empty_embeds_path, load_prompt_embeds, text_pair

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_CKPT = ASSETS / "stdrc-demo"
DEFAULT_REF = ASSETS / "reference.png"
DEFAULT_PROMPT = "a person turns to the left on the beach"


def encode_text(pipe: checkpoint.Pipeline, prompt: str) -> tuple[torch.Tensor, ...]:
    """(y, y_mask, y_0, y_0_mask): the prompt and the empty prompt through the pipeline's text encoder."""
    if pipe.text is None:
        raise ValueError("this pipeline has no text encoder: pass --prompt-embeds (python ltx2.py encode-prompts)")
    return (*pipe.text.encode([prompt]), *pipe.text.encode([EMPTY_PROMPT]))


def load_text(pipe: checkpoint.Pipeline, prompt_embeds: str, empty_embeds: str = "") -> tuple[torch.Tensor, ...]:
    """(y, y_mask, y_0, y_0_mask) from precomputed prompt embeddings and the empty prompt's."""
    prompt, empty = (load_prompt_embeds(p) for p in (prompt_embeds, empty_embeds_path(prompt_embeds, empty_embeds)))
    for emb, _ in (prompt, empty):
        check_text_width(emb, pipe.dit.cfg.text_dim)
    return text_pair(*prompt, *empty)


@torch.no_grad()
def generate(pipe: checkpoint.Pipeline, ref: torch.Tensor | None, prompt: str, s_y: float = 5.0, s_r: float = 7.5,
             steps: int = 30, seed: int = 0, progress: bool = True, text: tuple | None = None) -> torch.Tensor:
    """ref [3, S, S] in [-1, 1] (None: text only) -> video [3, F, S, S] in [-1, 1]. `text`: precomputed
    (y, y_mask, y_0, y_0_mask) (load_text) in place of encoding `prompt` with the pipeline's encoder."""
    device = next(pipe.dit.parameters()).device
    for m in pipe.modules().values():
        m.eval()
    y, y_mask, y_0, y_0_mask = (t.to(device) for t in (encode_text(pipe, prompt) if text is None else text))
    z_ref = None if ref is None else pipe.vae.encode(ref[None].to(device))[:, :, 0]  # z_ref = E_vae(I_ref), Sec. 3.1
    T = pipe.vae.latent_frames(pipe.frames)
    h = pipe.size // pipe.vae.config.spatial
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, pipe.dit.cfg.in_channels, T, h, h, generator=g).to(device)

    def velocity(z_t, t):
        return three_stream_velocity(pipe.dit, z_t, t, y, y_mask, y_0, y_0_mask, z_ref, s_y, s_r)

    z_0 = euler_sample(velocity, z, timesteps(steps, shift_for_tokens(T * h * h)), progress)
    return pipe.vae.decode(z_0)[0]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", default=str(DEFAULT_REF), help="reference face image (PNG/JPEG); default: a held-out identity of the synthetic world")
    p.add_argument("--no-ref", action="store_true", help="ignore the reference: plain text-to-video with classic CFG")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="what the video should show (action and scene)")
    p.add_argument("--out", default="out/sample.mp4", help="output video: .mp4/.webm (PyAV) or .gif/.webp (Pillow)")
    p.add_argument("--sheet", default=None, help="PNG sheet reference | frames (default: OUT with _sheet.png)")
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT), help="checkpoint folder or run folder written by train.py, or "
                   "an LTX-2.3 transformer (diffusers folder or pipeline folder, or a .safetensors file)")
    p.add_argument("--vae", default="", help="LTX-2 VAE folder (diffusers AutoencoderKLLTX2Video) for an LTX-2.3 --ckpt; "
                   "default: vae/ of the pipeline folder")
    p.add_argument("--prompt-embeds", default="", help="precomputed prompt embeddings (.safetensors from ltx2.py "
                   "encode-prompts) used in place of the text encoder; --prompt then only captions the sheet")
    p.add_argument("--empty-embeds", default="", help="the empty prompt's embeddings (default: empty.safetensors "
                   "beside --prompt-embeds)")
    p.add_argument("--size", type=int, default=0, help="frame size in pixels (0: the checkpoint's; LTX-2.3: 512)")
    p.add_argument("--frames", type=int, default=0, help="frames, 1 + tau k (0: the checkpoint's; LTX-2.3: 121)")
    p.add_argument("--fps", type=float, default=0.0, help="frame rate (0: the checkpoint's; LTX-2.3: 24)")
    p.add_argument("--s-text", type=float, default=5.0, help="text guidance scale s_y")
    p.add_argument("--s-ref", type=float, default=7.5, help="reference guidance scale s_r")
    p.add_argument("--steps", type=int, default=30, help="Euler steps")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--attn", choices=["torch", "triton"], default="torch", help="attention backend (triton needs a GPU)")
    return p.parse_args(argv)


def load_pipeline(args) -> checkpoint.Pipeline:
    """--ckpt: an LTX-2.3 transformer (with --vae) or a checkpoint written by train.py; --size/--frames/--fps."""
    if ltx2.find_transformer(args.ckpt) is not None:
        pipe = ltx2.build_pipeline(args.ckpt, args.vae, args.size, args.frames, args.fps or ltx2.LTX2_FPS)
    else:
        pipe, _ = checkpoint.load(checkpoint.resolve(args.ckpt))
        pipe.size, pipe.frames = args.size or pipe.size, args.frames or pipe.frames
        if args.fps:  # LTX-2's RoPE reads time in seconds: the DiT follows the frame rate
            pipe.fps = pipe.dit.cfg.fps = args.fps
    return pipe.check().to(args.device)


def main(argv=None) -> int:
    args = parse_args(argv)
    if Path(args.ckpt) == DEFAULT_CKPT and not (DEFAULT_CKPT / "model.safetensors").is_file():
        print(f"sample.py: no trained model is bundled at {DEFAULT_CKPT}; train one (README, 'Training') and pass --ckpt", file=sys.stderr)
        return 2
    try:
        pipe = load_pipeline(args)
        ref = None if args.no_ref else load_image(args.ref, pipe.size)
        text = load_text(pipe, args.prompt_embeds, args.empty_embeds) if args.prompt_embeds else encode_text(pipe, args.prompt)
    except (FileNotFoundError, ValueError) as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 2
    pipe.dit.cfg.attn_backend = args.attn
    start = time.perf_counter()
    video = generate(pipe, ref, args.prompt, args.s_text, args.s_ref, args.steps, args.seed, text=text)
    out = Path(args.out)
    save_video(out, video, pipe.fps)
    sheet = Path(args.sheet) if args.sheet else out.with_name(out.stem + "_sheet.png")
    blank = torch.full_like(video[:, 0], 1.0)
    contact_sheet([(blank if ref is None else ref, video, args.prompt)]).save(sheet)
    print(f"wrote {out} and {sheet} ({video.shape[1]} frames, {pipe.size}x{pipe.size}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
