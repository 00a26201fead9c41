"""Data: the synthetic world as batches, a JSONL manifest of real videos, reference
augmentation (paper Sec. 3.3), and media I/O (images, videos, contact sheets).

Pixels are float tensors in [-1, 1], videos [B, 3, F, H, W], images [B, 3, H, W].
Video files: mp4/webm/mov/mkv/avi through PyAV (FFmpeg's decoders; hand-written decoding
would be neither correct nor fast); GIF/WebP/PNG-frame folders through Pillow.
"""
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from text import empty_embeds_path, load_prompt_embeds, pad_prompt_embeds
from world.synth import SynthWorld

AV_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv", ".avi"}
PIL_SUFFIXES = {".gif", ".webp"}
FRAME_SUFFIXES = {".png", ".jpg", ".jpeg"}


# ----------------------------------------------------------------------------- pixels

def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(frames)).movedim(-1, -3).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [..., 3, H, W] in [-1, 1] -> uint8 [..., H, W, 3]."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().movedim(-3, -1).cpu().numpy()


def frame_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """A frame size: a side (square) or (height, width)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def crop_box(h: int, w: int, size: int | tuple[int, int]) -> tuple[int, int, int, int]:
    """resize_center_crop's geometry for an h x w source: (resized height, width, top, left of the crop)."""
    H, W = frame_hw(size)
    s = max(H / h, W / w)
    nh, nw = max(H, round(h * s)), max(W, round(w * s))
    return nh, nw, (nh - H) // 2, (nw - W) // 2


def resize_center_crop(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """[N, 3, h, w] -> [N, 3, H, W] (size: a side or (H, W)): scaled to cover H x W, then the centre crop."""
    H, W = frame_hw(size)
    nh, nw, top, left = crop_box(*x.shape[-2:], size)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    return x[..., top:top + H, left:left + W]


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file -> uint8 [H, W, 3] RGB, with an error that says what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference image not found: {path} (pass an existing PNG/JPEG with --ref)")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # Pillow raises several types for unreadable files
        raise ValueError(f"cannot read {path} as an image ({e}); pass a PNG or JPEG file") from None


def load_image(path: str | os.PathLike, size: int | tuple[int, int]) -> torch.Tensor:
    """An image file -> [3, H, W] in [-1, 1] (resize_center_crop to a side or (H, W))."""
    return resize_center_crop(to_tensor(read_image(path))[None], size)[0]


# ----------------------------------------------------------------------------- reading video

def read_frames(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """All frames of a video file or a folder of frames -> (uint8 [F, H, W, 3], fps)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise ValueError(f"no PNG/JPEG frames in {path}")
        return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files]), 24.0
    suffix = path.suffix.lower()
    if suffix in AV_SUFFIXES:
        import av  # the `video` extra

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 24)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        if not frames:
            raise ValueError(f"no frames decoded from {path}")
        return np.stack(frames), fps
    if suffix in PIL_SUFFIXES:
        with Image.open(path) as im:
            n = getattr(im, "n_frames", 1)
            frames, durations = [], []
            for k in range(n):
                im.seek(k)
                frames.append(np.asarray(im.convert("RGB")))
                durations.append(im.info.get("duration", 40) or 40)
        return np.stack(frames), 1000.0 / float(np.mean(durations))
    raise ValueError(f"unsupported video type {suffix!r} for {path}; use mp4/webm/mov/mkv/avi, gif/webp or a folder of frames")


def frame_indices(n_src: int, src_fps: float, n_out: int, fps: float, start: float = 0.0) -> list[int]:
    """Indices of n_out source frames sampled at `fps` starting at time `start` (seconds)."""
    span = (n_out - 1) / fps
    duration = (n_src - 1) / src_fps
    if span > duration + 1e-9:
        raise ValueError(f"clip too short: {n_src} frames at {src_fps:.2f} fps, need {span:.2f} s at {fps} fps")
    times = start + np.arange(n_out) / fps
    return np.minimum(np.round(times * src_fps).astype(int), n_src - 1).tolist()


TEXT_PAIRS = (("prompt_embeds", "prompt_attention_mask"), ("empty_prompt_embeds", "empty_prompt_attention_mask"))


class ManifestDataset(torch.utils.data.Dataset):
    """Real clips from a JSONL manifest: {"video", "caption", "reference"?, "faces"?, "prompt_embeds"?,
    "empty_prompt_embeds"?} per line.

    `frames` must be 1 + tau k (the VAE's valid counts); `faces` is an .npz written by
    `python -m interop.scrfd` with `landmarks` [F_src, 5, 2] in source pixels and `present` [F_src].
    `prompt_embeds` is a precomputed-embeddings file (text.load_prompt_embeds; all lines or none),
    passed through with the empty prompt's (`empty_prompt_embeds`, default text.EMPTY_EMBEDS beside it).
    An unreadable or too-short entry yields an error item; `collate` drops it and counts it.
    """

    def __init__(self, manifest: str | os.PathLike, frames: int, size: int | tuple[int, int], fps: float = 24.0,
                 train: bool = True, seed: int = 0):
        manifest = Path(manifest)
        if not manifest.is_file():
            raise FileNotFoundError(f"manifest not found: {manifest} (a JSONL file, one {{\"video\", \"caption\"}} object a line)")
        root = manifest.parent
        self.items = []
        for n, line in enumerate(manifest.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{manifest}:{n}: not a JSON object ({e}); each line is one "
                                 f"{{\"video\", \"caption\"}} object") from None
            if not isinstance(item, dict) or "video" not in item or "caption" not in item:
                raise ValueError(f"{manifest}:{n}: each line needs \"video\" and \"caption\"")
            for key in ("video", "reference", "faces", "prompt_embeds", "empty_prompt_embeds"):
                if key in item and not os.path.isabs(item[key]):
                    item[key] = str(root / item[key])
            if "prompt_embeds" in item:
                item["empty_prompt_embeds"] = str(empty_embeds_path(item["prompt_embeds"], item.get("empty_prompt_embeds")))
                for key in ("prompt_embeds", "empty_prompt_embeds"):
                    if not os.path.isfile(item[key]):  # checked up front: a missing file would skip every clip
                        raise FileNotFoundError(f"{manifest}:{n}: {key} file not found: {item[key]} "
                                                f"(write them with `python -m ltx2 encode-prompts`)")
            self.items.append(item)
        if not self.items:
            raise ValueError(f"manifest {manifest} lists no clips")
        if len({"prompt_embeds" in item for item in self.items}) > 1:
            raise ValueError(f"manifest {manifest}: give \"prompt_embeds\" on every line or on none")
        self.cache = {}  # the empty prompt's embeddings, read once per file
        self.frames, self.size, self.fps, self.train, self.seed = frames, size, fps, train, seed

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k: int):
        item = self.items[k]
        rng = np.random.default_rng((self.seed, k)) if not self.train else np.random.default_rng()
        try:
            src, src_fps = read_frames(item["video"])
            duration = (len(src) - 1) / src_fps - (self.frames - 1) / self.fps
            start = rng.uniform(0, max(duration, 0.0)) if self.train else 0.0
            idx = frame_indices(len(src), src_fps, self.frames, self.fps, start)
            h, w = src.shape[1:3]
            video = resize_center_crop(to_tensor(src[idx]), self.size)  # [F, 3, H, W]
            ref_frame = None
            if "reference" not in item:  # in-clip reference: a frame outside the sampled ones when possible
                outside = np.setdiff1d(np.arange(len(src)), idx)
                ref_frame = int(rng.choice(outside)) if len(outside) else int(rng.integers(len(src)))
            ref_rgb = read_image(item["reference"]) if ref_frame is None else src[ref_frame]
            ref = resize_center_crop(to_tensor(ref_rgb)[None], self.size)[0]
            out = {"video": video.transpose(0, 1), "ref": ref, "prompt": item["caption"]}
            if "faces" in item:
                out.update(face_fields(np.load(item["faces"]), idx, ref_frame, (h, w), ref_rgb.shape[:2], self.size))
            if "prompt_embeds" in item:
                out["prompt_embeds"], out["prompt_attention_mask"] = load_prompt_embeds(item["prompt_embeds"])
                empty = item["empty_prompt_embeds"]
                if empty not in self.cache:
                    self.cache[empty] = load_prompt_embeds(empty)
                out["empty_prompt_embeds"], out["empty_prompt_attention_mask"] = self.cache[empty]
            return out
        except Exception as e:  # a broken file must never stop an epoch
            return {"error": f"{item['video']}: {e}"}


def face_fields(faces, idx: list[int], ref_frame: int | None, hw: tuple[int, int], ref_hw: tuple[int, int],
                size: int | tuple[int, int]) -> dict:
    """A clip's `.faces.npz` (python -m interop.scrfd) -> its sampled frames' `landmarks` [F, 5, 2] and
    `face_present` [F] in crop pixels, and the reference's `ref_landmarks` [5, 2] and `ref_present`: from
    frame `ref_frame` for an in-clip reference, else the file's `ref_landmarks` (absent from files written
    before interop.scrfd detected references: then the batch has none)."""
    out = {"landmarks": crop_landmarks(torch.from_numpy(faces["landmarks"][idx]).float(), *hw, size),
           "face_present": torch.from_numpy(faces["present"][idx]).bool()}
    if ref_frame is not None:
        out["ref_landmarks"] = crop_landmarks(torch.from_numpy(faces["landmarks"][ref_frame]).float(), *hw, size)
        out["ref_present"] = torch.tensor(bool(faces["present"][ref_frame]))
    elif "ref_landmarks" in faces:
        out["ref_landmarks"] = crop_landmarks(torch.from_numpy(faces["ref_landmarks"]).float(), *ref_hw, size)
        out["ref_present"] = torch.tensor(bool(faces["ref_present"]))
    return out


def crop_landmarks(lm: torch.Tensor, h: int, w: int, size: int | tuple[int, int]) -> torch.Tensor:
    """Map source-pixel landmarks through resize_center_crop's resize and crop."""
    nh, nw, top, left = crop_box(h, w, size)
    return lm * torch.tensor([nw / w, nh / h], dtype=lm.dtype) - torch.tensor([left, top], dtype=lm.dtype)


def collate(items: list[dict]) -> dict:
    """Stack the readable items (prompt embeddings padded to the longest); report how many were
    skipped and why (first reason)."""
    good = [it for it in items if "error" not in it]
    errors = [it["error"] for it in items if "error" in it]
    batch = {"skipped": len(errors), "errors": errors}
    if good:
        padded = {k for pair in TEXT_PAIRS for k in pair}
        for key in (k for k in good[0] if all(k in it for it in good)):  # fields every item has
            vals = [it[key] for it in good]
            if key not in padded:
                batch[key] = vals if isinstance(vals[0], str) else torch.stack(vals)
        for emb, mask in TEXT_PAIRS:
            if emb in good[0]:
                batch[emb], batch[mask] = pad_prompt_embeds([it[emb] for it in good], [it[mask] for it in good])
    return batch


# ----------------------------------------------------------------------------- reference augmentation

def augment_reference(x: torch.Tensor, generator: torch.Generator | None = None, flip_p: float = 0.5,
                      max_rot_deg: float = 10.0, min_crop: float = 0.85, jitter: float = 0.1) -> torch.Tensor:
    """Reference augmentation (Sec. 3.3): random horizontal flip, rotation up to max_rot_deg,
    crop to a fraction >= min_crop of the side (resized back), then colour jitter, each factor
    uniform in [1 - jitter, 1 + jitter]: brightness (gain), contrast (about the image's mean
    grey level) and saturation (towards each pixel's grey), in that order, on [0, 1] pixels.
    x [B, 3, H, W] in [-1, 1]; one affine warp per image, vectorised. Uniforms: torch.rand(B, 8)
    (flip, angle, crop, x, y, brightness, saturation, contrast)."""
    B = x.shape[0]
    u = torch.rand(B, 8, generator=generator).to(x.device, x.dtype)
    flip = torch.where(u[:, 0] < flip_p, -1.0, 1.0).to(x)
    angle = (2 * u[:, 1] - 1) * math.radians(max_rot_deg)
    scale = min_crop + (1 - min_crop) * u[:, 2]  # zoom into a crop of side `scale`
    free = 1 - scale  # the crop may sit anywhere inside the frame
    tx, ty = (2 * u[:, 3] - 1) * free, (2 * u[:, 4] - 1) * free
    cos, sin = angle.cos() * scale, angle.sin() * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], -1), torch.stack([sin * flip, cos, ty], -1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    bright, sat, contrast = (1 + jitter * (2 * u[:, k] - 1)[:, None, None, None] for k in (5, 6, 7))
    img = (x + 1) / 2 * bright
    mean = img.mean((1, 2, 3), keepdim=True)  # the mean grey level (grey = channel mean)
    img = mean + contrast * (img - mean)
    grey = img.mean(1, keepdim=True)
    img = grey + sat * (img - grey)
    return (img.clamp(0, 1) * 2 - 1)


# ----------------------------------------------------------------------------- writing

def save_video(path: str | os.PathLike, video: torch.Tensor, fps: float = 8.0) -> None:
    """video [3, F, H, W] in [-1, 1] -> .mp4 (PyAV, H.264) or .gif/.webp (Pillow)."""
    path = Path(path)
    frames = to_uint8(video.transpose(0, 1))  # [F, H, W, 3]
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in PIL_SUFFIXES:
        ims = [Image.fromarray(f) for f in frames]
        ims[0].save(path, save_all=True, append_images=ims[1:], duration=round(1000 / fps), loop=0, lossless=True)
    elif suffix in AV_SUFFIXES:
        import av

        h, w = frames.shape[1:3]
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264" if suffix != ".webm" else "libvpx-vp9", rate=round(fps))
            stream.width, stream.height = w + w % 2, h + h % 2
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "12"} if suffix != ".webm" else {}
            for f in frames:
                f = np.pad(f, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
                container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            container.mux(stream.encode())
    else:
        raise ValueError(f"unknown video type {suffix!r}: use .mp4, .webm, .gif or .webp")


def contact_sheet(rows: list[tuple[torch.Tensor, torch.Tensor, str]], scale: int = 2, max_frames: int = 9) -> Image.Image:
    """One row per (reference [3, S, S], video [3, F, S, S], caption): reference | frames."""
    cells = []
    for ref, video, caption in rows:
        F_ = video.shape[1]
        pick = np.linspace(0, F_ - 1, min(F_, max_frames)).round().astype(int)
        images = [ref] + [video[:, k] for k in pick]
        cells.append((np.concatenate([to_uint8(im) for im in images], axis=1), caption))
    S = rows[0][0].shape[-2]  # the row height
    pad = 14
    widths = max(c.shape[1] for c, _ in cells) * scale
    sheet = Image.new("RGB", (widths, len(cells) * (S * scale + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (strip, caption) in enumerate(cells):
        y = r * (S * scale + pad)
        draw.text((2, y + 1), caption, fill="black")
        im = Image.fromarray(strip).resize((strip.shape[1] * scale, strip.shape[0] * scale), Image.NEAREST)
        sheet.paste(im, (0, y + pad))
    return sheet


# ----------------------------------------------------------------------------- the synthetic world

def portrait_framing(n: int = 64, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Where the five landmarks of an ID-photo reference sit (the synthetic world's portrait references: face
    centred at a fixed size; their mean over n), as fractions of the side [5, 2]: faces.crop_face's framing."""
    refs = synth_batch(n, size, 1, torch.Generator().manual_seed(seed), "portrait")
    return ((refs["ref_landmarks"] + 0.5) / size).mean(0)


def synth_batch(batch: int, size: int, frames: int, generator: torch.Generator, ref_source: str = "cross",
                device="cpu", split: str = "train", framing: str = "wide") -> dict:
    """A batch of the synthetic world (synth.py): clips, references, prompts, landmarks.
    ref_source: cross (another shot of the identity), portrait (another shot posed like an ID photo),
    in_clip (a frame of the clip), moved (that frame shifted by up to synth.MOVE_PX pixels), or mix
    (in_clip or cross, half each); framing: world.synth.FRAMINGS."""

    if ref_source == "mix":
        ref_source = "in_clip" if torch.rand(1, generator=generator).item() < 0.5 else "cross"
    return SynthWorld(framing=framing).sample(batch, split, frames, size, ref_source, generator=generator, device=device)
