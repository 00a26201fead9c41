"""The synthetic world's face models: a detector (5 landmarks and a face-present score per frame)
and an embedder trained with the ArcFace loss on training identities, bundled in assets/face_model.

No pretrained face model can be downloaded here, and ArcFace would not know cartoon faces
anyway, so the synthetic world (world/synth.py) brings its own: the embedder takes ArcFace's
role in L_id and in FaceSim, the detector finds the face in generated frames, where no ground
truth exists. Any embedder has an `input_size`; faces.embed_faces aligns to it. `load_embedder`
reads either kind (an InsightFace .onnx file, or a folder of this module's).

    OMP_NUM_THREADS=1 python -m world.face_nets --out assets/face_model   # both nets + metrics.json
"""
import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from data import augment_reference
from faces import align_faces, embed_faces
from infra.cli import add_flags, config_from, flag
from infra.errors import read_safetensors
from world.synth import (ACTIONS, SCENES, TEST_ID_START, identity_params, landmarks_and_boxes, render,
                         render_backgrounds, render_clips, sample_faces)

# that finds the face and its 5 landmarks in generated frames, where no ground truth exists.

SYNTH_FACE_MODEL = Path(__file__).resolve().parents[1] / "assets" / "face_model"
FACE_THRESHOLD = 0.5  # SynthFaceDetector score above which a frame has a face


@dataclass
class SynthNetConfig:
    """A small CNN on RGB [N, 3, input_size, input_size] in [-1, 1]: four stages of widths
    width * (1, 2, 4, 8) at 1, 1/2, 1/4, 1/8 resolution, then a linear layer to `outputs`."""
    width: int = 16
    input_size: int = 32
    outputs: int = 128

    @property
    def flat_features(self) -> int:
        """Size of conv_stack's flattened output."""
        return 8 * self.width * (self.input_size // 8) ** 2


def conv_stack(width: int) -> nn.Sequential:
    """Two conv3x3-BN-PReLU per stage, the first one of stages 2-4 with stride 2; flattened."""
    layers, c_in = [], 3
    for stage, c in enumerate((width, 2 * width, 4 * width, 8 * width)):
        for stride in ((1 if stage == 0 else 2), 1):
            layers += [nn.Conv2d(c_in, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c), nn.PReLU(c)]
            c_in = c
    return nn.Sequential(*layers, nn.Flatten())


def resize_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 3, size, size] (antialiased bilinear; pixel-centre aligned, so
    normalised coordinates are unchanged)."""
    if frames.shape[-2:] == (size, size):
        return frames
    return F.interpolate(frames, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class SynthFaceNet(nn.Module):
    """The synthetic world's ArcFace: aligned crop [N, 3, s, s] -> raw embedding [N, outputs]
    (compare with cosine similarity). IResNet's head (flatten, linear, BatchNorm1d) on a small
    body; `input_size` tells embed_faces the crop side to align to."""

    def __init__(self, cfg: SynthNetConfig):
        super().__init__()
        self.cfg, self.input_size = cfg, cfg.input_size
        self.body = conv_stack(cfg.width)
        self.fc = nn.Linear(cfg.flat_features, cfg.outputs)
        self.features = nn.BatchNorm1d(cfg.outputs)

    def forward(self, x):
        return self.features(self.fc(self.body(x)))


class SynthFaceDetector(nn.Module):
    """One face per frame: 5 landmarks and a face-present score. Frames of any size are resized
    to `input_size`. Landmarks by soft-argmax (integral regression): five heatmaps at 1/2
    resolution from the conv_stack's stride-2 features plus its upsampled stride-8 context;
    each landmark is the softmax-weighted mean of the cell centres, in normalised coordinates
    (pixel x -> (x + 0.5) / W * 2 - 1, which the resize leaves unchanged). The score is a
    linear head on the flattened stride-8 features."""

    def __init__(self, cfg: SynthNetConfig):
        super().__init__()
        self.cfg, self.input_size = cfg, cfg.input_size
        body, w = conv_stack(cfg.width), cfg.width
        self.fine, self.coarse = body[:12], body[12:]  # stages 1-2 (2w channels at 1/2), 3-4 (8w at 1/8, flattened)
        self.context = nn.Conv2d(8 * w, 2 * w, 1)
        self.heatmaps = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * w),
                                      nn.PReLU(2 * w), nn.Conv2d(2 * w, 5, 1))
        self.score = nn.Linear(cfg.flat_features, 1)

    def forward(self, x):
        """[N, 3, s, s] -> (landmarks [N, 5, 2] normalised, face logit [N])."""
        fine = self.fine(x)
        deep = self.coarse[:-1](fine)  # before the Flatten
        context = F.interpolate(self.context(deep), size=fine.shape[-2:], mode="bilinear", align_corners=False)
        heat = self.heatmaps(fine + context).flatten(2).softmax(-1)  # [N, 5, h * w]
        c = (torch.arange(fine.shape[-1], dtype=x.dtype, device=x.device) + 0.5) / fine.shape[-1] * 2 - 1
        ys, xs = torch.meshgrid(c, c, indexing="ij")
        landmarks = heat @ torch.stack([xs.flatten(), ys.flatten()], -1)
        return landmarks, self.score(deep.flatten(1))[:, 0]

    @torch.no_grad()
    def detect_batch(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames [N, 3, H, W] in [-1, 1] -> landmarks [N, 5, 2] in pixels, score [N] in [0, 1]."""
        landmarks, logit = self(resize_frames(frames, self.input_size))
        wh = torch.tensor(frames.shape[-1:-3:-1], dtype=frames.dtype, device=frames.device)
        return (landmarks + 1) / 2 * wh - 0.5, torch.sigmoid(logit)


def save_models(folder, models: dict[str, nn.Module], metrics: dict) -> None:
    """A model folder: config.json ({name: asdict(model.cfg)}), <name>.safetensors, metrics.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({name: asdict(m.cfg) for name, m in models.items()}, indent=2))
    for name, model in models.items():
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / f"{name}.safetensors"))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))


def load_model(folder, name: str, build, command: str) -> nn.Module:
    """Frozen model `name` of a save_models folder; build(config dict) makes the module.
    `command` is how to train one into {folder}, for the error when the folder is missing."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / f"{name}.safetensors").is_file():
        raise FileNotFoundError(f"no {name} model at {folder}: expected config.json and {name}.safetensors "
                                f"(train one with `{command.format(folder=folder)}`)")
    model = build(json.loads((folder / "config.json").read_text())[name])
    model.load_state_dict(read_safetensors(folder / f"{name}.safetensors"))
    return model.eval().requires_grad_(False)


TRAIN_SYNTH = "OMP_NUM_THREADS=1 python -m world.face_nets --out {folder}"


def load_embedder(path=SYNTH_FACE_MODEL) -> nn.Module:
    """Frozen face embedder for embed_faces (eval mode, no parameter gradients; gradients
    still reach the input): an InsightFace recognition .onnx file (see load_arcface) or a
    folder written by `python -m world.face_nets` (default: the bundled assets/face_model)."""
    if str(path).endswith(".onnx"):
        from interop.arcface_onnx import load_arcface  # the `faces` extra (onnx), only for ArcFace files
        return load_arcface(path)
    return load_model(path, "embedder", lambda c: SynthFaceNet(SynthNetConfig(**c)), TRAIN_SYNTH)


def load_synth_detector(path=SYNTH_FACE_MODEL) -> SynthFaceDetector:
    """Frozen SynthFaceDetector from a folder written by `python -m world.face_nets`."""
    return load_model(path, "detector", lambda c: SynthFaceDetector(SynthNetConfig(**c)), TRAIN_SYNTH)


# ----------------------------------------------------------------------------- training them

def arcface_loss(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, s: float, m: float):
    """Additive angular margin loss (ArcFace, Deng et al. 2019, Eq. 3):

        L = -log( e^{s cos(theta_y + m)} / (e^{s cos(theta_y + m)} + sum_{j != y} e^{s cos theta_j}) )

    theta_j is the angle between the embedding and the class centre W_j (rows of `weight`),
    both unit-normalised. Past theta_y = pi - m, cos(theta_y + m) would increase again; there,
    as in insightface, cos(theta_y) - m sin(m) is used instead.
    """
    cos = F.normalize(embeddings, dim=-1) @ F.normalize(weight, dim=-1).T
    cos_y = cos.gather(1, labels[:, None]).clamp(-1 + 1e-7, 1 - 1e-7)
    target = torch.where(cos_y > math.cos(math.pi - m), torch.cos(torch.acos(cos_y) + m), cos_y - m * math.sin(m))
    return F.cross_entropy(s * cos.scatter(1, labels[:, None], target), labels)


def fit(params, steps: int, lr: float, loss_at, what: str, log_every: int = 200) -> None:
    """AdamW, linear warm-up then cosine decay; `loss_at(step)` returns the batch loss."""
    opt = torch.optim.AdamW(params, lr, weight_decay=5e-4)
    warmup = max(1, min(100, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * k / steps)))
    start = time.perf_counter()
    for k in range(steps):
        loss = loss_at(k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if k % log_every == 0 or k == steps - 1:
            print(f"{what} step {k + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)


def degrade(x: torch.Tensor, g: torch.Generator, blur_p: float = 0.5, noise: float = 0.04) -> torch.Tensor:
    """Decoder-like degradations of images [N, 3, H, W] in [-1, 1]: a random share of a
    Gaussian blur (sigma 0.8 px) on a `blur_p` share of them, then Gaussian noise."""
    n = len(x)
    kernel = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]) ** 2 / (2 * 0.8**2))
    kernel = (kernel[:, None] * kernel[None]) / kernel.sum() ** 2
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3).to(x), groups=3)
    share = torch.rand(n, 1, 1, 1, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) < blur_p)
    x = x + share.to(x) * (blurred - x)
    return x + (noise * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)).to(x)


def colour_jitter(x: torch.Tensor, g: torch.Generator, amount: float = 0.15) -> torch.Tensor:
    """Brightness, contrast and saturation jitter of data.augment_reference, its geometry switched off."""
    return augment_reference(x, g, flip_p=0.0, max_rot_deg=0.0, min_crop=1.0, jitter=amount)


def render_face_pool(ids, views: int, size: int, g: torch.Generator, detector=None, chunk: int = 2048) -> dict:
    """`views` face images of each id (synth.sample_faces), stored as uint8 to stay small:
    image [N, 3, S, S] uint8, landmarks [N, 5, 2] (ground truth), label [N] (index into ids),
    and, given a detector, `detected` [N, 5, 2]: its landmarks."""
    ids = torch.as_tensor(list(ids))
    parts = []
    for lo in range(0, len(ids), chunk // views):
        faces = sample_faces(ids[lo:lo + chunk // views], views, size, generator=g)
        part = {"image": ((faces["image"] + 1) * 127.5).round().byte(), "landmarks": faces["landmarks"]}
        if detector is not None:
            part["detected"] = detector.detect_batch(faces["image"])[0]
        parts.append(part)
    pool = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return {**pool, "label": torch.arange(len(ids)).repeat_interleave(views)}


def embedder_batch(pool: dict, batch: int, input_size: int, g: torch.Generator, jitter: float = 0.05):
    """Aligned, augmented crops and labels from a face pool. Half the faces are aligned with
    the detector's landmarks (when the pool has them), the others with the ground truth
    jittered by `jitter` times the eye distance."""
    idx = torch.randint(len(pool["label"]), (batch,), generator=g)
    images, landmarks = pool["image"][idx].float() / 127.5 - 1, pool["landmarks"][idx]
    eye_distance = (landmarks[:, 1] - landmarks[:, 0]).norm(dim=-1)[:, None, None]
    landmarks = landmarks + jitter * eye_distance * torch.randn(landmarks.shape, generator=g)
    if "detected" in pool:
        landmarks = torch.where(torch.rand(batch, 1, 1, generator=g) < 0.5, pool["detected"][idx], landmarks)
    crops = align_faces(images, landmarks, size=input_size, fill=-1.0)
    return degrade(colour_jitter(crops, g), g), pool["label"][idx]


def detector_batch(ids, clips: int, frames: int, size: int, g: torch.Generator, away_p: float = 0.35,
                   stills: float = 0.25, empty: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frames with and without a face: images [N, 3, S, S], landmarks [N, 5, 2], present [N].

    Clips of random ids/actions/scenes (synth.render_clips); an `away_p` share of them is
    re-rendered shifted partly or wholly out of view (present = all 5 landmarks inside the
    image). Plus, per clip frame, a `stills` share of reference-like photos (synth.sample_faces:
    wider pose and scale) and an `empty` share of frames without a face: bare scene
    backgrounds and smooth noise.
    """
    ids = torch.as_tensor(list(ids))
    pick = ids[torch.randint(len(ids), (clips,), generator=g)]
    scenes = torch.randint(len(SCENES), (clips,), generator=g)
    clip = render_clips(pick, torch.randint(len(ACTIONS), (clips,), generator=g), scenes, frames, size, generator=g)
    video, landmarks = clip["video"], clip["landmarks"]
    away = (torch.rand(clips, generator=g) < away_p).nonzero().flatten()
    if len(away):
        state = {k: v[away].clone() for k, v in clip["state"].items()}
        state["cx"] += (2 * torch.rand(len(away), 1, generator=g) - 1) * 1.8
        state["cy"] += (2 * torch.rand(len(away), 1, generator=g) - 1) * 1.5
        identity = identity_params(pick[away])
        video[away] = render(identity, state, render_backgrounds(scenes[away], size, g))
        landmarks[away] = landmarks_and_boxes(identity, state, size)[0]
    n_stills, n_empty = round(stills * clips * frames), round(empty * clips * frames)
    photos = sample_faces(ids[torch.randint(len(ids), (n_stills,), generator=g)], 1, size, generator=g)
    backgrounds = render_backgrounds(torch.randint(len(SCENES), (n_empty - n_empty // 2,), generator=g), size, g)
    noise = torch.rand(n_empty // 2, 3, 4, 4, generator=g)
    noise = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    images = torch.cat([video.transpose(1, 2).flatten(0, 1), photos["image"], torch.cat([backgrounds, noise]) * 2 - 1])
    landmarks = torch.cat([landmarks.flatten(0, 1), photos["landmarks"], torch.zeros(n_empty, 5, 2)])
    present = ((landmarks > -0.5) & (landmarks < size - 0.5)).all(-1).all(-1)
    present[len(present) - n_empty:] = False
    return images, landmarks, present


def augmented(images, landmarks, present, g: torch.Generator):
    """detector_batch with colour jitter and decoder-like degradations on the images."""
    return degrade(colour_jitter(images, g), g), landmarks, present


def detector_loss(detector: SynthFaceDetector, images, landmarks, present) -> torch.Tensor:
    """Face-present BCE on all frames + smooth-L1 of the landmarks (in input pixels) on faces."""
    size = images.shape[-1]
    pred, logit = detector(images)
    target = (landmarks + 0.5) / size * 2 - 1
    error = F.smooth_l1_loss(pred[present] * size / 2, target[present] * size / 2)
    return F.binary_cross_entropy_with_logits(logit, present.float()) + error


def roc_metrics(genuine: torch.Tensor, impostor: torch.Tensor, far: float = 1e-3) -> dict:
    """Verification from pair scores (higher = same person). ROC AUC = P(genuine > impostor)
    + P(tie) / 2, counted with a binary search in the sorted impostor scores; TAR at the
    threshold that lets through a `far` share of impostors."""
    impostor = impostor.double().sort().values
    below = torch.searchsorted(impostor, genuine.double(), side="left")
    below_or_tied = torch.searchsorted(impostor, genuine.double(), side="right")
    auc = ((below + below_or_tied).double() / 2).mean() / len(impostor)
    threshold = impostor[len(impostor) - 1 - int(far * len(impostor))]
    return {"roc_auc": auc.item(), f"tar_at_far_{far:g}": (genuine.double() > threshold).double().mean().item(),
            "genuine_pairs": len(genuine), "impostor_pairs": len(impostor),
            "genuine_mean_cos": genuine.mean().item(), "impostor_mean_cos": impostor.mean().item()}


@torch.no_grad()
def embed_in_chunks(embedder, images, landmarks, chunk: int = 512) -> torch.Tensor:
    return torch.cat([embed_faces(embedder, images[k:k + chunk], landmarks[k:k + chunk])
                      for k in range(0, len(images), chunk)])


@torch.no_grad()
def verification(embedder, ids, views: int, size: int, seed: int, detector=None) -> dict:
    """roc_metrics over every pair of `views` fresh images of each id (ground-truth landmarks,
    or the detector's)."""
    faces = sample_faces(ids, views, size, seed=seed)
    landmarks = faces["landmarks"] if detector is None else detector.detect_batch(faces["image"])[0]
    e = embed_in_chunks(embedder, faces["image"], landmarks)
    sim, same = e @ e.T, faces["identity"][:, None] == faces["identity"][None]
    upper = torch.ones_like(same).triu(1)
    return roc_metrics(sim[same & upper], sim[~same & upper])


@torch.no_grad()
def landmark_metrics(detector: SynthFaceDetector, ids, size: int, seed: int, clips: int) -> dict:
    """Mean landmark error (pixels of `size` frames) on faces in view and face/no-face accuracy."""
    images, landmarks, present = detector_batch(ids, clips, 9, size, torch.Generator().manual_seed(seed))
    pred, score = detector.detect_batch(images)
    error = (pred - landmarks)[present].norm(dim=-1).mean().item()
    return {f"landmark_error_px_{size}": error, f"face_accuracy_{size}": ((score > FACE_THRESHOLD) == present).float().mean().item()}


@dataclass
class SynthTrainConfig:
    out: str = flag(str(SYNTH_FACE_MODEL), "output folder (config.json, *.safetensors, metrics.json)")
    ids: int = flag(4000, "training identities (synth train ids 0..ids-1)")
    views: int = flag(8, "pre-rendered images per training identity")
    size: int = flag(32, "frame side the faces are rendered at")
    width: int = flag(16, "CNN width of both nets (stages width * 1, 2, 4, 8)")
    dim: int = flag(128, "embedding dimension")
    embed_steps: int = flag(900, "embedder optimizer steps")
    detect_steps: int = flag(400, "detector optimizer steps")
    batch: int = flag(128, "images per step (detector: batch / 8 clips of 8 frames, plus empty frames)")
    lr: float = flag(3e-3, "AdamW peak learning rate")
    arc_s: float = flag(32.0, "ArcFace scale s")
    arc_m: float = flag(0.3, "ArcFace additive angular margin m (radians)")
    test_ids: int = flag(1000, "held-out identities for the verification figures")
    test_views: int = flag(4, "images per held-out identity (every pair of them is scored)")
    test_clips: int = flag(100, "held-out clips (9 frames each, plus photos and empty frames) for the detector figures")
    seed: int = flag(0, "seed of weights and data")


def train_synth(cfg: SynthTrainConfig) -> dict:
    """Train the synthetic world's detector and embedder on train ids, measure them on test
    ids, save them (config.json, detector/embedder.safetensors, metrics.json) in cfg.out."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    train_ids = range(cfg.ids)
    test_ids = range(TEST_ID_START, TEST_ID_START + cfg.test_ids)

    detector = SynthFaceDetector(SynthNetConfig(cfg.width, cfg.size, 11))  # outputs: 5 landmarks x 2 + a score
    fit(detector.parameters(), cfg.detect_steps, cfg.lr,
        lambda k: detector_loss(detector, *augmented(*detector_batch(train_ids, cfg.batch // 8, 8, cfg.size, g), g)),
        "detector")
    detector.eval().requires_grad_(False)

    pool = render_face_pool(train_ids, cfg.views, cfg.size, g, detector)
    print(f"rendered {len(pool['label'])} training faces ({time.perf_counter() - start:.0f} s)", flush=True)
    embedder = SynthFaceNet(SynthNetConfig(cfg.width, cfg.size, cfg.dim))
    centres = nn.Parameter(torch.randn(cfg.ids, cfg.dim) * 0.01)  # ArcFace class centres W

    def embedder_loss(k):
        crops, labels = embedder_batch(pool, cfg.batch, cfg.size, g)
        return arcface_loss(embedder(crops), centres, labels, cfg.arc_s, cfg.arc_m)

    fit([*embedder.parameters(), centres], cfg.embed_steps, cfg.lr, embedder_loss, "embedder")
    embedder.eval().requires_grad_(False)
    # CPU seconds are what one thread needs; wall seconds grow when other jobs share the cores
    metrics = {"train_cpu_seconds": round(time.process_time() - cpu_start), "train_wall_seconds":
               round(time.perf_counter() - start), "torch_threads": torch.get_num_threads()}
    for size in (32, 64):  # held-out identities, rendered at the bundled model's frame size and at twice it
        metrics[f"verification_{size}"] = verification(embedder, test_ids, cfg.test_views, size, cfg.seed + size)
        metrics[f"verification_{size}_detected"] = verification(embedder, test_ids, cfg.test_views, size,
                                                                cfg.seed + size, detector)
        metrics.update(landmark_metrics(detector, test_ids, size, cfg.seed + size, cfg.test_clips))
    metrics["config"] = asdict(cfg)

    save_models(cfg.out, {"embedder": embedder, "detector": detector}, metrics)
    return metrics


def train_command(cls, train, description: str, argv=None) -> int:
    """A command line that trains one of the world's models: flags from the dataclass `cls`, then
    `train(config)`, then its metrics printed as JSON."""
    cfg = config_from(cls, add_flags(argparse.ArgumentParser(description=description), cls).parse_args(argv))
    print(json.dumps({k: v for k, v in train(cfg).items() if k != "config"}, indent=2))
    return 0


def main(argv=None) -> int:
    return train_command(SynthTrainConfig, train_synth, "Train the synthetic world's face detector and embedder.", argv)


if __name__ == "__main__":
    sys.exit(main())
