"""InsightFace SCRFD face detection (through onnxruntime) and a manifest's landmarks.

    python -m interop.scrfd --manifest clips.jsonl   # SCRFD landmarks of real clips and their references -> clips.faces.jsonl

Needs the `faces` extra (insightface, onnxruntime) and the buffalo_l pack on disk.
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from data import read_frames, read_image
from infra.cli import add_flags, config_from, flag
from interop.arcface_onnx import DETECTOR_FILES, _find_model


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, else CPU."""
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _to_uint8_rgb(image) -> np.ndarray:
    """uint8 HxWx3 RGB array as is; a float tensor [3, H, W] in [-1, 1] converted to it."""
    if isinstance(image, torch.Tensor):
        image = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(image, dtype=np.uint8)


class FaceDetector:
    """InsightFace SCRFD face detector (not differentiable; gives the landmarks to align with)."""

    def __init__(self, model_dir=None, providers=None, input_size: int = 640, threshold: float = 0.5):
        path = _find_model(model_dir, DETECTOR_FILES, "detector")
        from insightface.model_zoo import get_model  # heavy import, only when detecting
        self.model = get_model(path, providers=providers or default_providers())
        self.model.prepare(ctx_id=0, input_size=(input_size, input_size), det_thresh=threshold)

    def detect(self, image) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """Faces in one RGB image (uint8 HxWx3, or float tensor [3, H, W] in [-1, 1]), best
        first: (box [4] x1 y1 x2 y2, landmarks [5, 2] as (x, y) pixels, score)."""
        bgr = _to_uint8_rgb(image)[..., ::-1]  # insightface takes cv2's BGR order
        boxes, landmarks = self.model.detect(np.ascontiguousarray(bgr))
        return [(box[:4], kps, float(box[4])) for box, kps in zip(boxes, landmarks)]

    def detect_batch(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The best face of each frame [N, 3, H, W] in [-1, 1]: landmarks [N, 5, 2] in pixels
        and score [N] (0, landmarks 0, where no face was found); same contract as
        SynthFaceDetector.detect_batch."""
        landmarks, scores = torch.zeros(len(frames), 5, 2), torch.zeros(len(frames))
        for k, frame in enumerate(frames):
            faces = self.detect(frame)
            if faces:
                landmarks[k], scores[k] = torch.from_numpy(np.asarray(faces[0][1], np.float32)), faces[0][2]
        return landmarks, scores


# ----------------------------------------------------------------------------- landmarks of a manifest

def best_face(detector, image: np.ndarray) -> tuple[np.ndarray, bool]:
    """The best face's 5 landmarks [5, 2] in pixels (0 where none) and whether there is one."""
    faces = detector.detect(image)
    return (np.asarray(faces[0][1], np.float32), True) if faces else (np.zeros((5, 2), np.float32), False)


def precompute_landmarks(manifest, out_manifest, detector) -> int:
    """Detect the best face in every source frame of every clip of a JSONL manifest (see
    data.ManifestDataset), and in the line's "reference" image when it has one; write `<video>.faces.npz`
    beside each video with `landmarks` [F_src, 5, 2] (source pixels, 0 where none), `present` [F_src] and,
    with a reference, `ref_landmarks` [5, 2] (its pixels) and `ref_present`; and `out_manifest`: the same
    lines with "faces" added (paths relative to the new manifest's folder). `detector` has FaceDetector's
    `detect(uint8 HxWx3 RGB)`. Returns the number of clips."""
    manifest, out_manifest = Path(manifest), Path(out_manifest)
    lines = []
    for line in manifest.read_text().splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        for key in ("video", "reference"):
            if key in item and not os.path.isabs(item[key]):
                item[key] = os.path.relpath(manifest.parent / item[key], out_manifest.parent)
        video = out_manifest.parent / item["video"]
        frames, _ = read_frames(video)
        found = [best_face(detector, frame) for frame in frames]
        faces = {"landmarks": np.stack([lm for lm, _ in found]), "present": np.array([p for _, p in found])}
        if "reference" in item:
            faces["ref_landmarks"], faces["ref_present"] = best_face(detector, read_image(out_manifest.parent / item["reference"]))
        npz = video.with_name(video.name + ".faces.npz")
        np.savez(npz, **faces)
        item["faces"] = os.path.relpath(npz, out_manifest.parent)
        lines.append(json.dumps(item))
        ref = f"; reference: {'a face' if faces.get('ref_present') else 'no face'}" if "reference" in item else ""
        print(f"{video}: a face in {faces['present'].sum()}/{len(frames)} frames{ref}", flush=True)
    out_manifest.write_text("\n".join(lines) + "\n")
    return len(lines)


# ----------------------------------------------------------------------------- command line

@dataclass
class LandmarksConfig:
    manifest: str = flag("", "JSONL manifest ({\"video\", \"caption\"} a line); required")
    out: str = flag("", "manifest to write (empty: MANIFEST with .faces.jsonl)")
    face_models: str = flag("", "folder of the buffalo_l pack (det_10g.onnx); empty: $STDRC_FACE_MODELS or "
                                "~/.insightface/models/buffalo_l")
    threshold: float = flag(0.5, "detection score threshold")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Detect the 5 landmarks in every frame of a manifest's videos (InsightFace "
                                             "SCRFD) and write a manifest whose lines name them (\"faces\").")
    args = config_from(LandmarksConfig, add_flags(ap, LandmarksConfig).parse_args(argv))
    if not args.manifest:
        ap.error("--manifest is required")
    manifest = Path(args.manifest)
    out = Path(args.out) if args.out else manifest.with_suffix(".faces.jsonl")
    try:
        n = precompute_landmarks(manifest, out, FaceDetector(args.face_models or None, threshold=args.threshold))
    except (FileNotFoundError, ValueError) as e:
        print(f"interop.scrfd: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({n} clips)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
