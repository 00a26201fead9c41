"""A synthetic identity-video world: procedural cartoon people who act out a text prompt.

(This module is long because it is one renderer: identity parameters, motion, seven scene painters
and the face's parts share one coordinate frame and are read together.)

Why: identity-preserving text-to-video needs (reference face, prompt, video) triples where the
identity is known exactly, the motion and the scene come only from the text, and held-out
identities exist. This module renders such triples from a seed, on CPU or GPU, in pure torch.

IDENTITY (`identity_params`, deterministic per integer id) is mostly geometry and texture:
face width, jaw taper, chin length, eye spacing/height/size/shape/tilt, brow angle/thickness/
length/height, nose length/width, mouth height/width/lip thickness, ear size, one of six hair
styles (HAIR_STYLES, soft masks), facial hair (none/moustache/beard), marks (mole, freckles,
scar at id-specific places), plus skin tone, hair and iris colour. Per-clip lighting and colour
cast only scale colours by a few tens of percent, so geometry carries the identity.
Splits: train ids are range(0, n_train_ids) with n_train_ids <= TEST_ID_START = 100_000; test
ids are range(TEST_ID_START, TEST_ID_START + n_test_ids). They never overlap.

NUISANCE (per clip or per frame): head yaw (features slide on a head-shaped surface and are
foreshortened; the far ear hides), pitch (features move vertically, nose most), roll (rotation),
face position and scale, expression (mouth open, smile, blink), directional light, brightness,
colour cast, shirt colour, and the background scene's own layout (horizon, trees, buildings...).

TEXT is the only source of motion and scene: ACTIONS (8) and SCENES (7) are named in a prompt
built from TEMPLATES by `make_prompt`; `parse_prompt` inverts it. Directions are in image space:
"turns to the left" = the face turns towards the image's left edge (nose ends left of the eyes'
midpoint), "moves across the frame" = from the image's left to its right.

COORDINATES: normalised image coords x, y in [-1, 1] (y down); pixel i has its centre at
(i + 0.5) / S * 2 - 1. Landmarks and boxes are in pixel units with pixel centres at integers
(OpenCV/InsightFace convention). Landmark order is ArcFace's: image-left eye, image-right eye,
nose tip, image-left mouth corner, image-right mouth corner. Boxes are [x0, y0, x1, y1] of the
face oval (forehead to chin, without hair and ears).

RANDOMNESS: every random number is drawn on the CPU from one torch.Generator, in a fixed order,
then moved to the device; so a seed gives the same world on any device (up to float rounding).

SPEED (`SynthWorld().sample(16)`, 17 frames, cross-clip references included, torch 2.13 CPU,
float32, on this repo's 2-core machine shared with other jobs): 64x64 ~24 clips/s with one thread
(OMP_NUM_THREADS=1), ~37 clips/s with both cores when the machine is idle; 32x32 ~115 clips/s
with one thread. When other processes keep the cores busy, torch's 2-thread pool slows every op
by 10x or more, so prefer OMP_NUM_THREADS=1 there. On a GPU the same code runs unchanged.

API: `SynthWorld(n_train_ids, n_test_ids).sample(...)` (training/eval batches), `render_clips`
(chosen ids/actions/scenes), `sample_faces` (single face crops for an embedder), the pieces
`identity_params`, `render_backgrounds`, `render`, `landmarks_and_boxes`, the prompt helpers
`make_prompt`/`parse_prompt`, and `contact_sheet`.

CLI: `python -m world.synth --sheet assets/world_sheet.png` writes a contact sheet (see --help).
"""
import argparse
import math
import re
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from infra.cli import add_flags, config_from, flag

ACTIONS = (
    "turns to the left",
    "turns to the right",
    "nods",
    "talks",
    "moves across the frame",
    "approaches the camera",
    "blinks",
    "smiles",
)
SCENES = ("beach", "forest", "city", "snow", "night", "desert", "room")
SCENE_PHRASES = ("on the beach", "in the forest", "in the city", "in the snow", "at night", "in the desert",
                 "in a room")
TEMPLATES = (
    "a person {action} {where}",
    "{scene}: someone {action}",
    "a video {where} of a person who {action}",
    "someone {action}, {scene} background",
)
HAIR_STYLES = ("bald", "short", "long", "fringe", "spiky", "curly")
FACIAL_HAIR = ("none", "moustache", "beard")
TEST_ID_START = 100_000
REF_SOURCES = ("cross", "portrait", "in_clip", "moved")  # SynthWorld.sample's reference kinds
# ref="moved": the in-clip reference shifted by a random whole number of pixels in [-MOVE_PX, MOVE_PX]
# on each axis (8 px = 2 latent tokens of the demo model), background filled by edge replication
MOVE_PX = 8
FRAMINGS = ("wide", "closeup")  # camera framings: the original one, and head and shoulders filling the frame
# closeup: faces CLOSEUP_ZOOM times larger, positions (and the "moves across" path) CLOSEUP_TRAVEL times as far
# from the frame's centre line, re-centred at CLOSEUP_CY; scale changes ("approaches") raised to CLOSEUP_GROWTH
CLOSEUP_ZOOM, CLOSEUP_TRAVEL, CLOSEUP_CY, CLOSEUP_GROWTH = 1.35, 0.6, -0.06, 0.7
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

# Palettes (RGB in [0, 1]). Skin is interpolated along the list; the others are picked.
SKIN = torch.tensor([[0.99, 0.86, 0.75], [0.95, 0.77, 0.62], [0.85, 0.63, 0.47], [0.67, 0.46, 0.32],
                     [0.47, 0.31, 0.21]])
HAIR = torch.tensor([[0.08, 0.06, 0.05], [0.30, 0.18, 0.10], [0.55, 0.36, 0.18], [0.92, 0.78, 0.45],
                     [0.72, 0.28, 0.10], [0.78, 0.78, 0.80]])  # black, brown, light brown, blond, red, grey
IRIS = torch.tensor([[0.35, 0.20, 0.08], [0.20, 0.45, 0.80], [0.25, 0.55, 0.30], [0.10, 0.08, 0.06],
                     [0.50, 0.55, 0.60]])
WALLS = torch.tensor([[0.55, 0.72, 0.70], [0.70, 0.64, 0.82], [0.90, 0.72, 0.74], [0.62, 0.70, 0.85]])
EYE_WHITE = torch.tensor([0.97, 0.97, 0.95])
INK = torch.tensor([0.10, 0.07, 0.06])

N_ID_UNIFORMS = 64  # uniforms drawn per identity; parameters consume them in a fixed order
SMILE_CURVE = 0.10  # how far a full smile bends the mouth line (face-local units)
MAX_YAW = 0.85      # radians reached by "turns to the left/right"


# ----------------------------------------------------------------------------- prompts

def make_prompt(action: int, scene: int, template: int = 0) -> str:
    """Prompt naming ACTIONS[action] and SCENES[scene] with TEMPLATES[template]."""
    return TEMPLATES[template].format(action=ACTIONS[action], scene=SCENES[scene], where=SCENE_PHRASES[scene])


def _unique_match(prompt: str, phrases: tuple[str, ...]) -> int:
    hits = [i for i, p in enumerate(phrases) if re.search(rf"\b{re.escape(p)}\b", prompt)]
    return hits[0] if len(hits) == 1 else -1


def parse_prompt(prompt: str) -> tuple[int, int]:
    """(action index, scene index) named in a prompt; -1 for one that is missing or ambiguous."""
    prompt = prompt.lower()
    return _unique_match(prompt, ACTIONS), _unique_match(prompt, SCENES)


# ----------------------------------------------------------------------------- randomness

def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    if seed is None:
        seed = int(torch.randint(2**62, ()))
    return torch.Generator().manual_seed(seed)


def _uniform(g: torch.Generator, shape, lo=0.0, hi=1.0) -> torch.Tensor:
    """CPU uniforms in [lo, hi) (moved to a device by the caller)."""
    return lo + (hi - lo) * torch.rand(shape, generator=g)


# ----------------------------------------------------------------------------- identities

def _identity_uniforms(ids: torch.Tensor) -> torch.Tensor:
    """[B, N_ID_UNIFORMS]: each row from a generator seeded by its id alone."""
    rows = [torch.rand(N_ID_UNIFORMS, generator=torch.Generator().manual_seed(7919 * int(i) + 17))
            for i in ids.tolist()]
    return torch.stack(rows) if rows else torch.zeros(0, N_ID_UNIFORMS)


def _skin_tone(t: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear walk along SKIN, t in [0, 1] -> [B, 3]."""
    pos = t * (len(SKIN) - 1)
    lo = pos.floor().long().clamp(max=len(SKIN) - 2)
    return torch.lerp(SKIN[lo], SKIN[lo + 1], (pos - lo)[:, None])


def identity_params(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Face parameters of integer identities, [B] (colours [B, 3], freckles [B, 6, 2]); CPU tensors.

    Face-local units: the face oval's upper half-height is 1, x right, y down, origin at its
    centre. Deterministic per id: the same id gives the same face in any batch.
    """
    cols = iter(_identity_uniforms(torch.as_tensor(ids).reshape(-1)).T)

    def draw(lo, hi):
        return lo + (hi - lo) * next(cols)

    def pick(n):
        return (next(cols) * n).long().clamp(max=n - 1)

    p = {}
    p["face_w"] = draw(0.66, 0.90)       # half-width of the face oval
    p["jaw"] = draw(0.40, 1.00)          # chin taper: 1 round, small pointed
    p["chin"] = draw(0.95, 1.20)         # lower half-height of the oval
    p["eye_dx"] = draw(0.25, 0.40)       # half the distance between the eyes
    p["eye_y"] = draw(-0.22, -0.02)
    p["eye_w"] = draw(0.15, 0.23)
    p["eye_h"] = p["eye_w"] * draw(0.50, 0.90)
    p["eye_tilt"] = draw(-0.30, 0.30)
    p["iris"] = IRIS[pick(len(IRIS))]
    p["brow_gap"] = draw(0.07, 0.18)     # from the eye's top to the brow
    p["brow_len"] = draw(0.11, 0.20)     # half-length
    p["brow_angle"] = draw(-0.40, 0.40)  # > 0: outer end up (stern), < 0: inner end up (worried)
    p["brow_thick"] = draw(0.025, 0.060)
    p["nose_len"] = draw(0.18, 0.36)     # eye line -> nose tip
    p["nose_w"] = draw(0.06, 0.13)
    p["mouth_gap"] = draw(0.14, 0.28)    # nose tip -> mouth
    p["mouth_w"] = draw(0.16, 0.32)      # half-width
    p["lip"] = draw(0.022, 0.050)
    p["skin"] = _skin_tone(next(cols))
    p["hair_style"] = pick(len(HAIR_STYLES))
    p["hair"] = (HAIR[pick(len(HAIR))] * draw(0.85, 1.15)[:, None]).clamp(0, 1)
    p["hairline"] = draw(-0.78, -0.50)
    p["hair_volume"] = draw(0.0, 1.0)
    p["hair_part"] = draw(-1.0, 1.0)
    p["facial_hair"] = torch.bucketize(next(cols).contiguous(), torch.tensor([0.65, 0.82]))  # 65%, 17%, 18%
    p["ear"] = draw(0.10, 0.16)
    p["mole"] = (next(cols) < 0.4).float()
    p["mole_xy"] = torch.stack([draw(-0.6, 0.6), draw(-0.05, 0.45)], -1)
    p["freckles"] = (next(cols) < 0.25).float()
    p["freckle_xy"] = torch.stack([torch.stack([draw(-0.55, 0.55), draw(-0.06, 0.10)], -1) for _ in range(6)], 1)
    p["scar"] = (next(cols) < 0.25).float()
    p["scar_xy"] = torch.stack([draw(-0.55, 0.55), draw(-0.45, 0.35)], -1)
    p["scar_angle"] = draw(-1.3, 1.3)
    p["nose_y"] = p["eye_y"] + p["nose_len"]
    p["mouth_y"] = p["nose_y"] + p["mouth_gap"]
    return p


# ----------------------------------------------------------------------------- nuisance / actions

PER_FRAME = ("cx", "cy", "scale", "yaw", "pitch", "roll", "open", "smile", "blink")  # state keys that vary per frame


def _smoothstep(t: torch.Tensor) -> torch.Tensor:
    return t * t * (3 - 2 * t)


def _static_state(n: int, g: torch.Generator, wide: bool) -> dict[str, torch.Tensor]:
    """Per-clip nuisance [n] (colours [n, 3]); `wide` draws the broad pose/expression range
    used for reference photos and face crops, otherwise the mild start pose of a clip.

    cx, cy: face centre (normalised image coords); scale: the face's upper half-height
    (normalised); yaw, pitch, roll: radians; open, blink: 0..1; smile: -0.2 (frown) .. 1;
    light: side the light comes from (-1 left .. 1 right); bright, cast: whole-frame gain and
    per-channel colour cast; shirt: RGB.
    """
    k = 1.0 if wide else 0.25
    return {
        "cx": _uniform(g, n, -0.15, 0.15),
        "cy": _uniform(g, n, -0.12, 0.05),
        "scale": _uniform(g, n, 0.40, 0.48) if not wide else _uniform(g, n, 0.36, 0.54),
        "yaw": _uniform(g, n, -0.6 * k, 0.6 * k),
        "pitch": _uniform(g, n, -0.3 * k, 0.3 * k),
        "roll": _uniform(g, n, -0.3 * k, 0.3 * k),
        "open": _uniform(g, n, 0.0, 0.6) * (torch.rand(n, generator=g) < 0.5 * k),
        "smile": _uniform(g, n, -0.2, 0.9 if wide else 0.3),
        "blink": _uniform(g, n, 0.0, 1.0) * (torch.rand(n, generator=g) < (0.15 if wide else 0.0)),
        "light": _uniform(g, n, -1.0, 1.0),
        "bright": _uniform(g, n, 0.82, 1.12),
        "cast": _uniform(g, (n, 3), 0.90, 1.10),
        "shirt": _uniform(g, (n, 3), 0.10, 0.90),
    }


def _portrait_state(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """An ID photo: the face centred at the clips' mean height and size, a clip's mild pose and
    expression; light, colour cast and shirt drawn afresh."""
    st = _static_state(n, g, wide=False)
    st["cx"], st["cy"], st["scale"] = torch.zeros(n), torch.full((n,), -0.035), torch.full((n,), 0.44)
    return st


def frame_state(st: dict[str, torch.Tensor], framing: str, start_scale: torch.Tensor | None = None) -> dict:
    """The same state seen through another camera framing (FRAMINGS). "wide" returns `st` itself
    (the original world, bit for bit). "closeup": the face CLOSEUP_ZOOM times larger, head and
    shoulders filling the frame; cx and cy pulled towards (0, CLOSEUP_CY) by CLOSEUP_TRAVEL so
    every action stays in view; a scale that changes over the clip ("approaches the camera")
    grows by (scale / start_scale) ** CLOSEUP_GROWTH instead (start_scale [n]: the clip's first
    scale; default: the state's own, for stills). Draws no random numbers."""
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")
    if framing == "wide":
        return st
    out = dict(st)
    s = st["scale"]
    s0 = s if start_scale is None else start_scale.reshape(-1, *([1] * (s.dim() - 1)))
    out["scale"] = CLOSEUP_ZOOM * s0 * (s / s0) ** CLOSEUP_GROWTH
    out["cx"] = CLOSEUP_TRAVEL * st["cx"]
    out["cy"] = CLOSEUP_CY + CLOSEUP_TRAVEL * (st["cy"] + 0.035)  # 0.035: the wide clips' mean face height
    return out


def _act(st: dict[str, torch.Tensor], actions: torch.Tensor, frames: int,
         g: torch.Generator) -> dict[str, torch.Tensor]:
    """Turn per-clip start values into [n, frames] trajectories acting out ACTIONS[actions]."""
    n = len(actions)
    t = torch.linspace(0, 1, frames)[None].expand(n, frames)
    e = _smoothstep(t)
    out = {k: (v[:, None].expand(n, frames).clone() if k in PER_FRAME else v) for k, v in st.items()}
    phase = _uniform(g, (n, 1), 0.0, 1.0)
    amp = _uniform(g, (n, 1), 0.7, 1.0)

    def where(action, key, value):
        out[key] = torch.where((actions == ACTIONS.index(action))[:, None], value, out[key])

    yaw0 = out["yaw"]
    where("turns to the left", "yaw", yaw0 + (-MAX_YAW - yaw0) * e)
    where("turns to the right", "yaw", yaw0 + (MAX_YAW - yaw0) * e)
    where("nods", "pitch", out["pitch"] + 0.45 * amp * torch.sin(2 * math.pi * 2 * t))  # two nods
    where("talks", "open", amp * torch.sin(math.pi * (3.5 * t + phase)).abs())
    where("moves across the frame", "cx", -0.5 + t)
    where("approaches the camera", "scale", out["scale"] * torch.exp(math.log(0.7) + math.log(1.35 / 0.7) * e))
    where("approaches the camera", "cy", out["cy"] + 0.15 * e)
    f = torch.arange(frames)[None].float()
    centres = ((phase * 0.1 + torch.tensor([[0.2, 0.55, 0.85]])) * (frames - 1)).round()  # [n, 3] frames
    blink = torch.exp(-((f[:, :, None] - centres[:, None, :]) / 0.7) ** 2).sum(-1).clamp(max=1)
    where("blinks", "blink", blink)  # three blinks, fully closed on a frame each
    where("smiles", "smile", out["smile"] + (1 - out["smile"]) * e)
    where("smiles", "open", 0.3 * e)
    where("smiles", "blink", 0.3 * e)  # eyes narrow in a smile
    return out


# ----------------------------------------------------------------------------- backgrounds

def _grid(size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates X, Y [S, S] in [-1, 1] (y down)."""
    c = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1
    Y, X = torch.meshgrid(c, c, indexing="ij")
    return X, Y


def _col(rgb, device) -> torch.Tensor:
    return torch.as_tensor(rgb, dtype=torch.float32, device=device).view(1, 3, 1, 1)


def _noise(g, n: int, cells: int, size: int, device) -> torch.Tensor:
    """Smooth value noise [n, 1, S, S] in about [0, 1]."""
    cells = max(cells, 2)
    r = torch.rand(n, 1, cells, cells, generator=g).to(device)
    return F.interpolate(r, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def _step(d: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased 0 -> 1 as d crosses 0 upwards (d in normalised units)."""
    return torch.sigmoid(2 * d * size)


def _u(g, n, lo, hi, device) -> torch.Tensor:
    return _uniform(g, (n, 1, 1, 1), lo, hi).to(device)


# Scene painters: (n, X, Y, g, size, device) -> [n, 3, S, S] RGB in about [0, 1], with a
# random layout (horizon, trees, buildings, moon...) drawn from the CPU generator g.

def _beach(n, X, Y, g, size, dev):
    hz = _u(g, n, -0.40, -0.10, dev)
    shore = hz + _u(g, n, 0.30, 0.50, dev) + 0.04 * torch.sin(5 * X + _u(g, n, 0, 6.3, dev))
    sky = torch.lerp(_col([0.45, 0.70, 0.95], dev), _col([0.85, 0.93, 0.99], dev), ((Y + 1) / (hz + 1)).clamp(0, 1))
    waves = torch.sin(45 * Y + 2 * torch.sin(7 * X + _u(g, n, 0, 6.3, dev)))
    sea = _col([0.10, 0.42, 0.68], dev) * (1 + 0.15 * waves)
    sand = _col([0.94, 0.83, 0.58], dev) * (0.9 + 0.15 * _noise(g, n, size // 3, size, dev))
    img = torch.lerp(sky, sea, _step(Y - hz, size))
    img = torch.lerp(img, sand, _step(Y - shore, size))
    foam = torch.exp(-((Y - shore + 0.02) * 30) ** 2)
    return torch.lerp(img, _col([1, 1, 1], dev), 0.7 * foam)


def _forest(n, X, Y, g, size, dev):
    leaves = _noise(g, n, 7, size, dev)
    img = _col([0.12, 0.38, 0.14], dev) * (0.6 + 0.7 * leaves)
    img = torch.lerp(img, _col([0.55, 0.75, 0.55], dev), 0.5 * _step(leaves - 0.75, 20))  # light gaps
    tx, tw = _uniform(g, (n, 5, 1, 1), -1.0, 1.0).to(dev), _uniform(g, (n, 5, 1, 1), 0.04, 0.11).to(dev)
    trunks = _step(tw - (X - tx).abs(), size).amax(1, keepdim=True)
    bark = _col([0.36, 0.23, 0.12], dev) * (0.85 + 0.2 * torch.sin(60 * X + 3 * Y))
    img = torch.lerp(img, bark, trunks)
    ground = _u(g, n, 0.45, 0.75, dev) + 0.05 * torch.sin(4 * X)
    moss = _col([0.28, 0.40, 0.12], dev) * (0.8 + 0.3 * _noise(g, n, size // 4, size, dev))
    return torch.lerp(img, moss, _step(Y - ground, size))


def _city(n, X, Y, g, size, dev):
    sky = torch.lerp(_col([0.62, 0.68, 0.78], dev), _col([0.85, 0.86, 0.88], dev), (Y + 1) / 2)
    off = _u(g, n, 0.0, 0.4, dev)
    block = ((X + 1 + off) / 2.4 * 5).floor().long().clamp(0, 5)  # [n, 1, S, S]
    rows = torch.arange(n, device=dev).view(n, 1, 1, 1)
    tops = _uniform(g, (n, 6), -0.85, -0.05).to(dev)[rows, block]
    shade = _uniform(g, (n, 6), 0.35, 0.65).to(dev)[rows, block]
    building = _step(Y - tops, size)
    windows = _step(torch.sin(math.pi * 9 * X) - 0.2, 8) * _step(torch.sin(math.pi * 11 * Y) - 0.1, 8)
    lit = _step(_noise(g, n, 9, size, dev) - 0.55, 20)
    window_col = torch.lerp(_col([0.20, 0.25, 0.35], dev), _col([0.98, 0.86, 0.45], dev), lit)
    facade = torch.lerp(shade.expand(n, 3, size, size) * _col([1.0, 1.0, 1.05], dev), window_col, windows)
    img = torch.lerp(sky, facade, building)
    return torch.lerp(img, _col([0.25, 0.25, 0.27], dev), _step(Y - 0.8, size))


def _snow(n, X, Y, g, size, dev):
    sky = torch.lerp(_col([0.70, 0.78, 0.88], dev), _col([0.90, 0.93, 0.97], dev), (Y + 1) / 2)
    ridge = _u(g, n, -0.3, 0.0, dev) - 0.35 * (1 - (2 * torch.frac((X + _u(g, n, 0, 1, dev)) * 1.3) - 1).abs())
    img = torch.lerp(sky, _col([0.80, 0.85, 0.93], dev), _step(Y - ridge, size))
    ground = _u(g, n, 0.15, 0.4, dev) + 0.06 * torch.sin(3 * X + _u(g, n, 0, 6.3, dev))
    snowfield = _col([0.97, 0.98, 1.0], dev) * (0.9 + 0.1 * _noise(g, n, 6, size, dev))
    img = torch.lerp(img, snowfield, _step(Y - ground, size))
    flakes = (torch.rand(n, 1, size, size, generator=g) > 0.96).float().to(dev)
    return torch.lerp(img, _col([1, 1, 1], dev), flakes)


def _night(n, X, Y, g, size, dev):
    img = torch.lerp(_col([0.02, 0.03, 0.12], dev), _col([0.10, 0.12, 0.30], dev), (Y + 1) / 2)
    stars = (torch.rand(n, 1, size, size, generator=g) > 0.975).float().to(dev) * _step(0.2 - Y, size)
    img = torch.lerp(img, _col([1.0, 1.0, 0.85], dev), stars * 0.9)
    mx, my = _u(g, n, -0.8, 0.8, dev), _u(g, n, -0.8, -0.5, dev)
    moon = _step(0.15 - torch.hypot(X - mx, Y - my), size)
    img = torch.lerp(img, _col([0.96, 0.94, 0.78], dev), moon)
    hills = 0.55 + 0.1 * torch.sin(3 * X + _u(g, n, 0, 6.3, dev))
    return torch.lerp(img, _col([0.02, 0.03, 0.06], dev), _step(Y - hills, size))


def _desert(n, X, Y, g, size, dev):
    img = torch.lerp(_col([0.95, 0.68, 0.40], dev), _col([0.99, 0.88, 0.66], dev), ((Y + 1) / 1.2).clamp(0, 1))
    sx, sy = _u(g, n, -0.8, 0.8, dev), _u(g, n, -0.8, -0.4, dev)
    img = torch.lerp(img, _col([1.0, 0.96, 0.75], dev), _step(0.18 - torch.hypot(X - sx, Y - sy), size))
    for k, (lo, hi, rgb) in enumerate([(-0.2, 0.1, [0.88, 0.62, 0.34]), (0.25, 0.55, [0.78, 0.50, 0.26])]):
        crest = _u(g, n, lo, hi, dev) + 0.12 * torch.sin((2 + k) * X + _u(g, n, 0, 6.3, dev))
        ripples = 1 + 0.06 * torch.sin(50 * (Y - 0.3 * X))
        img = torch.lerp(img, _col(rgb, dev) * ripples, _step(Y - crest, size))
    return img


def _room(n, X, Y, g, size, dev):
    wall = WALLS[(torch.rand(n, generator=g) * len(WALLS)).long()].to(dev).view(n, 3, 1, 1)
    img = wall * (0.92 + 0.08 * torch.sin(math.pi * 14 * X))
    fx, fy = _u(g, n, -0.7, 0.7, dev), _u(g, n, -0.7, -0.3, dev)
    frame = _step(0.25 - torch.maximum((X - fx).abs(), (Y - fy).abs() * 1.3), size)
    inner = _step(0.19 - torch.maximum((X - fx).abs(), (Y - fy).abs() * 1.3), size)
    art = _uniform(g, (n, 3), 0.2, 0.9).to(dev).view(n, 3, 1, 1) * (0.7 + 0.5 * _noise(g, n, 3, size, dev))
    img = torch.lerp(img, _col([0.35, 0.22, 0.10], dev), frame)
    img = torch.lerp(img, art, inner)
    floor = _u(g, n, 0.45, 0.7, dev)
    planks = _col([0.52, 0.34, 0.18], dev) * (0.85 + 0.15 * torch.sin(math.pi * 16 * Y).abs())
    return torch.lerp(img, planks, _step(Y - floor, size))


SCENE_PAINTERS = (_beach, _forest, _city, _snow, _night, _desert, _room)


def render_backgrounds(scenes: torch.Tensor, size: int, g: torch.Generator, device="cpu") -> torch.Tensor:
    """Procedural background of each SCENES[scenes] with a random layout: [B, 3, S, S] in [0, 1]."""
    X, Y = _grid(size, device)
    out = torch.zeros(len(scenes), 3, size, size, device=device)
    for k, paint in enumerate(SCENE_PAINTERS):
        idx = (scenes == k).nonzero().flatten()
        if len(idx):
            out[idx.to(device)] = paint(len(idx), X, Y, g, size, device).clamp(0, 1)
    return out


# ----------------------------------------------------------------------------- face geometry

def _ellipse(x, y, a, b):
    """Approximate signed distance to the ellipse (x/a)^2 + (y/b)^2 = 1: the first-order
    k0 (k0 - 1) / k1 estimate, floored by the distance to the bounding box (which the true
    distance never undercuts) so thin ellipses leave no faint streaks far away."""
    k0 = torch.sqrt((x / a) ** 2 + (y / b) ** 2)
    k1 = torch.sqrt((x / a**2) ** 2 + (y / b**2) ** 2) + 1e-6
    return torch.maximum(k0 * (k0 - 1) / k1, _box(x, y, a, b))


def _segment(x, y, x0, y0, x1, y1):
    """Distance to the segment (x0, y0)-(x1, y1) and the position h in [0, 1] along it."""
    px, py, dx, dy = x - x0, y - y0, x1 - x0, y1 - y0
    h = ((px * dx + py * dy) / (dx * dx + dy * dy + 1e-8)).clamp(0, 1)
    return torch.hypot(px - h * dx, py - h * dy), h


def _box(x, y, hx, hy):
    """Signed distance to the axis-aligned box |x| < hx, |y| < hy."""
    qx, qy = x.abs() - hx, y.abs() - hy
    return torch.hypot(qx.clamp(min=0), qy.clamp(min=0)) + torch.maximum(qx, qy).clamp(max=0)


def _soft(d, eps):
    """Coverage from a signed distance (negative inside), antialiased over about 2 eps."""
    return torch.sigmoid(-d / eps)


def _px(t: torch.Tensor) -> torch.Tensor:
    """[B, F] -> [B, F, 1, 1] to broadcast against pixel maps."""
    return t[..., None, None]


def _id(t: torch.Tensor) -> torch.Tensor:
    """Identity scalar [B] -> [B, 1] to broadcast against [B, F] pose tensors."""
    return t[:, None]


@dataclass
class _View:
    """Face-local coordinates U, V of every pixel of every frame [B, F, S, S], antialias width
    eps [B, F, 1, 1] (face-local units), and the frame's yaw, pitch [B, F]."""
    U: torch.Tensor
    V: torch.Tensor
    eps: torch.Tensor
    yaw: torch.Tensor
    pitch: torch.Tensor


def _view(st: dict[str, torch.Tensor], size: int, device) -> _View:
    X, Y = _grid(size, device)
    cx, cy, s, r = (_px(st[k]) for k in ("cx", "cy", "scale", "roll"))
    dx, dy = X - cx, Y - cy
    U = (dx * torch.cos(r) + dy * torch.sin(r)) / s
    V = (-dx * torch.sin(r) + dy * torch.cos(r)) / s
    return _View(U, V, 0.5 / (size * s), st["yaw"], st["pitch"])


def _place(W, x, y, pop, yaw, pitch):
    """Where the frontal face point (x, y), raised `pop` towards the camera, appears after
    yaw then pitch: (u, v) face-local, horizontal foreshortening, depth (< 0: turned away).

    The face is the front of an ellipsoid of half-width W, half-height 1.15 and depth 1.15 W, so
    points near the middle slide most when the head turns and the nose (large pop) slides
    further than the eyes.
    """
    xn = (x / W).clamp(-0.99, 0.99)
    nz = torch.sqrt(1 - xn**2)
    z = 1.15 * W * torch.sqrt((1 - xn**2 - (y / 1.15) ** 2).clamp(min=0)) + pop
    cos_yaw, sin_yaw, cos_pitch, sin_pitch = torch.cos(yaw), torch.sin(yaw), torch.cos(pitch), torch.sin(pitch)
    u = x * cos_yaw + z * sin_yaw
    z1 = -x * sin_yaw + z * cos_yaw
    v = y * cos_pitch + z1 * sin_pitch
    depth = z1 * cos_pitch - y * sin_pitch
    # the surface normal's (x, z) turns with the head; its z says how much a feature faces us
    squash = ((-xn * sin_yaw + nz * cos_yaw).clamp(min=0.15) / nz.clamp(min=0.15)).clamp(max=1.3)
    return u, v, squash, depth


def _local(view: _View, u, v, squash):
    """Pixel coordinates relative to a placed feature, un-foreshortened: [B, F, S, S] each."""
    return (view.U - _px(u)) / _px(squash), view.V - _px(v)


def _rgb(c: torch.Tensor) -> torch.Tensor:
    """Colour [B, 3] -> [B, 3, 1, 1, 1] (broadcasts against a [B, 3, F, S, S] canvas)."""
    return c[:, :, None, None, None]


def _shade(m: torch.Tensor) -> torch.Tensor:
    """Brightness map [B, F, S, S] -> [B, 1, F, S, S]."""
    return m[:, None]


def _eye_point(p, side: float, yaw, pitch):
    """`_place` of the eye centre on `side` (-1: image-left, +1: image-right)."""
    return _place(_id(p["face_w"]), side * _id(p["eye_dx"]), _id(p["eye_y"]), -0.03, yaw, pitch)


def _nose_point(p, yaw, pitch):
    """`_place` of the nose tip, which sticks out further the longer the nose."""
    W = _id(p["face_w"])
    return _place(W, torch.zeros_like(W), _id(p["nose_y"]), 0.22 + 0.4 * _id(p["nose_len"]), yaw, pitch)


def _mouth_point(p, yaw, pitch):
    """`_place` of the mouth centre."""
    W = _id(p["face_w"])
    return _place(W, torch.zeros_like(W), _id(p["mouth_y"]), 0.03, yaw, pitch)


# Each painter returns a list of (coverage [B, F, S, S], colour broadcastable to [B, 3, F, S, S]).

def _body(p, st, size, device):
    X, Y = _grid(size, device)
    s = _px(st["scale"])
    bu, bv = (X - _px(st["cx"])) / s, (Y - _px(st["cy"])) / s
    eps = 0.5 / (size * s)
    shirt = _soft(_ellipse(bu, bv - 2.45, 1.75, 1.05), eps)
    neck = _soft(_box(bu, bv - 0.95, 0.30 * _px(_id(p["face_w"])), 0.65), eps)
    shirt_col = _rgb(st["shirt"]) * _shade(0.85 + 0.15 * torch.cos(bu.clamp(-3, 3)))
    return [(shirt, shirt_col), (neck, _rgb(p["skin"]) * 0.78)]


def _face_oval(view, p):
    """Signed distance to the face outline: upper half ellipse, lower half tapering to the chin."""
    W, jaw, chin = (_px(_id(p[k])) for k in ("face_w", "jaw", "chin"))
    lower = (view.V / chin).clamp(0, 1)
    w = W * (1 - (1 - jaw) * lower**2)
    h = torch.where(view.V > 0, chin, torch.ones_like(chin))
    return _ellipse(view.U, view.V, w, h)


def _skin(view, p, st):
    W = _px(_id(p["face_w"]))
    rim = (view.U / W) ** 2 + (view.V / 1.1) ** 2
    shade = 1 + 0.16 * _px(_id(st["light"])) * (view.U / W).clamp(-1.2, 1.2) - 0.14 * rim.clamp(max=1.3)
    return [(_soft(_face_oval(view, p), view.eps), _rgb(p["skin"]) * _shade(shade))]


def _hair_masks(view, p, st):
    """(back, front) hair coverage for each style, mixed by the identity's style one-hot."""
    U, V, eps = view.U, view.V, view.eps
    W, vol, part, hl0 = (_px(_id(p[k])) for k in ("face_w", "hair_volume", "hair_part", "hairline"))
    Uf = U - 0.6 * W * _px(torch.sin(view.yaw))  # the forehead slides with the head...
    lift = 0.5 * _px(torch.sin(view.pitch))       # ...and the hairline drops in a nod
    r = torch.sqrt((U / W) ** 2 + (V + 0.05) ** 2)
    theta = torch.atan2(U / W, -(V + 0.05))       # 0 at the crown
    skull = _soft(_ellipse(U, V + 0.03, W * 1.08, 1.09), eps)

    def below(line):  # coverage of V < line
        return _soft(V - line, eps)

    hairline = (hl0 + lift + 0.65 * (Uf / W) ** 2 + 0.12 * part * Uf / W).clamp(max=0.1)
    cap = skull * below(hairline)
    brow_top = _px(_id(p["eye_y"] - p["eye_h"] - p["brow_gap"])) - 0.10
    fringe_line = (brow_top + lift + 0.035 * torch.sin(45 * Uf) + 0.5 * (Uf / W) ** 2).clamp(max=0.2)
    fringe = skull * below(fringe_line)
    spikes = 1.07 + (0.18 + 0.22 * vol) * (1 - (2 * torch.frac(theta * 1.7 + 0.5) - 1).abs()) * (theta.abs() < 1.8)
    spiky = _soft(r - spikes, eps) * below(hairline)
    curls = _soft(r - 1.12 - 0.05 * torch.cos(14 * theta), eps) * below(hairline + 0.03 * torch.cos(30 * Uf))
    horseshoe = skull * _soft(0.75 * W - U.abs(), eps) * _soft((V + 0.2).abs() - 0.25, eps)  # hair above the ears only
    long = _soft(torch.minimum(_ellipse(U, V, W * 1.15, 1.12),
                               _box(U, V - 0.4 - 0.3 * vol, W * (1.15 + 0.1 * vol), 0.4 + 0.3 * vol)), eps)
    bob = _soft(torch.minimum(_ellipse(U, V, W * 1.12, 1.1), _box(U, V - 0.2, W * 1.12, 0.2 + 0.2 * vol)), eps)
    afro_r = torch.sqrt((U / (W + 0.45 + 0.25 * vol)) ** 2 + ((V + 0.3) / (1.15 + 0.2 * vol)) ** 2)
    afro = _soft((afro_r - 1 - 0.04 * torch.cos(12 * theta)) * 1.2, eps)
    zero = torch.zeros_like(U)
    backs = torch.stack([zero, zero, long, bob, zero, afro], 0)
    fronts = torch.stack([horseshoe, cap, cap, fringe, spiky, curls], 0)
    onehot = F.one_hot(p["hair_style"], len(HAIR_STYLES)).T.float()[:, :, None, None, None]  # [6, B, 1, 1, 1]
    return (backs * onehot).sum(0), (fronts * onehot).sum(0)


def _hair_colour(view, p, st):
    W = _px(_id(p["face_w"]))
    strands = 0.95 + 0.05 * torch.sin(20 * view.U + 7 * view.V)
    return _rgb(p["hair"]) * _shade(strands * (1 + 0.15 * _px(_id(st["light"])) * (view.U / W).clamp(-1.5, 1.5)))


def _ears(view, p, st):
    """(behind-face layers, in-front layers): a turned-away ear hides, a near ear slides onto the cheek."""
    W, ear = _id(p["face_w"]), _id(p["ear"])
    behind, front = [], []
    for side in (-1.0, 1.0):
        u, v, _, depth = _place(W, side * 0.97 * W, _id(p["eye_y"]) + 0.13, 0.12 * W, view.yaw, view.pitch)
        facing = (-side * torch.sin(view.yaw)).clamp(0, 1)  # how much the ear faces the camera
        du, dv = view.U - _px(u), view.V - _px(v)
        a = _px(ear * (0.55 + 0.45 * facing))
        shape = _soft(_ellipse(du, dv, a, _px(ear) * 1.5), view.eps) * _px(torch.sigmoid(depth / 0.04))
        inner = _soft(_ellipse(du, dv, a * 0.5, _px(ear) * 0.9), view.eps) * shape
        in_front = _px(torch.sigmoid((facing - 0.3) / 0.08))
        for where, w in ((behind, 1 - in_front), (front, in_front)):
            where += [(shape * w, _rgb(p["skin"]) * 0.88), (inner * w, _rgb(p["skin"]) * 0.7)]
    return behind, front


def _dot(view, W, x, y, radius, yaw, pitch):
    u, v, sq, depth = _place(W, x, y, 0.0, yaw, pitch)
    du, dv = _local(view, u, v, sq)
    return _soft(torch.hypot(du, dv) - radius, view.eps) * _px(torch.sigmoid(depth / 0.04))


def _marks(view, p, st):
    W = _id(p["face_w"])
    layers = []
    mole = _dot(view, W, W * _id(p["mole_xy"][:, 0]), _id(p["mole_xy"][:, 1]), 0.04, view.yaw, view.pitch)
    layers.append((mole * _px(_id(p["mole"])), _rgb(torch.tensor([[0.28, 0.16, 0.10]], device=W.device))))
    freckle_col = _rgb(p["skin"]) * 0.72
    for k in range(p["freckle_xy"].shape[1]):
        x, y = W * _id(p["freckle_xy"][:, k, 0]), _id(p["nose_y"] + p["freckle_xy"][:, k, 1])
        layers.append((_dot(view, W, x, y, 0.032, view.yaw, view.pitch) * 0.8 * _px(_id(p["freckles"])), freckle_col))
    u, v, sq, depth = _place(W, W * _id(p["scar_xy"][:, 0]), _id(p["scar_xy"][:, 1]), 0.0, view.yaw, view.pitch)
    du, dv = _local(view, u, v, sq)
    ca, sa = (_px(_id(f(p["scar_angle"]))) for f in (torch.cos, torch.sin))
    dist, _ = _segment(du, dv, -0.14 * ca, -0.14 * sa, 0.14 * ca, 0.14 * sa)
    scar = _soft(dist - 0.028, view.eps) * _px(torch.sigmoid(depth / 0.04) * _id(p["scar"]))
    layers.append((scar, _rgb(p["skin"]) * torch.tensor([1.0, 0.6, 0.6], device=W.device).view(1, 3, 1, 1, 1)))
    return layers


def _mouth_frame(view, p, st):
    """Coordinates around the mouth: du along it, w across its curved centre line (which meets
    du = +-M at w = 0, dv = -0.65 SMILE_CURVE smile), and the half-width M."""
    u, v, sq, _ = _mouth_point(p, view.yaw, view.pitch)
    du, dv = _local(view, u, v, sq)
    M = _px(_id(p["mouth_w"]))
    w = dv - SMILE_CURVE * _px(st["smile"]) * (0.35 - (du / M) ** 2)  # smiling lifts the corners
    return du, w, M


def _beard(view, p, st):
    du, w, M = _mouth_frame(view, p, st)
    W = _px(_id(p["face_w"]))
    beard = _soft(_face_oval(view, p), view.eps) * _soft(-(w + 0.10 + 0.35 * (du / W) ** 2), view.eps)
    texture = 0.94 + 0.06 * torch.sin(40 * view.U) * torch.sin(40 * view.V)
    on = _px(_id((p["facial_hair"] == FACIAL_HAIR.index("beard")).float()))
    return [(beard * 0.92 * on, _rgb(p["hair"]) * _shade(texture))]


def _moustache(view, p, st):
    du, w, M = _mouth_frame(view, p, st)
    lip = _px(_id(p["lip"]))
    dist = torch.hypot((du.abs() - 0.9 * M).clamp(min=0), w + lip + 0.06 - 0.05 * (du / M) ** 2)
    on = _px(_id((p["facial_hair"] == FACIAL_HAIR.index("moustache")).float()))
    return [(_soft(dist - 0.04, view.eps) * on, _rgb(p["hair"]))]


def _mouth(view, p, st):
    du, w, M = _mouth_frame(view, p, st)
    opening = 0.012 + 0.24 * _px(st["open"])
    lips = _soft(_ellipse(du, w, M, _px(_id(p["lip"])) + opening), view.eps)
    inside = _soft(_ellipse(du, w, M * 0.9, opening), view.eps)
    teeth = inside * _soft(w + 0.4 * opening, view.eps) * (1.5 * _px(st["smile"]) - 0.3).clamp(0, 1)
    lip_col = _rgb(p["skin"]) * torch.tensor([0.85, 0.50, 0.50], device=w.device).view(1, 3, 1, 1, 1)
    dark = torch.tensor([[0.25, 0.05, 0.06]], device=w.device)
    return [(lips, lip_col), (inside, _rgb(dark)), (teeth, _rgb(torch.tensor([[0.96, 0.95, 0.90]], device=w.device)))]


def _nose(view, p, st):
    W, nose_w = _id(p["face_w"]), _id(p["nose_w"])
    u, v, sq, _ = _nose_point(p, view.yaw, view.pitch)
    du, dv = _local(view, u, v, sq)
    nw = _px(nose_w)
    tip = _soft(_ellipse(du, dv + 0.01, nw, nw * 0.6), view.eps) * 0.5
    nostrils = sum(_soft(_ellipse(du - s * 0.55 * nw, dv - 0.015, 0.32 * nw, 0.2 * nw + 0.01), view.eps)
                   for s in (-1, 1))
    ub, vb, _, _ = _place(W, torch.zeros_like(W), _id(p["eye_y"]) + 0.06, 0.08, view.yaw, view.pitch)
    side = torch.where(_id(st["light"]) >= 0, -1.0, 1.0)  # shadow on the side away from the light
    x1, y1 = u + sq * side * nose_w * 0.8, v - nose_w * 0.4
    bridge, _ = _segment(view.U, view.V, _px(ub), _px(vb), _px(x1), _px(y1))
    return [(tip, _rgb(p["skin"]) * 0.75), (_soft(bridge - 0.02, view.eps) * 0.55, _rgb(p["skin"]) * 0.68),
            (nostrils.clamp(max=1) * 0.85, _rgb(p["skin"]) * 0.35)]


def _eye_frame(view, p, side):
    u, v, sq, depth = _eye_point(p, side, view.yaw, view.pitch)
    du, dv = _local(view, u, v, sq)
    return du, dv, _px(torch.sigmoid(depth / 0.04))


def _eyes(view, p, st):
    layers = []
    a, b0 = _px(_id(p["eye_w"])), _px(_id(p["eye_h"]))
    b = b0 * (1 - 0.92 * _px(st["blink"])) + 0.004
    for side in (-1.0, 1.0):
        du, dv, visible = _eye_frame(view, p, side)
        t = _px(_id(side * p["eye_tilt"]))
        eu, ev = du * torch.cos(t) + dv * torch.sin(t), -du * torch.sin(t) + dv * torch.cos(t)
        white = _soft(_ellipse(eu, ev, a, b), view.eps) * visible
        outline = _soft(_ellipse(eu, ev + 0.012, a + 0.025, b + 0.03), view.eps) * visible  # heavier upper lid
        iris = _soft(torch.hypot(du, dv) - 0.8 * b0, view.eps) * white
        pupil = _soft(torch.hypot(du, dv) - 0.38 * b0, view.eps) * white
        layers += [(outline, _rgb(INK.to(a.device)[None])), (white, _rgb(EYE_WHITE.to(a.device)[None])),
                   (iris, _rgb(p["iris"])), (pupil, _rgb(INK.to(a.device)[None]))]
    return layers


def _brows(view, p, st):
    layers = []
    W = _id(p["face_w"])
    L, ang, th = (_px(_id(p[k])) for k in ("brow_len", "brow_angle", "brow_thick"))
    for side in (-1.0, 1.0):
        y = _id(p["eye_y"] - p["eye_h"] - p["brow_gap"])
        u, v, sq, depth = _place(W, side * _id(p["eye_dx"]), y, 0.04, view.yaw, view.pitch)
        du, dv = _local(view, u, v, sq)
        ox, oy = side * L * torch.cos(ang), -L * torch.sin(ang)  # outer end; inner end mirrored through the centre
        dist, h = _segment(du, dv, -ox, -oy, ox, oy)
        brow = _soft(dist - th * (1 - 0.45 * h), view.eps) * _px(torch.sigmoid(depth / 0.04))
        layers.append((brow, _rgb(p["hair"] * 0.8)))
    return layers


def render(identity: dict[str, torch.Tensor], state: dict[str, torch.Tensor], background: torch.Tensor) -> torch.Tensor:
    """Render faces over backgrounds: [B, 3, F, S, S] in [-1, 1] on background's device.

    identity: `identity_params` output; state: per-frame pose/expression [B, F] (PER_FRAME keys)
    and per-clip light, bright [B], cast, shirt [B, 3]; background [B, 3, S, S] in [0, 1].
    """
    device, size = background.device, background.shape[-1]
    p = {k: v.to(device) for k, v in identity.items()}
    st = {k: v.to(device) for k, v in state.items()}
    view = _view(st, size, device)
    B, Fr = st["yaw"].shape
    canvas = background[:, :, None].expand(B, 3, Fr, size, size)
    hair_back, hair_front = _hair_masks(view, p, st)
    hair_col = _hair_colour(view, p, st)
    ears_behind, ears_front = _ears(view, p, st)
    layers = [*_body(p, st, size, device), (hair_back, hair_col), *ears_behind, *_skin(view, p, st), *ears_front,
              *_marks(view, p, st), *_beard(view, p, st), *_nose(view, p, st), *_mouth(view, p, st),
              *_moustache(view, p, st), *_eyes(view, p, st), *_brows(view, p, st), (hair_front, hair_col)]
    for alpha, colour in layers:
        canvas = canvas + alpha[:, None] * (colour - canvas)
    light = _rgb(st["cast"] * st["bright"][:, None])
    return (canvas * light).clamp(0, 1) * 2 - 1


def _to_pixels(u, v, st, size):
    """Face-local points (u, v) [B, F, K] -> pixel coordinates [B, F, K, 2]."""
    roll, s, cx, cy = (st[k][..., None] for k in ("roll", "scale", "cx", "cy"))
    x = cx + s * (u * torch.cos(roll) - v * torch.sin(roll))
    y = cy + s * (u * torch.sin(roll) + v * torch.cos(roll))
    return torch.stack([(x + 1) / 2 * size - 0.5, (y + 1) / 2 * size - 0.5], -1)


def landmarks_and_boxes(identity: dict[str, torch.Tensor], state: dict[str, torch.Tensor], size: int):
    """Ground truth of `render`: 5 landmarks [B, F, 5, 2] (ArcFace order) and face boxes [B, F, 4]
    in pixels, computed from the same placements the painters use (inputs on one device)."""
    p, st = identity, state
    W, yaw, pitch = _id(p["face_w"]), st["yaw"], st["pitch"]
    eyes = [_eye_point(p, side, yaw, pitch) for side in (-1.0, 1.0)]
    nose = _nose_point(p, yaw, pitch)
    mu, mv, msq, _ = _mouth_point(p, yaw, pitch)
    corner_v = mv - 0.65 * SMILE_CURVE * st["smile"]  # see `_mouth_frame`
    us = [eyes[0][0], eyes[1][0], nose[0], mu - msq * _id(p["mouth_w"]), mu + msq * _id(p["mouth_w"])]
    vs = [eyes[0][1], eyes[1][1], nose[1], corner_v, corner_v]
    marks = _to_pixels(torch.stack(us, -1), torch.stack(vs, -1), st, size)
    B, Fr = yaw.shape
    cu = torch.stack([-W, W, -W, W], -1).expand(B, Fr, 4)
    cv = torch.stack([-torch.ones_like(W), -torch.ones_like(W), _id(p["chin"]), _id(p["chin"])], -1).expand(B, Fr, 4)
    corners = _to_pixels(cu, cv, st, size)
    boxes = torch.cat([corners.amin(2), corners.amax(2)], -1)
    return marks, boxes


# ----------------------------------------------------------------------------- sampling

def _shoot(ids, state, scenes, size, g, device):
    """Render identities `ids` in `state` over fresh backgrounds: (video, landmarks, boxes)."""
    identity = identity_params(ids)
    video = render(identity, state, render_backgrounds(scenes, size, g, device))
    marks, boxes = landmarks_and_boxes(identity, state, size)
    return video, marks.to(device), boxes.to(device)


def _still(st: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A one-frame state from per-clip values."""
    return {k: (v[:, None] if k in PER_FRAME else v) for k, v in st.items()}


def render_clips(ids, actions, scenes, frames: int = 17, size: int = 64, seed: int | None = None,
                 generator: torch.Generator | None = None, device="cpu", framing: str = "wide") -> dict:
    """Clips of identities `ids` acting out ACTIONS[actions] in SCENES[scenes] (all [B]), with a
    random start pose, position, light and scene layout, through the camera `framing`. Returns
    video [B, 3, F, S, S] in [-1, 1], landmarks [B, F, 5, 2], boxes [B, F, 4] and the per-frame
    `state` it rendered."""
    g = _generator(seed, generator)
    ids, actions, scenes = (torch.as_tensor(x, dtype=torch.long).reshape(-1) for x in (ids, actions, scenes))
    static = _static_state(len(ids), g, wide=False)
    state = frame_state(_act(static, actions, frames, g), framing, static["scale"])
    video, marks, boxes = _shoot(ids, state, scenes, size, g, device)
    return {"video": video, "landmarks": marks, "boxes": boxes, "state": state}


class SynthWorld:
    """The world's identity splits and its clip sampler.

    train ids: range(0, n_train_ids); test ids: range(TEST_ID_START, TEST_ID_START + n_test_ids).
    """

    def __init__(self, n_train_ids: int = TEST_ID_START, n_test_ids: int = 1000, framing: str = "wide"):
        if not 0 < n_train_ids <= TEST_ID_START:
            raise ValueError(f"n_train_ids must be in 1..{TEST_ID_START} so train and test ids stay disjoint")
        if framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")
        self.n_train_ids, self.n_test_ids, self.framing = n_train_ids, n_test_ids, framing

    def ids(self, split: str) -> range:
        if split == "train":
            return range(0, self.n_train_ids)
        if split == "test":
            return range(TEST_ID_START, TEST_ID_START + self.n_test_ids)
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")

    def sample(self, batch: int, split: str = "train", frames: int = 17, size: int = 64, ref: str = "cross",
               seed: int | None = None, generator: torch.Generator | None = None, device="cpu") -> dict:
        """A batch of clips, each one identity acting out its prompt.

        Returns video [B, 3, F, S, S] and ref [B, 3, S, S] in [-1, 1]; prompt list[str];
        identity, action, scene, ref_scene, ref_frame [B] long; landmarks [B, F, 5, 2],
        boxes [B, F, 4], ref_landmarks [B, 5, 2] in pixels. ref="cross": the same identity
        in another pose, expression, light, position and scene (ref_scene != scene,
        ref_frame = -1); ref="portrait": the same, but posed like an ID photo (face centred at a
        fixed size, a clip's mild pose and expression); ref="in_clip": frame ref_frame of the clip
        itself (ref_scene = scene); ref="moved": that in-clip frame and its landmarks shifted by
        ref_shift [B, 2] = (dx, dy) whole pixels, each in [-MOVE_PX, MOVE_PX] (edge replication fills
        the uncovered border).
        Same seed (or generator state) -> identical tensors.
        """
        if ref not in REF_SOURCES:
            raise ValueError(f"ref must be one of {REF_SOURCES}, got {ref!r}")
        g = _generator(seed, generator)
        pool = self.ids(split)
        ids = pool.start + torch.randint(len(pool), (batch,), generator=g)
        action = torch.randint(len(ACTIONS), (batch,), generator=g)
        scene = torch.randint(len(SCENES), (batch,), generator=g)
        template = torch.randint(len(TEMPLATES), (batch,), generator=g)
        clip = render_clips(ids, action, scene, frames, size, generator=g, device=device, framing=self.framing)
        video, marks, boxes = clip["video"], clip["landmarks"], clip["boxes"]
        if ref in ("in_clip", "moved"):
            ref_frame = torch.randint(frames, (batch,), generator=g)
            rows, pick = torch.arange(batch, device=device), ref_frame.to(device)
            ref_img, ref_marks, ref_scene = video[rows, :, pick], marks[rows, pick], scene
            if ref == "moved":
                shift = torch.randint(-MOVE_PX, MOVE_PX + 1, (batch, 2), generator=g)  # (dx, dy) pixels
                ref_img, ref_marks = _move(ref_img, shift.to(device)), ref_marks + shift.to(ref_marks)[:, None]
        else:
            ref_frame = torch.full((batch,), -1)
            ref_scene = (scene + torch.randint(1, len(SCENES), (batch,), generator=g)) % len(SCENES)
            ref_state = _portrait_state(batch, g) if ref == "portrait" else _static_state(batch, g, wide=True)
            ref_state = _still(frame_state(ref_state, self.framing))
            ref_video, ref_marks, _ = _shoot(ids, ref_state, ref_scene, size, g, device)
            ref_img, ref_marks = ref_video[:, :, 0], ref_marks[:, 0]
        out = {
            "video": video, "ref": ref_img, "landmarks": marks, "boxes": boxes, "ref_landmarks": ref_marks,
            "prompt": [make_prompt(a, s, t) for a, s, t in zip(action.tolist(), scene.tolist(), template.tolist())],
            **{k: v.to(device) for k, v in dict(identity=ids, action=action, scene=scene, ref_scene=ref_scene,
                                                 ref_frame=ref_frame).items()},
        }
        if ref == "moved":
            out["ref_shift"] = shift.to(device)
        return out


def _move(img: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """img [B, C, H, W] moved by shift [B, 2] = (dx, dy) whole pixels (+x right, +y down), each
    |shift| <= MOVE_PX: out[..., y, x] = img[..., clamp(y - dy), clamp(x - dx)] (edge replication)."""
    H, W = img.shape[-2:]
    padded = F.pad(img, (MOVE_PX,) * 4, mode="replicate")
    return torch.stack([padded[b, :, MOVE_PX - dy:MOVE_PX - dy + H, MOVE_PX - dx:MOVE_PX - dx + W]
                        for b, (dx, dy) in enumerate(shift.tolist())])


def sample_faces(ids, n_per_id: int = 1, size: int = 64, seed: int | None = None,
                 generator: torch.Generator | None = None, device="cpu", framing: str = "wide") -> dict:
    """Single face images of the given identities, each under random pose, expression, light,
    position and scene (for training or testing a face embedder). Row order: ids repeated
    n_per_id times each (id0, id0, ..., id1, ...). Returns image [N, 3, S, S] in [-1, 1],
    landmarks [N, 5, 2], boxes [N, 4], identity [N], scene [N]."""
    g = _generator(seed, generator)
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).repeat_interleave(n_per_id)
    scene = torch.randint(len(SCENES), (len(ids),), generator=g)
    video, marks, boxes = _shoot(ids, _still(frame_state(_static_state(len(ids), g, wide=True), framing)), scene, size, g,
                                 device)
    return {"image": video[:, :, 0], "landmarks": marks[:, 0], "boxes": boxes[:, 0],
            "identity": ids.to(device), "scene": scene.to(device)}


# ----------------------------------------------------------------------------- contact sheet

def contact_sheet(batch: dict, columns: int = 6, zoom: int = 2, show_landmarks: bool = False):
    """PIL image: per clip a caption line, then reference | `columns` evenly spaced frames."""
    from PIL import Image, ImageDraw

    video, ref = batch["video"].cpu(), batch["ref"].cpu()
    B, _, Fr, S, _ = video.shape
    picks = torch.linspace(0, Fr - 1, min(columns, Fr)).round().long()
    tile, gap, caption = S * zoom, 4, 14
    sheet = Image.new("RGB", (gap + (len(picks) + 1) * (tile + gap) + gap, B * (caption + tile + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)

    def paste(img, marks, x, y):
        pixels = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        sheet.paste(Image.fromarray(pixels).resize((tile, tile), Image.NEAREST), (x, y))
        if show_landmarks:
            for k, (px, py) in enumerate(marks.tolist()):
                cx, cy = x + (px + 0.5) * zoom, y + (py + 0.5) * zoom
                colour = ("red", "blue", "lime", "magenta", "cyan")[k]  # LANDMARK_NAMES order
                draw.ellipse([cx - 1.5, cy - 1.5, cx + 1.5, cy + 1.5], fill=colour)

    for b in range(B):
        y = gap + b * (caption + tile + gap)
        ref_scene = SCENES[int(batch["ref_scene"][b])]
        draw.text((gap, y), f"id {int(batch['identity'][b])} | ref: {ref_scene} | {batch['prompt'][b]}", fill="black")
        y += caption
        paste(ref[b], batch["ref_landmarks"][b].cpu(), gap, y)
        for j, f in enumerate(picks.tolist()):
            paste(video[b, :, f], batch["landmarks"][b, f].cpu(), gap + (j + 1) * (tile + gap) + gap, y)
    return sheet


@dataclass
class SheetConfig:
    sheet: str = flag("", "output PNG path, its folder existing (required)")
    seed: int = flag(0, "random seed of the batch (same seed -> same sheet)", lo=0)
    n: int = flag(6, "number of clips, one per row", lo=1)
    size: int = flag(64, "frame side in pixels", lo=16)
    frames: int = flag(17, "frames per clip (the sheet shows 6 evenly spaced ones)", lo=1)
    split: str = flag("train", "identity split to draw from", choices=("train", "test"))
    ref: str = flag("cross", "reference: another shot of the identity (cross), one posed like an ID photo (portrait), "
                             "a frame of the clip (in_clip), or that frame moved by up to MOVE_PX pixels (moved)",
                choices=REF_SOURCES)
    framing: str = flag("wide", "camera: the original framing (wide) or head and shoulders filling the frame (closeup)",
                        choices=FRAMINGS)
    zoom: int = flag(2, "integer upscaling of each tile (nearest neighbour)", lo=1)
    landmarks: bool = flag(False, "overlay the 5 ground-truth landmarks")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Render a contact sheet of the synthetic identity-video world.")
    args = config_from(SheetConfig, add_flags(ap, SheetConfig).parse_args(argv))
    if not args.sheet:
        ap.error("--sheet PATH is required")
    batch = SynthWorld(framing=args.framing).sample(args.n, args.split, args.frames, args.size, args.ref, seed=args.seed)
    contact_sheet(batch, zoom=args.zoom, show_landmarks=args.landmarks).save(args.sheet)
    print(f"wrote {args.sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
