"""The synthetic detector on real clips, per framing: landmark error (in face sizes, eye-mouth distance) and
detection rate. python -m experiments.detector"""
import torch

from world.face_nets import FACE_THRESHOLD, load_synth_detector
from world.judges import face_size
from world.synth import SynthWorld

torch.set_num_threads(1)
det = load_synth_detector()
for framing in ("wide", "closeup"):
    b = SynthWorld(framing=framing).sample(128, "test", 9, 32, "cross", seed=0)
    frames = b["video"].transpose(1, 2).flatten(0, 1)
    with torch.no_grad():
        marks, score = det.detect_batch(frames)
        rmarks, rscore = det.detect_batch(b["ref"])
    gt = b["landmarks"].flatten(0, 1)
    err = (marks - gt).norm(dim=-1).mean(-1) / face_size(gt)
    rerr = (rmarks - b["ref_landmarks"]).norm(dim=-1).mean(-1) / face_size(b["ref_landmarks"])
    print(framing, f"clip frames: detected {(score > FACE_THRESHOLD).float().mean():.3f} err median {err.median():.3f} p90 {err.quantile(0.9):.3f} "
          f"| refs: detected {(rscore > FACE_THRESHOLD).float().mean():.3f} err median {rerr.median():.3f} p90 {rerr.quantile(0.9):.3f}")
