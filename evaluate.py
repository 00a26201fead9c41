"""Metrics of identity-preserving text-to-video (the paper's evaluation table, Sec. 4).

    python evaluate.py --benchmark --ckpt runs/stdrc          # synthetic test set: real videos vs the model
    python evaluate.py --videos out/a.mp4 --refs face.png --prompts "a person nods in the snow"
    OMP_NUM_THREADS=1 python evaluate.py --train-classifiers  # the bundled assets/world_model

Videos are [B, 3, F, S, S] in [-1, 1], each with a reference face image [3, S, S] and a prompt.
Faces are found by the synthetic world's detector (faces.SynthFaceDetector) and embedded by its
embedder, or by ArcFace with --face-onnx. Per video:

- face_sim (FaceSim): mean cos(e_f, e_ref) over up to 16 evenly spaced frames, e_f the frame's
  face embedding and e_ref the reference's. Frames where no face is detected are skipped and
  counted: face_frames is the share with a face (a video with none has no face_sim).
- temporal_id (temporal identity consistency): mean cos(e_f, e_bar) of those frames to the
  normalised mean of their embeddings.
- id_top1 (identification, --benchmark only): 1 when the reference nearest to the video's e_bar,
  among the references of all the test clips, is of the video's own identity. It asks what a
  person asks of a generated face: whose is it? Chance is about 1 / (test clips).
- scene_acc, action_acc (prompt alignment, the CLIP-Score analogue on this world): the scene
  and the action recognised in the video by the world's classifiers (SceneNet on frames,
  ActionNet on detected landmark trajectories and aligned face crops) are the ones the
  prompt names (synth.parse_prompt).
- copy_pose, copy_scene, copy_paste (how much of the reference leaks into the video):
  mean over face frames of exp(-d_f / POSE_SCALE), d_f the mean distance of the frame's
  landmarks to the reference's in face sizes; the probability the scene classifier gives the
  reference's scene; copy_paste is their mean (the scene's alone without a face). Higher =
  more copied.
- smoothness: 1 - mean |x_f - (x_{f-1} + x_{f+1}) / 2| / 2, the error of predicting each frame
  from its neighbours, in units of the pixel range (VBench's motion smoothness with its learned
  interpolator replaced by the neighbours' mean); 1 for a still or perfectly linear video.
- dynamic (dynamic degree): mean |x_{f+1} - x_f| / 2 over pixels and frame pairs, 0 for a
  still video; motion: mean landmark displacement between consecutive face frames, in face sizes.

Every synthetic metric is checked in tests/test_evaluate.py: ground-truth clips score high,
a reference of another identity gives chance FaceSim, mismatched prompts chance accuracy,
in-clip references more copy-paste than cross-clip ones, a still video no dynamics.
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
from torch import nn

import checkpoint
import faces
from cli import flag
from data import AV_SUFFIXES, PIL_SUFFIXES, contact_sheet, load_image, read_frames, resize_center_crop, to_tensor
from faces import SynthNetConfig, conv_stack, embed_faces, resize_frames
from sample import generate
from synth import ACTIONS, FRAMINGS, REF_SOURCES, SCENES, SynthWorld, parse_prompt

WORLD_MODEL = Path(__file__).resolve().parent / "assets" / "world_model"
WORLD_SIZE = 32      # frames are resized to this side for the world's classifiers
FACE_THRESHOLD = 0.5  # detector score above which a frame has a face
POSE_SCALE = 0.25    # face sizes at which copy_pose has fallen to 1/e
FACE_FRAMES = 16     # frames per video for face_sim and temporal_id
TRAIN_WORLD = "OMP_NUM_THREADS=1 python evaluate.py --train-classifiers --world-model {folder}"


# ----------------------------------------------------------------------------- the world's classifiers

class SceneNet(nn.Module):
    """Scene of a frame: [N, 3, s, s] -> logits [N, len(SCENES)]."""

    def __init__(self, cfg: SynthNetConfig):
        super().__init__()
        self.cfg = cfg
        self.body = conv_stack(cfg.width)
        self.head = nn.Linear(cfg.flat_features, len(SCENES))

    def forward(self, x):
        return self.head(self.body(x))


def face_size(points: torch.Tensor) -> torch.Tensor:
    """Distance eye midpoint -> mouth midpoint of 5-point landmarks [..., 5, 2]: [...]."""
    return (points[..., :2, :].mean(-2) - points[..., 3:, :].mean(-2)).norm(dim=-1).clamp(min=1e-3)


def trajectory_features(landmarks: torch.Tensor, size: int) -> torch.Tensor:
    """Per-frame geometry of a clip's landmarks [B, F, 5, 2] (pixels of `size` frames) ->
    [B, F, 31]: positions in the image (normalised to [-1, 1]), relative to the first frame's
    face (in its face sizes), within the face (in the frame's face size), log face size change."""
    p = (landmarks + 0.5) / size * 2 - 1
    centre, scale = p.mean(2, keepdim=True), face_size(p)[..., None, None]
    in_face = (p - centre) / scale
    from_start = (p - centre[:, :1]) / scale[:, :1]
    growth = torch.log(scale / scale[:, :1])
    return torch.cat([p.flatten(2), from_start.flatten(2), in_face.flatten(2), growth.flatten(2)], -1)


@dataclass
class ActionNetConfig:
    crop: int = 24        # side of the aligned face crop
    width: int = 8        # crop CNN width (faces.conv_stack)
    appearance: int = 32  # crop features per frame
    hidden: int = 64      # temporal convolution channels


class ActionNet(nn.Module):
    """Action of a clip from its face: per frame, trajectory_features (turns, nods, moves,
    approaches) and features of the aligned face crop (mouth open, eyes shut, smile); two
    temporal convolutions; mean and max over time -> logits [B, len(ACTIONS)]. Any frame count."""

    def __init__(self, cfg: ActionNetConfig):
        super().__init__()
        self.cfg = cfg
        flat = SynthNetConfig(cfg.width, cfg.crop).flat_features
        self.crop_net = nn.Sequential(conv_stack(cfg.width), nn.Linear(flat, cfg.appearance))
        self.temporal = nn.Sequential(nn.Conv1d(31 + cfg.appearance, cfg.hidden, 3, padding=1), nn.GELU(),
                                      nn.Conv1d(cfg.hidden, cfg.hidden, 3, padding=1), nn.GELU())
        self.head = nn.Linear(2 * cfg.hidden, len(ACTIONS))

    def forward(self, frames: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """frames [B, F, 3, S, S] in [-1, 1], landmarks [B, F, 5, 2] in their pixels."""
        B, Fr, _, S, _ = frames.shape
        crops = faces.align_faces(frames.flatten(0, 1), landmarks.flatten(0, 1), size=self.cfg.crop, fill=-1.0)
        look = self.crop_net(crops).view(B, Fr, -1)
        h = self.temporal(torch.cat([trajectory_features(landmarks, S), look], -1).transpose(1, 2))
        return self.head(torch.cat([h.mean(-1), h.amax(-1)], -1))


def load_world_models(path=WORLD_MODEL) -> tuple[SceneNet, ActionNet]:
    scene = faces.load_model(path, "scene", lambda c: SceneNet(SynthNetConfig(**c)), TRAIN_WORLD)
    action = faces.load_model(path, "action", lambda c: ActionNet(ActionNetConfig(**c)), TRAIN_WORLD)
    return scene, action


@dataclass
class Judges:
    """The frozen models the metrics use."""
    embedder: nn.Module
    detector: faces.SynthFaceDetector
    scenes: SceneNet
    actions: ActionNet


def load_judges(face_model=faces.SYNTH_FACE_MODEL, world_model=WORLD_MODEL, face_onnx=None) -> Judges:
    """The synthetic world's detector, embedder (or ArcFace from `face_onnx`) and classifiers."""
    embedder = faces.load_embedder(face_onnx or face_model)
    return Judges(embedder, faces.load_synth_detector(face_model), *load_world_models(world_model))


# ----------------------------------------------------------------------------- metrics

def evenly_spaced(n: int, k: int) -> torch.Tensor:
    """k evenly spaced indices of range(n) (all of them when n <= k)."""
    return torch.linspace(0, n - 1, min(n, k)).round().long()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Mean of x where mask, NaN where mask is empty."""
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim) / mask.sum(dim)  # 0 / 0 = NaN


def top1_identification(e_bar, e_ref, ref_present, identities) -> torch.Tensor:
    """1 where the present reference of largest cos to video b's mean face e_bar[b] has b's
    identity, else 0: e_bar, e_ref [B, D] unit vectors, ref_present, identities [B]."""
    sim = (e_bar @ e_ref.T).masked_fill(~ref_present[None], -math.inf)
    return (identities[sim.argmax(1)] == identities).float()


@torch.no_grad()
def identity_metrics(embedder, videos, landmarks, present, refs, ref_landmarks, ref_present, identities=None) -> dict:
    """face_sim, temporal_id, face_frames and (given identities [B]) id_top1 [B] on FACE_FRAMES
    evenly spaced frames."""
    B, Fr = present.shape
    pick = evenly_spaced(Fr, FACE_FRAMES)
    e = embed_faces(embedder, videos[:, :, pick].transpose(1, 2).flatten(0, 1), landmarks[:, pick].flatten(0, 1))
    e, m = e.view(B, len(pick), -1), present[:, pick]
    e_ref = embed_faces(embedder, refs, ref_landmarks)
    face_sim = masked_mean((e * e_ref[:, None]).sum(-1), m)
    e_bar = F.normalize((e * m[..., None]).sum(1), dim=-1)
    temporal_id = masked_mean((e * e_bar[:, None]).sum(-1), m)
    id_top1 = torch.full((B,), math.nan, device=e.device) if identities is None else \
        torch.where(ref_present & m.any(1), top1_identification(e_bar, e_ref, ref_present, identities), math.nan)
    return {"face_sim": torch.where(ref_present, face_sim, math.nan), "id_top1": id_top1,
            "temporal_id": torch.where(m.sum(1) >= 2, temporal_id, math.nan),
            "face_frames": m.float().mean(1), "skipped_frames": (~m).sum(1).float()}


def smoothness(videos: torch.Tensor) -> torch.Tensor:
    """1 - mean |x_f - (x_{f-1} + x_{f+1}) / 2| / 2 per video [B] (NaN under 3 frames)."""
    middle = (videos[:, :, :-2] + videos[:, :, 2:]) / 2
    return 1 - (videos[:, :, 1:-1] - middle).abs().flatten(1).mean(1) / 2


def dynamic_degree(videos: torch.Tensor) -> torch.Tensor:
    """Mean |x_{f+1} - x_f| / 2 per video [B]: 0 for a still video."""
    return (videos[:, :, 1:] - videos[:, :, :-1]).abs().flatten(1).mean(1) / 2


def landmark_motion(points: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean landmark displacement between consecutive face frames, in face sizes: [B]."""
    step = (points[:, 1:] - points[:, :-1]).norm(dim=-1).mean(-1) / face_size(points[:, :-1])
    return masked_mean(step, present[:, 1:] & present[:, :-1])


def copy_pose(points, present, ref_points, ref_present) -> torch.Tensor:
    """Mean over face frames of exp(-d_f / POSE_SCALE), d_f the mean landmark distance frame vs
    reference in the reference's face sizes (normalised coordinates [B, F, 5, 2] / [B, 5, 2])."""
    d = (points - ref_points[:, None]).norm(dim=-1).mean(-1) / face_size(ref_points)[:, None]
    return torch.where(ref_present, masked_mean(torch.exp(-d / POSE_SCALE), present), math.nan)


def labels_of(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(action, scene) indices the prompts name, -1 where none or several."""
    parsed = torch.tensor([parse_prompt(p) for p in prompts]).view(-1, 2)
    return parsed[:, 0], parsed[:, 1]


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 where the most probable class is the label, 0 where not, NaN without a label."""
    return torch.where(labels >= 0, (probs.argmax(-1) == labels).float(), math.nan)


@torch.no_grad()
def evaluate_videos(judges: Judges, videos: torch.Tensor, refs: torch.Tensor, prompts: list[str],
                    identities: torch.Tensor | None = None) -> dict:
    """Every metric of every video: videos [B, 3, F, S, S], refs [B, 3, S, S] -> {name: [B]};
    id_top1 needs the identities [B] of the references (NaN without)."""
    B, _, Fr, S, _ = videos.shape
    frames = videos.transpose(1, 2).flatten(0, 1)
    landmarks, score = judges.detector.detect_batch(frames)
    landmarks, present = landmarks.view(B, Fr, 5, 2), (score > FACE_THRESHOLD).view(B, Fr)
    ref_landmarks, ref_score = judges.detector.detect_batch(refs)
    out = identity_metrics(judges.embedder, videos, landmarks, present, refs, ref_landmarks, ref_score > FACE_THRESHOLD,
                           identities)

    small = resize_frames(frames, WORLD_SIZE).view(B, Fr, 3, WORLD_SIZE, WORLD_SIZE)
    small_landmarks = (landmarks + 0.5) * (WORLD_SIZE / S) - 0.5
    scene_p = judges.scenes(small.flatten(0, 1)).softmax(-1).view(B, Fr, -1).mean(1)
    action_p = judges.actions(small, small_landmarks).softmax(-1)
    ref_scene = judges.scenes(resize_frames(refs, WORLD_SIZE)).argmax(-1)
    action, scene = labels_of(prompts)
    points, ref_points = (landmarks + 0.5) / S, (ref_landmarks + 0.5) / S  # normalised: size-free
    out.update({
        "scene_acc": accuracy(scene_p, scene), "action_acc": accuracy(action_p, action),
        "copy_pose": copy_pose(points, present, ref_points, ref_score > FACE_THRESHOLD),
        "copy_scene": scene_p.gather(1, ref_scene[:, None])[:, 0],
        "smoothness": smoothness(videos), "dynamic": dynamic_degree(videos),
        "motion": landmark_motion(points, present),
    })
    out["copy_paste"] = torch.stack([out["copy_pose"], out["copy_scene"]]).nanmean(0)  # the scene alone without faces
    return out


BOOTSTRAP = 2000  # resamples of the 95% bootstrap intervals


def bootstrap_ci(values: torch.Tensor, level: float = 0.95, resamples: int = BOOTSTRAP, seed: int = 0):
    """Percentile bootstrap interval of the mean of `values` [N] over the videos that have one
    (NaN: left out, as in summarise): resample them with replacement `resamples` times, take the
    (1-level)/2 and (1+level)/2 quantiles of the resampled means. (lo, hi); None without values.
    ID top-1 is resampled per video with the gallery of references held fixed."""
    v = values.double().flatten()
    v = v[~v.isnan()]
    if len(v) == 0:
        return None
    g = torch.Generator().manual_seed(seed)
    means = v[torch.randint(len(v), (resamples, len(v)), generator=g)].mean(1)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, q).tolist()
    return lo, hi


def summarise(per_video: dict) -> dict:
    """Mean of each metric over the videos that have it, with its 95% bootstrap interval
    (`<metric>_ci`: [lo, hi]); skipped_frames summed; counts."""
    summary = {k: torch.nanmean(v.float()).item() for k, v in per_video.items() if k != "skipped_frames"}
    summary = {k: None if math.isnan(v) else v for k, v in summary.items()}  # JSON has no NaN
    for k, v in per_video.items():
        if k != "skipped_frames" and summary.get(k) is not None:
            ci = bootstrap_ci(v)
            summary[f"{k}_ci"] = None if ci is None else list(ci)
    summary["skipped_frames"] = int(per_video["skipped_frames"].sum())
    summary["videos"] = len(per_video["face_sim"])
    summary["videos_with_face_sim"] = int((~per_video["face_sim"].isnan()).sum())
    return summary


TABLE = (("face_sim", "FaceSim ↑"), ("id_top1", "ID top-1 ↑"), ("face_frames", "face frames"), ("scene_acc", "scene acc ↑"),
         ("action_acc", "action acc ↑"), ("temporal_id", "temporal ID ↑"), ("smoothness", "smoothness ↑"),
         ("dynamic", "dynamic"), ("copy_paste", "copy-paste ↓"))


def markdown_table(rows: dict[str, dict]) -> str:
    """The paper-style table: one row per method (name -> summarise() output); a figure with an
    interval (`<metric>_ci`) prints as `mean [lo, hi]` (95% bootstrap over the videos)."""
    def cell(v, ci=None):
        if v is None or math.isnan(v):
            return "n/a"
        return f"{v:.3f}" if not ci else f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"

    lines = ["| | " + " | ".join(h for _, h in TABLE) + " |", "|---" * (len(TABLE) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(row.get(k), row.get(f"{k}_ci")) for k, _ in TABLE) + " |"
              for name, row in rows.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- benchmark on the synthetic world

def benchmark(judges: Judges, ckpt, n: int = 32, steps: int = 20, s_y: float = 5.0, s_r: float = 7.5,
              seed: int = 0, device="cpu", sheet: str | None = None, sheet_rows: int = 4,
              ref: str = "cross", framing: str = "wide") -> dict[str, dict]:
    """The synthetic test set (held-out identities, template prompts, references as SynthWorld.sample's
    `ref`: "cross", another clip of the identity, "portrait", one posed like an ID photo, or
    "in_clip", a frame of the clip itself):
    its ground-truth clips ("real videos"), those clips through the VAE (the ceiling of any DiT
    on it) and the model's videos, each summarised. `sheet`:
    a PNG of the first sheet_rows clips, each generated row above the real clip of its identity."""
    pipe, _ = checkpoint.load(ckpt, device)
    batch = SynthWorld(framing=framing).sample(n, "test", pipe.frames, pipe.size, ref, seed=seed)
    start = time.perf_counter()
    videos = torch.stack([generate(pipe, batch["ref"][b], batch["prompt"][b], s_y, s_r, steps, seed + b, progress=False).cpu()
                          for b in range(n)])
    print(f"generated {n} videos in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if sheet:
        rows = [row for b in range(min(n, sheet_rows)) for row in
                ((batch["ref"][b], videos[b].float(), f"generated: {batch['prompt'][b]}"),
                 (batch["ref"][b], batch["video"][b], "real clip of the same identity"))]
        Path(sheet).parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(rows).save(sheet)
    ids = batch["identity"]
    print(f"id_top1 chance: {(ids[:, None] == ids[None]).float().mean():.3f}", file=sys.stderr)
    with torch.no_grad():  # decode(encode(x)): what any DiT on this VAE can at best give back
        recon = pipe.vae.eval().decode(pipe.vae.encode(batch["video"].to(device))).cpu().float()
    return {"real videos": summarise(evaluate_videos(judges, batch["video"], batch["ref"], batch["prompt"], ids)),
            "real videos through the VAE": summarise(evaluate_videos(judges, recon, batch["ref"], batch["prompt"], ids)),
            f"ST-DRC ({Path(ckpt).name})": summarise(evaluate_videos(judges, videos.float(), batch["ref"], batch["prompt"], ids))}


@torch.no_grad()
def reconstruction(vae, n: int = 64, size: int = 32, frames: int = 9, seed: int = 0, batch: int = 16,
                   sheet: str | None = None, sheet_rows: int = 4, framing: str = "wide") -> dict:
    """The VAE on held-out clips and reference images of the synthetic world: PSNR (dB, pixel
    range [-1, 1], so peak-to-peak 2) and mean absolute error of decode(encode(x)), the mean.
    `sheet`: a PNG of the first sheet_rows clips (reference | frames), each above its reconstruction."""
    world, sums = SynthWorld(framing=framing), {"video": [0.0, 0.0], "image": [0.0, 0.0]}
    for start in range(0, n, batch):
        b = world.sample(min(batch, n - start), "test", frames, size, "cross", seed=seed + start)
        out = {}
        for kind, x in (("video", b["video"]), ("image", b["ref"])):
            out[kind] = vae.decode(vae.encode(x)).reshape(x.shape)
            err = out[kind] - x
            sums[kind][0] += err.pow(2).mean().item() * len(x)
            sums[kind][1] += err.abs().mean().item() * len(x)
        if sheet and start == 0:
            Path(sheet).parent.mkdir(parents=True, exist_ok=True)
            contact_sheet([row for k in range(min(len(b["ref"]), sheet_rows)) for row in
                           ((b["ref"][k], b["video"][k], "held-out clip"),
                            (out["image"][k], out["video"][k], "decode(encode(x))"))]).save(sheet)
    return {f"{stat}_{kind}": value for kind, (mse, l1) in sums.items()
            for stat, value in (("psnr", 10 * math.log10(4 / (mse / n))), ("l1", l1 / n))}


# ----------------------------------------------------------------------------- training the classifiers

@dataclass
class WorldTrainConfig:
    out: str = flag(str(WORLD_MODEL), "output folder (config.json, scene/action.safetensors, metrics.json)")
    face_model: str = flag(str(faces.SYNTH_FACE_MODEL), "folder of the synthetic face detector")
    steps: int = flag(500, "optimizer steps")
    clips: int = flag(32, "clips per step (frames alternate between 9 and 17)")
    lr: float = flag(3e-3, "AdamW peak learning rate")
    test_clips: int = flag(256, "held-out clips (test identities) for the accuracies")
    seed: int = flag(0, "seed of weights and data")


def world_batch(detector, clips: int, frames: int, split: str, g: torch.Generator, augment: bool) -> dict:
    """Synthetic clips at WORLD_SIZE with their references and detected landmarks, frames
    [B, F, 3, S, S] (degraded like decoded video when `augment`)."""
    batch = SynthWorld().sample(clips, split, frames, WORLD_SIZE, "cross", generator=g)
    video = batch["video"].transpose(1, 2).flatten(0, 1)
    if augment:
        video = faces.degrade(faces.colour_jitter(video, g), g)
    landmarks = detector.detect_batch(video)[0].view(clips, frames, 5, 2)
    return {**batch, "frames": video.view(clips, frames, 3, WORLD_SIZE, WORLD_SIZE), "detected": landmarks}


def world_loss(scene_net: SceneNet, action_net: ActionNet, b: dict) -> torch.Tensor:
    """Scene cross-entropy on every frame and the reference, action cross-entropy per clip."""
    B, Fr = b["frames"].shape[:2]
    images = torch.cat([b["frames"].flatten(0, 1), b["ref"]])
    scenes = torch.cat([b["scene"].repeat_interleave(Fr), b["ref_scene"]])
    return F.cross_entropy(scene_net(images), scenes) + F.cross_entropy(action_net(b["frames"], b["detected"]), b["action"])


def train_world_models(cfg: WorldTrainConfig) -> dict:
    """Train SceneNet and ActionNet on train identities; accuracies on test identities."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    detector = faces.load_synth_detector(cfg.face_model)
    scene_net, action_net = SceneNet(SynthNetConfig(8, WORLD_SIZE, len(SCENES))), ActionNet(ActionNetConfig())
    start, cpu_start = time.perf_counter(), time.process_time()
    faces.fit([*scene_net.parameters(), *action_net.parameters()], cfg.steps, cfg.lr,
              lambda k: world_loss(scene_net, action_net, world_batch(detector, cfg.clips, (9, 17)[k % 2], "train", g, True)),
              "scene+action", log_every=50)
    scene_net.eval().requires_grad_(False)
    action_net.eval().requires_grad_(False)
    metrics = {"train_cpu_seconds": round(time.process_time() - cpu_start), "train_wall_seconds":
               round(time.perf_counter() - start), "torch_threads": torch.get_num_threads()}
    test_g = torch.Generator().manual_seed(cfg.seed + 1)
    for frames in (9, 17):
        b = world_batch(detector, cfg.test_clips, frames, "test", test_g, False)
        scene_p = scene_net(b["frames"].flatten(0, 1)).softmax(-1).view(cfg.test_clips, frames, -1).mean(1)
        metrics[f"scene_acc_{frames}f"] = accuracy(scene_p, b["scene"]).mean().item()
        metrics[f"action_acc_{frames}f"] = accuracy(action_net(b["frames"], b["detected"]), b["action"]).mean().item()
        metrics[f"ref_scene_acc_{frames}f"] = accuracy(scene_net(b["ref"]), b["ref_scene"]).mean().item()
    metrics["config"] = asdict(cfg)
    faces.save_models(cfg.out, {"scene": scene_net, "action": action_net}, metrics)
    return metrics


# ----------------------------------------------------------------------------- command line

def read_videos(paths: list[str], refs: list[str], prompts: list[str]):
    """(video [1, 3, F, S, S], ref [1, 3, S, S], [prompt]) for each video file (or each one in
    a folder), centre-cropped square; one reference and one prompt each, or one for all."""
    files = []
    for p in map(Path, paths):
        files += sorted(q for q in p.iterdir() if q.suffix.lower() in AV_SUFFIXES | PIL_SUFFIXES) if p.is_dir() else [p]
    if len(refs) not in (1, len(files)) or len(prompts) not in (1, len(files)):
        raise ValueError(f"{len(files)} videos need one reference and one prompt each, or one for all")
    for k, path in enumerate(files):
        frames = to_tensor(read_frames(path)[0])  # [F, 3, H, W]
        size = min(frames.shape[-2:])
        video = resize_center_crop(frames, size).transpose(0, 1)[None]
        yield video, load_image(refs[k % len(refs)], size)[None], [prompts[k % len(prompts)]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", action="store_true", help="generate the synthetic test set with --ckpt and score it")
    p.add_argument("--recon", action="store_true", help="the VAE of --ckpt on --n held-out clips and images: PSNR and L1")
    p.add_argument("--ckpt", default=None, help="checkpoint folder or run folder (train.py) for --benchmark")
    p.add_argument("--n", type=int, default=32, help="test clips")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--s-text", type=float, default=5.0, help="text guidance scale s_y")
    p.add_argument("--s-ref", type=float, default=7.5, help="reference guidance scale s_r")
    p.add_argument("--seed", type=int, default=0, help="seed of the test set and the noise")
    p.add_argument("--ref-source", default="cross", choices=REF_SOURCES,
                   help="--benchmark references: cross (another clip of the identity: other pose, light, scene; the "
                        "paper's setting), portrait (the same, posed like an ID photo: centred, fixed size, mild "
                        "pose) or in_clip (a frame of the clip itself: nothing to carry across pose, position or "
                        "light; the copy-paste trap)")
    p.add_argument("--framing", default="wide", choices=FRAMINGS,
                   help="--benchmark, --recon: synthetic camera framing, wide (the original world) or closeup (head "
                        "and shoulders filling the frame)")
    p.add_argument("--videos", nargs="+", default=None, help="video files or folders of them to score")
    p.add_argument("--refs", nargs="+", default=[], help="reference image per video (or one for all)")
    p.add_argument("--prompts", nargs="+", default=[], help="prompt per video (or one for all)")
    p.add_argument("--out", default="out/evaluation", help="writes OUT.json and OUT.md")
    p.add_argument("--sheet", default=None, help="--benchmark: PNG of generated rows above the real clips of their "
                                                  "identities; --recon: held-out clips above their reconstructions")
    p.add_argument("--sheet-rows", type=int, default=4, help="--benchmark, --recon: test clips shown in --sheet")
    p.add_argument("--face-model", default=str(faces.SYNTH_FACE_MODEL), help="synthetic face detector + embedder folder")
    p.add_argument("--face-onnx", default=None, help="InsightFace ArcFace .onnx to embed faces with instead")
    p.add_argument("--world-model", default=str(WORLD_MODEL), help="scene and action classifier folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device for generation")
    p.add_argument("--train-classifiers", action="store_true",
                   help="train the world's scene and action classifiers into --world-model (detector: --face-model)")
    p.add_argument("--train-steps", type=int, default=WorldTrainConfig.steps, help="--train-classifiers: optimizer steps")
    p.add_argument("--clips", type=int, default=WorldTrainConfig.clips, help="--train-classifiers: clips per step")
    args = p.parse_args(argv)

    if args.train_classifiers:
        cfg = WorldTrainConfig(args.world_model, args.face_model, args.train_steps, args.clips, seed=args.seed)
        print(json.dumps({k: v for k, v in train_world_models(cfg).items() if k != "config"}, indent=2))
        return 0
    if not args.benchmark and not args.recon and not args.videos:
        p.error("pass --benchmark --ckpt PATH, --recon --ckpt PATH, --videos ... or --train-classifiers")
    if (args.benchmark or args.recon) and not args.ckpt:
        p.error("--benchmark and --recon need --ckpt")
    try:
        if args.recon:
            pipe, _ = checkpoint.load(args.ckpt)
            print(json.dumps(reconstruction(pipe.vae.eval(), args.n, pipe.size, pipe.frames, args.seed,
                                            sheet=args.sheet, sheet_rows=args.sheet_rows, framing=args.framing),
                             indent=2))
            return 0
        judges = load_judges(args.face_model, args.world_model, args.face_onnx)
        if args.benchmark:
            rows = benchmark(judges, args.ckpt, args.n, args.steps, args.s_text, args.s_ref, args.seed, args.device,
                             args.sheet, args.sheet_rows, args.ref_source, args.framing)
        else:
            per_video = [evaluate_videos(judges, *item) for item in read_videos(args.videos, args.refs, args.prompts)]
            rows = {"videos": summarise({k: torch.cat([m[k] for m in per_video]) for k in per_video[0]})}
    except (FileNotFoundError, ValueError) as e:
        print(f"evaluate.py: {e}", file=sys.stderr)
        return 2
    table = markdown_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
