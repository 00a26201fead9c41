"""faces.py's identity model of the synthetic world: the ArcFace loss and the ROC figures
against hand and brute-force values, the bundled embedder and detector on held-out
identities, the training command end to end, and the manifest landmark precompute."""
from world import face_nets
from interop import scrfd
import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
import torch.nn.functional as F
from torch import nn

import data
import faces
from world.synth import TEST_ID_START, sample_faces
from tests.test_faces import FakeSCRFD, export, randomised_r18

HELD_OUT = range(TEST_ID_START, TEST_ID_START + 150)


@pytest.fixture(scope="module")
def embedder():
    return face_nets.load_embedder()


@pytest.fixture(scope="module")
def detector():
    return face_nets.load_synth_detector()


# ----------------------------------------------------------------------------- loss and figures

def test_arcface_loss_hand_value():
    """Two classes at 0 and 90 degrees, the embedding at 30 degrees from its class 0."""
    weight = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # norms must not matter
    embedding = 2 * torch.tensor([[math.cos(math.pi / 6), math.sin(math.pi / 6)]])
    s, m = 10.0, 0.5
    target, other = s * math.cos(math.pi / 6 + m), s * math.cos(math.pi / 3)
    expected = -math.log(math.exp(target) / (math.exp(target) + math.exp(other)))
    got = face_nets.arcface_loss(embedding, weight, torch.tensor([0]), s, m)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_arcface_loss_without_margin_is_scaled_cosine_softmax():
    g = torch.Generator().manual_seed(0)
    e, w, y = torch.randn(6, 8, generator=g), torch.randn(5, 8, generator=g), torch.randint(5, (6,), generator=g)
    expected = F.cross_entropy(30 * F.normalize(e) @ F.normalize(w).T, y)
    torch.testing.assert_close(face_nets.arcface_loss(e, w, y, 30.0, 0.0), expected)


def test_arcface_loss_grows_with_the_angle_even_past_pi_minus_m():
    angles = torch.linspace(0.01, math.pi - 0.01, 200, dtype=torch.float64)
    e = torch.stack([angles.cos(), angles.sin()], -1)
    weight = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    losses = torch.stack([face_nets.arcface_loss(x[None], weight, torch.tensor([0]), 2.0, 0.5) for x in e])
    assert (losses.diff() > 0).all()
    x = e[150:151].clone().requires_grad_(True)  # beyond pi - m: the fallback branch
    face_nets.arcface_loss(x, weight, torch.tensor([0]), 2.0, 0.5).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_roc_metrics_against_brute_force():
    g = torch.Generator().manual_seed(1)
    genuine = (torch.randn(300, generator=g) + 1.5).round(decimals=1)  # rounded: ties happen
    impostor = torch.randn(5000, generator=g).round(decimals=1)
    m = face_nets.roc_metrics(genuine, impostor, far=0.01)
    pairs = genuine[:, None] - impostor[None]
    assert m["roc_auc"] == pytest.approx(((pairs > 0).double() + 0.5 * (pairs == 0).double()).mean().item(), abs=1e-9)
    # the threshold lets through at most 1% of impostors and is the lowest that does
    tar = m["tar_at_far_0.01"]
    thresholds = torch.unique(impostor)
    admissible = [t for t in thresholds if (impostor > t).double().mean() <= 0.01]
    assert tar == pytest.approx((genuine > min(admissible)).double().mean().item())
    assert face_nets.roc_metrics(torch.ones(5), torch.zeros(50))["roc_auc"] == 1.0
    assert face_nets.roc_metrics(torch.zeros(5), torch.ones(50))["roc_auc"] == 0.0


# ----------------------------------------------------------------------------- embed_faces, loading

class CropRecorder(nn.Module):
    input_size = 20

    def forward(self, x):
        self.seen = x
        return x.flatten(1)


def test_embed_faces_aligns_to_the_embedders_input_size():
    faces_ = sample_faces([1, 2], 1, 64, seed=0)
    recorder = CropRecorder()
    e = faces.embed_faces(recorder, faces_["image"], faces_["landmarks"])
    expected = faces.align_faces(faces_["image"], faces_["landmarks"], size=20, fill=-1.0)
    torch.testing.assert_close(recorder.seen, expected)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    assert faces.IResNet.input_size == 112


def test_load_embedder_reads_an_insightface_onnx(tmp_path):
    model = face_nets.load_embedder(export(randomised_r18(), tmp_path / "w600k_r50.onnx"))
    assert isinstance(model, faces.IResNet) and model.input_size == 112 and not model.training


def test_missing_model_folder_says_how_to_train_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m world.face_nets --out .*nowhere"):
        face_nets.load_embedder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="detector.safetensors"):
        face_nets.load_synth_detector(tmp_path)


def test_face_detector_detect_batch_on_a_fake_scrfd(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(FakeSCRFD(), (torch.zeros(1, 3, 640, 640),), str(tmp_path / "det_10g.onnx"),
                          opset_version=17, dynamo=False)
    detector = scrfd.FaceDetector(model_dir=tmp_path, providers=["CPUExecutionProvider"])
    frames = -torch.ones(2, 3, 96, 96)
    frames[0, 0, 30:60, 40:70] = 1.0  # a red patch in the first frame only
    landmarks, score = detector.detect_batch(frames)
    assert landmarks.shape == (2, 5, 2) and score[0] > 0.5 and score[1] == 0
    assert 30 <= landmarks[0, :, 1].mean() <= 60 and 40 <= landmarks[0, :, 0].mean() <= 70


# ----------------------------------------------------------------------------- the bundled models

def test_bundled_embedder_is_frozen_and_passes_gradients(embedder):
    assert not embedder.training and not any(p.requires_grad for p in embedder.parameters())
    x = sample_faces([3], 1, 32, seed=0)
    image = x["image"].requires_grad_(True)
    faces.embed_faces(embedder, image, x["landmarks"]).sum().backward()
    assert image.grad.abs().sum() > 0


@pytest.mark.parametrize("size", [32, 64])
def test_bundled_embedder_verifies_held_out_identities(embedder, detector, size):
    truth = face_nets.verification(embedder, HELD_OUT, 3, size, seed=11)
    detected = face_nets.verification(embedder, HELD_OUT, 3, size, seed=11, detector=detector)
    assert truth["roc_auc"] > 0.97 and detected["roc_auc"] > 0.95, (truth, detected)
    assert truth["genuine_mean_cos"] > 0.6 and abs(truth["impostor_mean_cos"]) < 0.15


@pytest.mark.parametrize("size, max_error", [(32, 1.0), (64, 2.0)])
def test_bundled_detector_on_held_out_identities(detector, size, max_error):
    m = face_nets.landmark_metrics(detector, HELD_OUT, size, seed=12, clips=24)
    assert m[f"landmark_error_px_{size}"] < max_error and m[f"face_accuracy_{size}"] > 0.85, m
    # the misses are faces at the edge of the image (present: all 5 landmarks inside); away from it, none
    images, landmarks, present = face_nets.detector_batch(HELD_OUT, 24, 9, size, torch.Generator().manual_seed(12))
    inside = ((landmarks > 0.1 * size) & (landmarks < 0.9 * size)).all(-1).all(-1)
    outside = ~((landmarks > -0.2 * size) & (landmarks < 1.2 * size)).all(-1).any(-1)  # all off the image
    no_face = outside | (landmarks == 0).all(-1).all(-1)  # (bare backgrounds and noise have zeros)
    score = detector.detect_batch(images)[1]
    assert (score[inside] > 0.5).float().mean() > 0.98 and (score[no_face] < 0.5).float().mean() > 0.95


def test_bundled_metrics_are_the_claimed_ones():
    m = json.loads((face_nets.SYNTH_FACE_MODEL / "metrics.json").read_text())
    assert m["verification_32"]["roc_auc"] > 0.95 and m["verification_32"]["impostor_pairs"] > 10**6
    assert m["landmark_error_px_32"] < 1.0
    assert (face_nets.SYNTH_FACE_MODEL / "embedder.safetensors").stat().st_size < 4 * 2**20


def test_train_synth_end_to_end(tmp_path):
    cfg = face_nets.SynthTrainConfig(out=str(tmp_path / "fm"), ids=8, views=2, embed_steps=2, detect_steps=2, batch=16,
                                 test_ids=6, test_views=2, test_clips=2)
    metrics = face_nets.train_synth(cfg)
    assert 0 <= metrics["verification_32"]["roc_auc"] <= 1 and "landmark_error_px_64" in metrics
    embedder, detector = face_nets.load_embedder(cfg.out), face_nets.load_synth_detector(cfg.out)
    x = sample_faces([TEST_ID_START], 2, 32, seed=0)
    assert faces.embed_faces(embedder, x["image"], x["landmarks"]).shape == (2, cfg.dim)
    assert detector.detect_batch(x["image"])[0].shape == (2, 5, 2)


# ----------------------------------------------------------------------------- landmarks of a manifest

class RedSquareDetector:
    """FaceDetector's `detect` contract: the red square's centre as all 5 landmarks."""

    def detect(self, image):
        ys, xs = np.nonzero((image[..., 0] > 128) & (image[..., 2] < 128))
        if len(xs) == 0:
            return []
        centre = np.array([xs.mean(), ys.mean()], np.float32)
        return [(np.array([xs.min(), ys.min(), xs.max(), ys.max()]), np.tile(centre, (5, 1)), 0.9)]


def test_precompute_landmarks_writes_what_the_manifest_dataset_reads(tmp_path):
    video = -torch.ones(3, 6, 40, 60)
    for f in range(5):  # the last frame has no square
        video[0, f, 10:20, 8 * f:8 * f + 10] = 1.0
    data.save_video(tmp_path / "clips" / "a.gif", video, fps=6)
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": "clips/a.gif", "caption": "a square"}) + "\n")
    out = tmp_path / "sub" / "m.faces.jsonl"
    out.parent.mkdir()

    assert scrfd.precompute_landmarks(tmp_path / "m.jsonl", out, RedSquareDetector()) == 1
    line = json.loads(out.read_text())
    assert line["video"] == "../clips/a.gif" and line["faces"] == "../clips/a.gif.faces.npz"
    saved = np.load(tmp_path / "clips" / "a.gif.faces.npz")
    assert saved["landmarks"].shape == (6, 5, 2) and saved["present"].tolist() == [True] * 5 + [False]
    np.testing.assert_allclose(saved["landmarks"][:5, 0, 0], 8 * np.arange(5) + 4.5)

    ds = data.ManifestDataset(out, frames=5, size=40, fps=6.0, train=False)
    item = ds[0]
    assert item["face_present"].tolist() == [True] * 5
    torch.testing.assert_close(item["landmarks"][:, 0, 0], torch.tensor(8 * np.arange(5) + 4.5 - 10, dtype=torch.float32))


def test_precompute_landmarks_detects_the_references_too(tmp_path):
    """A line with a "reference" image: its landmarks go into the clip's .faces.npz; ManifestDataset maps them
    through the reference's own resize and crop; an in-clip reference takes its frame's landmarks."""
    video = -torch.ones(3, 6, 40, 60)
    video[0, :, 10:20, 30:40] = 1.0  # a square at the centre column 34.5 in every frame
    for f in range(6):  # frames that differ (Pillow merges equal GIF frames)
        video[1, f, 30, f] = 1.0
    for name in ("a", "b"):
        data.save_video(tmp_path / f"{name}.gif", video, fps=6)
    ref = -torch.ones(3, 80, 40)  # portrait: the crop keeps rows 20..59 of the 40-wide image
    ref[0, 30:40, 4:14] = 1.0  # centre (8.5, 34.5) -> (8.5, 14.5) in the crop
    Image.fromarray(data.to_uint8(ref)).save(tmp_path / "r.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": "a.gif", "caption": "x", "reference": "r.png"}) + "\n" +
                                      json.dumps({"video": "b.gif", "caption": "in clip"}) + "\n")
    assert scrfd.precompute_landmarks(tmp_path / "m.jsonl", tmp_path / "f.jsonl", RedSquareDetector()) == 2
    ds = data.ManifestDataset(tmp_path / "f.jsonl", frames=5, size=40, fps=6.0, train=False)
    batch = data.collate([ds[0], ds[1]])
    torch.testing.assert_close(batch["ref_landmarks"][0], torch.tensor([8.5, 14.5]).expand(5, 2))
    torch.testing.assert_close(batch["ref_landmarks"][1], torch.tensor([34.5 - 10, 14.5]).expand(5, 2))
    assert batch["ref_present"].tolist() == [True, True]


def test_landmarks_command_reports_a_missing_detector(tmp_path, capsys):
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": "a.gif", "caption": "x"}) + "\n")
    assert scrfd.main(["--manifest", str(tmp_path / "m.jsonl"), "--face-models", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "det_10g.onnx" in err and str(tmp_path) in err and not (tmp_path / "m.faces.jsonl").exists()
