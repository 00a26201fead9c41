"""The synthetic world's judges: its face detector and embedder (world/face_nets.py), a scene
classifier on frames and an action classifier on landmark trajectories and face crops, bundled in
assets/world_model. evaluate.py scores videos with them.

    OMP_NUM_THREADS=1 python -m world.judges --out assets/world_model
"""
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from faces import align_faces
from infra.cli import flag
from world.face_nets import (SYNTH_FACE_MODEL, SynthFaceDetector, SynthNetConfig, colour_jitter, conv_stack, degrade,
                             fit, load_embedder, load_model, load_synth_detector, save_models, train_command)
from world.synth import ACTIONS, SCENES, SynthWorld

WORLD_MODEL = Path(__file__).resolve().parents[1] / "assets" / "world_model"
WORLD_SIZE = 32      # frames are resized to this side for the world's classifiers
TRAIN_WORLD = "OMP_NUM_THREADS=1 python -m world.judges --out {folder}"


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
    width: int = 8        # crop CNN width (conv_stack)
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
        crops = align_faces(frames.flatten(0, 1), landmarks.flatten(0, 1), size=self.cfg.crop, fill=-1.0)
        look = self.crop_net(crops).view(B, Fr, -1)
        h = self.temporal(torch.cat([trajectory_features(landmarks, S), look], -1).transpose(1, 2))
        return self.head(torch.cat([h.mean(-1), h.amax(-1)], -1))


def load_world_models(path=WORLD_MODEL) -> tuple[SceneNet, ActionNet]:
    scene = load_model(path, "scene", lambda c: SceneNet(SynthNetConfig(**c)), TRAIN_WORLD)
    action = load_model(path, "action", lambda c: ActionNet(ActionNetConfig(**c)), TRAIN_WORLD)
    return scene, action


@dataclass
class Judges:
    """The frozen models the metrics use."""
    embedder: nn.Module
    detector: SynthFaceDetector
    scenes: SceneNet
    actions: ActionNet


def load_judges(face_model=SYNTH_FACE_MODEL, world_model=WORLD_MODEL, face_onnx=None) -> Judges:
    """The synthetic world's detector, embedder (or ArcFace from `face_onnx`) and classifiers."""
    embedder = load_embedder(face_onnx or face_model)
    return Judges(embedder, load_synth_detector(face_model), *load_world_models(world_model))


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 where the most probable class is the label, 0 where not, NaN without a label."""
    return torch.where(labels >= 0, (probs.argmax(-1) == labels).float(), math.nan)


# ----------------------------------------------------------------------------- training the classifiers

@dataclass
class WorldTrainConfig:
    out: str = flag(str(WORLD_MODEL), "output folder (config.json, scene/action.safetensors, metrics.json)")
    face_model: str = flag(str(SYNTH_FACE_MODEL), "folder of the synthetic face detector")
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
        video = degrade(colour_jitter(video, g), g)
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
    detector = load_synth_detector(cfg.face_model)
    scene_net, action_net = SceneNet(SynthNetConfig(8, WORLD_SIZE, len(SCENES))), ActionNet(ActionNetConfig())
    start, cpu_start = time.perf_counter(), time.process_time()
    fit([*scene_net.parameters(), *action_net.parameters()], cfg.steps, cfg.lr,
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
    save_models(cfg.out, {"scene": scene_net, "action": action_net}, metrics)
    return metrics


def main(argv=None) -> int:
    return train_command(WorldTrainConfig, train_world_models,
                         "Train the world's scene and action classifiers (detector: --face-model).", argv)


if __name__ == "__main__":
    sys.exit(main())
