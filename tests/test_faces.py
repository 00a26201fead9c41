"""faces.py: alignment against independent references, the ONNX -> IResNet loader against
onnxruntime on random exports (BN kept and BN folded), insightface conventions end to end.

No real InsightFace weights exist here, so a real face is never detected: the detector test
runs insightface's own SCRFD code on a fake SCRFD-shaped ONNX model instead.
"""
import warnings

import cv2
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.utils.face_align import estimate_norm, norm_crop
from torch import nn

from faces import ARCFACE_TEMPLATE, align_faces, embed_faces, iresnet, similarity_transform
from interop.arcface_onnx import face_model_dir, find_arcface_onnx, load_arcface
from interop.scrfd import FaceDetector

TEMPLATE = np.array(ARCFACE_TEMPLATE)
pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")  # inside insightface


def export(model, path, **kwargs):
    """torch.onnx legacy (TorchScript) exporter: the default dynamo one needs onnxscript."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 112, 112),), str(path), opset_version=17, dynamo=False,
                          input_names=["input"], dynamic_axes={"input": {0: "batch"}}, **kwargs)
    return path


def similarity_matrix(scale, angle, shift):
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


def apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


# ----------------------------------------------------------------------------- alignment

def test_similarity_transform_matches_insightface_estimate_norm():
    rng = np.random.default_rng(0)
    truth = [similarity_matrix(rng.uniform(0.5, 3), rng.uniform(-3, 3), rng.uniform(-50, 200, 2)) for _ in range(4)]
    landmarks = np.stack([apply(m, TEMPLATE) for m in truth]) + rng.normal(0, 2, (4, 5, 2))  # not exactly similar
    ours = similarity_transform(torch.tensor(landmarks), TEMPLATE).numpy()
    for lm, m in zip(landmarks, ours):
        np.testing.assert_allclose(m, estimate_norm(lm.astype(np.float32)), rtol=1e-4, atol=1e-3)


def test_align_is_identity_when_landmarks_are_the_template():
    images = torch.rand(2, 3, 112, 112)
    crops = align_faces(images, torch.tensor(TEMPLATE).expand(2, 5, 2))
    torch.testing.assert_close(crops, images, atol=1e-4, rtol=0)


def smooth_face(u, v):
    """A smooth 3-channel pattern in crop (template) pixel coordinates."""
    return np.stack([np.sin(u / 4), np.cos(v / 5), np.sin((u + v) / 6)])


def test_align_recovers_content_under_a_known_similarity():
    crop_to_image = similarity_matrix(1.6, 0.35, (70.0, 50.0))  # the whole crop lands inside 260x300
    image_to_crop = np.linalg.inv(np.vstack([crop_to_image, [0, 0, 1]]))[:2]
    ys, xs = np.mgrid[0:300, 0:260].astype(np.float64)
    u, v = np.moveaxis(apply(image_to_crop, np.stack([xs, ys], -1)), -1, 0)
    image = smooth_face(u, v)  # [3, 300, 260]: the pattern seen through the similarity
    landmarks = apply(crop_to_image, TEMPLATE)

    crop = align_faces(torch.tensor(image)[None], torch.tensor(landmarks)[None])[0].numpy()

    cv, cu = np.mgrid[0:112, 0:112].astype(np.float64)
    np.testing.assert_allclose(crop, smooth_face(cu, cv), atol=0.015)  # analytic truth
    reference = norm_crop(image.transpose(1, 2, 0).astype(np.float32), landmarks.astype(np.float32))
    np.testing.assert_allclose(crop, reference.transpose(2, 0, 1), atol=0.01)  # insightface's cv2 crop


def test_align_gradients_reach_only_the_face_pixels():
    images = torch.rand(1, 3, 200, 200, requires_grad=True)
    landmarks = torch.tensor(apply(similarity_matrix(0.8, 0.2, (60.0, 50.0)), TEMPLATE), requires_grad=True)
    align_faces(images, landmarks[None]).square().sum().backward()
    assert images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    assert images.grad[..., 180:, 180:].abs().sum() == 0  # far from the face
    assert landmarks.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- IResNet + loader

def randomised_r18(seed=0):
    """r18 with random BN statistics/affines and PReLU slopes, so a misplaced tensor shows."""
    torch.manual_seed(seed)
    model = iresnet("r18")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(-0.3, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def r18_exports(tmp_path_factory):
    """The same random r18 exported with BN folded into the convs (torch's default eval
    export, like InsightFace's own files) and with every BN kept as its own node."""
    folder = tmp_path_factory.mktemp("arcface")
    model = randomised_r18()
    return model, {"folded": export(model, folder / "folded.onnx"),
                   "kept": export(model, folder / "kept.onnx", training=torch.onnx.TrainingMode.PRESERVE)}


def test_exports_cover_both_batchnorm_layouts(r18_exports):
    _, paths = r18_exports
    ops = {k: [n.op_type for n in onnx.load(str(p)).graph.node] for k, p in paths.items()}
    assert ops["folded"].count("BatchNormalization") == 8 + 2  # only the standalone ones
    assert ops["kept"].count("BatchNormalization") == ops["kept"].count("Conv") + 8 + 2


@pytest.mark.parametrize("layout", ["folded", "kept"])
def test_load_arcface_matches_onnxruntime(r18_exports, layout):
    model, paths = r18_exports
    loaded = load_arcface(paths[layout])
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1
    session = onnxruntime.InferenceSession(str(paths[layout]), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x.numpy()})[0]
    got = loaded(x).numpy()
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()
    assert isinstance(loaded.layer3[1], type(model.layer3[1])) and len(loaded.blocks()) == 8


def test_loaded_arcface_is_frozen_but_passes_gradients(r18_exports):
    loaded = load_arcface(r18_exports[1]["folded"])
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(1, 3, 112, 112, requires_grad=True)
    loaded(x).sum().backward()
    assert x.grad.abs().sum() > 0


def test_embed_faces_matches_insightface_arcface_pipeline(r18_exports):
    """Same embedding as insightface's ArcFaceONNX (norm_crop on BGR uint8, swapRB, 127.5)."""
    path = r18_exports[1]["folded"]
    rng = np.random.default_rng(2)
    rgb = cv2.resize(rng.uniform(0, 255, (12, 12, 3)).astype(np.float32), (200, 200), interpolation=cv2.INTER_CUBIC)
    rgb = rgb.clip(0, 255).round().astype(np.uint8)
    landmarks = apply(similarity_matrix(1.3, -0.2, (40.0, 45.0)), TEMPLATE) + rng.normal(0, 1, (5, 2))

    class Face:
        kps = landmarks.astype(np.float32)

    arcface = ArcFaceONNX(path, session=onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
    expected = F.normalize(torch.tensor(arcface.get(rgb[..., ::-1].copy(), Face())), dim=-1)
    image = torch.tensor(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
    got = embed_faces(load_arcface(path), image, landmarks[None])[0]
    swapped = embed_faces(load_arcface(path), image.flip(1), landmarks[None])[0]
    # A random net maps every input near one embedding, so compare distances, not cosines:
    # ours must be far closer to insightface's than the same pipeline fed BGR is.
    assert (got - expected).norm() < 0.02 * (swapped - expected).norm()


def test_iresnet_depths():
    r50 = iresnet("r50")
    assert [len(s) for s in (r50.layer1, r50.layer2, r50.layer3, r50.layer4)] == [3, 4, 14, 3]
    assert [b.downsample is not None for b in r50.layer3] == [True] + [False] * 13
    assert r50.eval()(torch.zeros(1, 3, 112, 112)).shape == (1, 512)
    with pytest.raises(ValueError, match="unknown IResNet"):
        iresnet("r7")


def test_load_arcface_rejects_other_graphs(tmp_path):
    relu_net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    with pytest.raises(ValueError, match=r"does not look like .*unexpected ops \['Relu'\]"):
        load_arcface(export(relu_net, tmp_path / "relu.onnx"))
    prelu_net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.PReLU(4)).eval()
    with pytest.raises(ValueError, match="does not look like .*3x3 convs"):
        load_arcface(export(prelu_net, tmp_path / "prelu.onnx"))


# ----------------------------------------------------------------------------- model files, detector

def test_missing_detector_names_where_to_put_the_pack(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        FaceDetector(model_dir=tmp_path)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "det_10g.onnx" in message and "STDRC_FACE_MODELS" in message


def test_model_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("STDRC_FACE_MODELS", raising=False)
    assert face_model_dir().endswith("/.insightface/models/buffalo_l")
    monkeypatch.setenv("STDRC_FACE_MODELS", str(tmp_path))
    assert face_model_dir() == str(tmp_path) and face_model_dir("/elsewhere") == "/elsewhere"
    with pytest.raises(FileNotFoundError, match="w600k_r50.onnx"):
        find_arcface_onnx()
    (tmp_path / "w600k_r50.onnx").touch()
    assert find_arcface_onnx() == str(tmp_path / "w600k_r50.onnx")


class FakeSCRFD(nn.Module):
    """SCRFD's output layout (strides 8/16/32, 2 anchors, scores/boxes/landmarks) scoring each
    anchor by how red its cell is in the network input (channel 0 = R after swapRB)."""

    def forward(self, x):
        scores = [torch.sigmoid(20 * (F.avg_pool2d(x[:, :1], s) - 0.5)).flatten().repeat_interleave(2)[:, None]
                  for s in (8, 16, 32)]
        boxes = [torch.ones_like(p).expand(-1, 4) for p in scores]  # anchor centre +- one stride
        landmarks = [torch.zeros_like(p).expand(-1, 10) for p in scores]  # all at the anchor centre
        return (*scores, *boxes, *landmarks)


def test_detector_wrapper_on_a_fake_scrfd(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(FakeSCRFD(), (torch.zeros(1, 3, 640, 640),), str(tmp_path / "det_10g.onnx"),
                          opset_version=17, dynamo=False)
    detector = FaceDetector(model_dir=tmp_path, providers=["CPUExecutionProvider"])
    image = np.zeros((320, 320, 3), np.uint8)
    image[100:180, 120:220, 0] = 255  # a red patch, RGB
    faces = detector.detect(image)
    assert faces and all(f[0].shape == (4,) and f[1].shape == (5, 2) and f[2] > 0.5 for f in faces)
    for box, landmarks, _ in faces:
        assert 100 <= (box[1] + box[3]) / 2 <= 180 and 120 <= (box[0] + box[2]) / 2 <= 220
        np.testing.assert_allclose(landmarks, np.tile([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], (5, 1)), atol=1e-3)
    as_tensor = detector.detect(torch.tensor(image).permute(2, 0, 1).float() / 127.5 - 1)
    assert len(as_tensor) == len(faces)
    assert detector.detect(image[..., ::-1].copy()) == []  # the same patch in blue: RGB order is honoured
