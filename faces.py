"""Faces for the identity loss (paper Sec. 3.3): detect, align, embed.

The identity loss decodes the clean estimate, finds faces, warps each face onto the standard
112x112 ArcFace crop with a 5-point similarity transform and embeds it with a frozen ArcFace.
Detection is not differentiable and needs none: landmarks are constants. Alignment and
embedding are plain PyTorch, so gradients reach the decoded pixels.

- Detection: InsightFace SCRFD (`det_10g.onnx` of the buffalo_l pack) through onnxruntime.
- Alignment: least-squares similarity (landmarks -> ARCFACE_TEMPLATE) and `grid_sample`,
  the differentiable twin of insightface's `norm_crop` (skimage similarity + cv2.warpAffine).
- Embedding: the arcface_torch IResNet rebuilt in PyTorch, weights read from the ONNX file
  InsightFace ships (`w600k_r50.onnx`), so no PyTorch checkpoint is needed.

Input convention of the embedder, from insightface's `model_zoo/arcface_onnx.py`: it calls
`cv2.dnn.blobFromImages(bgr_images, 1/127.5, size, (127.5,) * 3, swapRB=True)`, so the ONNX
input is RGB, NCHW, (pixel - 127.5) / 127.5, i.e. RGB in [-1, 1]: the range the VAE decodes
to. (Old MXNet-converted models normalise inside the graph and use mean 0, std 1; this
module refuses them.) The output is the raw 512-d feature; compare with cosine similarity.

Model files are looked for in `model_dir`, else $STDRC_FACE_MODELS, else
~/.insightface/models/buffalo_l. Nothing is ever downloaded.

The synthetic world (synth.py) has its own identity model, bundled in assets/face_model:
`SynthFaceNet`, an embedder trained with the ArcFace loss on training identities, and
`SynthFaceDetector`, one face's 5 landmarks and a face-present score per frame. Any embedder
has an `input_size`; `embed_faces` aligns to it. `load_embedder` reads either kind.

    OMP_NUM_THREADS=1 python faces.py train-synth --out assets/face_model   # both nets + metrics.json
    python faces.py landmarks --manifest clips.jsonl   # SCRFD landmarks of real clips -> clips.faces.jsonl
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from safetensors.torch import load_file, save_file
from torch import nn

from cli import add_flags, config_from, flag
from data import augment_reference, read_frames
from synth import (ACTIONS, SCENES, TEST_ID_START, identity_params, landmarks_and_boxes, render, render_backgrounds,
                   render_clips, sample_faces)

# Where the five landmarks (left eye, right eye, nose, left mouth, right mouth) of the
# 112x112 ArcFace crop sit, in pixel coordinates (pixel centres at integers, as cv2).
ARCFACE_TEMPLATE = [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                    [41.5493, 92.3655], [70.7299, 92.2041]]

DEFAULT_MODEL_DIR = "~/.insightface/models/buffalo_l"
DETECTOR_FILES = ("det_10g.onnx", "scrfd_10g_bnkps.onnx")  # buffalo_l, antelopev2
ARCFACE_FILES = ("w600k_r50.onnx", "glintr100.onnx")  # buffalo_l, antelopev2


# ----------------------------------------------------------------------------- alignment

def similarity_transform(src: torch.Tensor, dst) -> torch.Tensor:
    """Least-squares similarity (scale, rotation, translation; no reflection) taking the
    points `src` [N, K, 2] onto `dst` [K, 2]: [N, 2, 3] matrices M with M @ [x, y, 1] ~ dst.

    Closed form (Umeyama in 2D): with both point sets centred, the linear part is
    [[a, -b], [b, a]], a = sum(x x' + y y') / var, b = sum(x y' - y x') / var,
    var = sum(x^2 + y^2) over the source; then t = mean(dst) - R mean(src).
    """
    dst = torch.as_tensor(dst, dtype=src.dtype, device=src.device)
    src_mean, dst_mean = src.mean(-2, keepdim=True), dst.mean(-2, keepdim=True)
    s, d = src - src_mean, dst - dst_mean
    var = s.pow(2).sum((-2, -1))
    a = (s * d).sum((-2, -1)) / var
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(-1) / var
    linear = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)  # [N, 2, 2]
    shift = dst_mean.transpose(-2, -1) - linear @ src_mean.transpose(-2, -1)  # [N, 2, 1]
    return torch.cat([linear, shift], -1)


def _invert_affine(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of [N, 2, 3] affine maps."""
    linear_inv = torch.linalg.inv(matrix[..., :2])
    return torch.cat([linear_inv, -linear_inv @ matrix[..., 2:]], -1)


def align_faces(images: torch.Tensor, landmarks, size: int = 112, fill: float = 0.0) -> torch.Tensor:
    """Warp each image onto the ArcFace crop of its face: [N, C, H, W] -> [N, C, size, size].

    landmarks [N, 5, 2] are (x, y) pixel coordinates in `images`. Like insightface's
    `norm_crop`, the similarity is fitted landmarks -> template and inverted, every crop
    pixel centre is mapped back into the image and sampled bilinearly; outside the image
    reads `fill`. Differentiable in the images (and the landmarks).
    """
    n, _, h, w = images.shape
    landmarks = torch.as_tensor(landmarks, dtype=images.dtype, device=images.device)
    template = torch.tensor(ARCFACE_TEMPLATE, dtype=images.dtype, device=images.device) * (size / 112)
    crop_to_image = _invert_affine(similarity_transform(landmarks, template))  # [N, 2, 3]
    ys, xs = torch.meshgrid(torch.arange(size, dtype=images.dtype, device=images.device),
                            torch.arange(size, dtype=images.dtype, device=images.device), indexing="ij")
    crop_pixels = torch.stack([xs, ys, torch.ones_like(xs)], -1)  # [size, size, 3] as (x, y, 1)
    image_pixels = torch.einsum("nij,yxj->nyxi", crop_to_image, crop_pixels)  # [N, size, size, 2]
    # grid_sample, align_corners=False: pixel i of an axis of length L sits at (i + 0.5) / L * 2 - 1
    image_size = torch.tensor([w, h], dtype=images.dtype, device=images.device)
    grid = (image_pixels + 0.5) / image_size * 2 - 1
    crops = F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return crops + fill


# ----------------------------------------------------------------------------- ArcFace IResNet

IRESNET_LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}


class IBasicBlock(nn.Module):
    """arcface_torch's pre-activation block: BN, conv3x3, BN, PReLU, conv3x3 (strided), BN, + skip."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes, eps=1e-5))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """arcface_torch IResNet (same module names, so its state_dicts load): RGB [B, 3, 112, 112]
    in [-1, 1] -> raw 512-d embedding (not normalised)."""

    input_size = 112  # side of the aligned crop it embeds (see embed_faces)

    def __init__(self, layers, num_features: int = 512, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stage = [IBasicBlock(inplanes, planes, stride=2)] + [IBasicBlock(planes, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def blocks(self) -> list[IBasicBlock]:
        return [block for stage in (self.layer1, self.layer2, self.layer3, self.layer4) for block in stage]

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet(name: str) -> IResNet:
    """IResNet by arcface_torch name: 'r18', 'r34', 'r50' or 'r100'."""
    if name not in IRESNET_LAYERS:
        raise ValueError(f"unknown IResNet {name!r}; expected one of {sorted(IRESNET_LAYERS)}")
    return IResNet(IRESNET_LAYERS[name])


# ----------------------------------------------------------------------------- ONNX -> IResNet

# Ops an arcface_torch export may contain (Identity/Constant/Unsqueeze/Reshape carry weights,
# Shape/Gather/Concat build Reshape targets). Anything else, e.g. the Sub/Mul input
# normalisation of MXNet models or ReLU networks, is not this architecture.
_IRESNET_OPS = {"Conv", "BatchNormalization", "PRelu", "Add", "Flatten", "Gemm",
                "Identity", "Constant", "Unsqueeze", "Reshape", "Shape", "Gather", "Concat"}
_PASSTHROUGH_OPS = {"Identity", "Unsqueeze", "Reshape"}  # their first input is the data


class _Graph:
    """Just enough of an ONNX graph to read weights: constants, producers, consumers."""

    def __init__(self, graph: onnx.GraphProto):
        self.nodes = list(graph.node)  # ONNX stores nodes in topological order
        self.constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant":
                value = onnx.helper.get_attribute_value(node.attribute[0])
                is_tensor = isinstance(value, onnx.TensorProto)
                self.constants[node.output[0]] = numpy_helper.to_array(value) if is_tensor else np.asarray(value)
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.consumers = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def value(self, name: str) -> np.ndarray:
        """The constant array behind a node input, looking through Identity/Unsqueeze/Reshape."""
        while name not in self.constants:
            node = self.producer.get(name)
            if node is None or node.op_type not in _PASSTHROUGH_OPS:
                raise ValueError(f"ONNX input {name!r} is not a constant weight")
            name = node.input[0]
        return self.constants[name]

    def attribute(self, node, name: str, default):
        for attr in node.attribute:
            if attr.name == name:
                return onnx.helper.get_attribute_value(attr)
        return default

    def source_op(self, name: str) -> str:
        """op_type of the node producing `name`, looking through Identity."""
        node = self.producer.get(name)
        while node is not None and node.op_type == "Identity":
            node = self.producer.get(node.input[0])
        return "input" if node is None else node.op_type

    def batchnorm_after(self, conv):
        """The BatchNormalization reading this Conv's output, or None when it was folded in."""
        return next((n for n in self.consumers.get(conv.output[0], []) if n.op_type == "BatchNormalization"), None)


def _copy(param: torch.Tensor, array: np.ndarray, what: str):
    if array.shape != tuple(param.shape) and np.squeeze(array).shape != tuple(param.shape):
        raise ValueError(f"{what}: ONNX shape {array.shape} does not fit {tuple(param.shape)}")
    param.copy_(torch.from_numpy(np.array(array, dtype=np.float32)).reshape(param.shape))


def _load_batchnorm(bn: nn.Module, g: _Graph, node, conv_bias=None, what: str = "BN"):
    """BN <- ONNX BatchNormalization `node`; node None means an identity BN (the ONNX folded
    it into the conv). A conv bias (which the torch conv lacks) is absorbed as mean -= bias."""
    if node is None:
        bn.eps = 0.0
        bn.weight.fill_(1.0)
        bn.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
    else:
        bn.eps = float(g.attribute(node, "epsilon", 1e-5))
        for param, name in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), node.input[1:5]):
            _copy(param, g.value(name), what)
    if conv_bias is not None:
        bn.running_mean.sub_(torch.from_numpy(conv_bias.astype(np.float32)))


def _load_conv(conv: nn.Conv2d, bn: nn.Module, g: _Graph, node, what: str):
    """conv + its BN <- ONNX Conv `node` (+ the BatchNormalization after it, if kept)."""
    if tuple(g.attribute(node, "strides", [1, 1])) != conv.stride:
        raise ValueError(f"{what}: ONNX stride {g.attribute(node, 'strides', [1, 1])} != {conv.stride}")
    _copy(conv.weight, g.value(node.input[1]), what)
    bias = g.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    _load_batchnorm(bn, g, g.batchnorm_after(node), bias, what)


def _not_iresnet(path, why: str):
    return ValueError(f"{path} does not look like an arcface_torch IResNet ONNX export: {why}")


@torch.no_grad()
def load_arcface(onnx_path) -> IResNet:
    """Frozen IResNet (eval mode, no parameter gradients; gradients still flow to the input)
    with the weights of an InsightFace ArcFace ONNX file (e.g. buffalo_l's w600k_r50.onnx).

    arcface_torch exports differ in whether BatchNorm after a conv was folded into it (the
    default torch.onnx eval export, and InsightFace's files, fold it: Conv with bias). So the
    graph is read by role, never by tensor name: 3x3 convs (stem, then two per block), 1x1
    downsample convs, standalone BNs (each block's bn1, then bn2, then features), PRelus and
    the Gemm. Each role is a chain of data dependencies, so any topological order lists it in
    execution order. The depth (r18/r34/r50/r100) follows from the number of 3x3 convs.
    Note: a parent module's .train() would switch this model's BN to batch statistics; keep it
    out of trained modules or call .eval() again.
    """
    g = _Graph(onnx.load(str(onnx_path)).graph)
    unexpected = {n.op_type for n in g.nodes} - _IRESNET_OPS
    if unexpected:
        raise _not_iresnet(onnx_path, f"unexpected ops {sorted(unexpected)}")
    convs = [n for n in g.nodes if n.op_type == "Conv"]
    main_convs = [n for n in convs if g.value(n.input[1]).shape[-1] == 3]
    down_convs = [n for n in convs if g.value(n.input[1]).shape[-1] == 1]
    standalone_bns = [n for n in g.nodes if n.op_type == "BatchNormalization" and g.source_op(n.input[0]) != "Conv"]
    prelus = [n for n in g.nodes if n.op_type == "PRelu"]
    gemms = [n for n in g.nodes if n.op_type == "Gemm"]

    n_blocks = (len(main_convs) - 1) // 2
    name = next((k for k, v in IRESNET_LAYERS.items() if sum(v) == n_blocks), None)
    if name is None or len(main_convs) != 2 * n_blocks + 1:
        raise _not_iresnet(onnx_path, f"{len(main_convs)} 3x3 convs fit none of {sorted(IRESNET_LAYERS)}")
    counts = (len(down_convs), len(prelus), len(standalone_bns), len(gemms))
    if counts != (4, n_blocks + 1, n_blocks + 2, 1):
        raise _not_iresnet(onnx_path, f"(1x1 convs, PRelus, standalone BNs, Gemms) = {counts}, "
                                      f"{name} needs {(4, n_blocks + 1, n_blocks + 2, 1)}")

    model = iresnet(name)
    blocks = model.blocks()
    main_pairs = [(model.conv1, model.bn1)] + [p for b in blocks for p in ((b.conv1, b.bn2), (b.conv2, b.bn3))]
    down_pairs = [(b.downsample[0], b.downsample[1]) for b in blocks if b.downsample is not None]
    for i, ((conv, bn), node) in enumerate(zip(main_pairs + down_pairs, main_convs + down_convs)):
        _load_conv(conv, bn, g, node, f"conv #{i} ({node.name})")
    for bn, node in zip([b.bn1 for b in blocks] + [model.bn2, model.features], standalone_bns):
        _load_batchnorm(bn, g, node, what=f"BN {node.name}")
    for prelu, node in zip([model.prelu] + [b.prelu for b in blocks], prelus):
        _copy(prelu.weight, g.value(node.input[1]), f"PRelu {node.name}")
    fc_weight = g.value(gemms[0].input[1])
    _copy(model.fc.weight, fc_weight if g.attribute(gemms[0], "transB", 0) else fc_weight.T, "fc weight")
    _copy(model.fc.bias, g.value(gemms[0].input[2]), "fc bias")
    return model.eval().requires_grad_(False)


def embed_faces(embedder: nn.Module, images: torch.Tensor, landmarks) -> torch.Tensor:
    """Unit-norm embeddings [N, D] of the faces in RGB images [N, 3, H, W] in [-1, 1] with
    landmarks [N, 5, 2]: each face is aligned onto the ArcFace template scaled to the
    embedder's `input_size` (112 for IResNet). Outside the image reads black (-1), as in
    insightface."""
    crops = align_faces(images, landmarks, size=embedder.input_size, fill=-1.0)
    return F.normalize(embedder(crops), dim=-1)


# ----------------------------------------------------------------------------- model files, detector

def face_model_dir(model_dir=None) -> str:
    """`model_dir`, else $STDRC_FACE_MODELS, else ~/.insightface/models/buffalo_l."""
    return os.path.expanduser(model_dir or os.environ.get("STDRC_FACE_MODELS") or DEFAULT_MODEL_DIR)


def _find_model(model_dir, names, what: str) -> str:
    directory = face_model_dir(model_dir)
    for name in names:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise FileNotFoundError(
        f"InsightFace {what} not found: put the buffalo_l pack ({names[0]}) in {directory} "
        f"or set STDRC_FACE_MODELS / --face-models to the folder that holds it")


def find_arcface_onnx(model_dir=None) -> str:
    """Path of the pack's ArcFace recognition model (w600k_r50.onnx, or antelopev2's glintr100.onnx)."""
    return _find_model(model_dir, ARCFACE_FILES, "ArcFace model")


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


# ----------------------------------------------------------------------------- the synthetic world's face models
#
# No pretrained face model can be downloaded here, and ArcFace would not know cartoon faces
# anyway, so the synthetic world (synth.py) brings its own: an embedder trained with the
# ArcFace loss on training identities (ArcFace's role in L_id and in FaceSim), and a detector
# that finds the face and its 5 landmarks in generated frames, where no ground truth exists.

SYNTH_FACE_MODEL = Path(__file__).resolve().parent / "assets" / "face_model"


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
    model.load_state_dict(load_file(str(folder / f"{name}.safetensors")))
    return model.eval().requires_grad_(False)


TRAIN_SYNTH = "OMP_NUM_THREADS=1 python faces.py train-synth --out {folder}"


def load_embedder(path=SYNTH_FACE_MODEL) -> nn.Module:
    """Frozen face embedder for embed_faces (eval mode, no parameter gradients; gradients
    still reach the input): an InsightFace recognition .onnx file (see load_arcface) or a
    folder written by `faces.py train-synth` (default: the bundled assets/face_model)."""
    if str(path).endswith(".onnx"):
        return load_arcface(path)
    return load_model(path, "embedder", lambda c: SynthFaceNet(SynthNetConfig(**c)), TRAIN_SYNTH)


def load_synth_detector(path=SYNTH_FACE_MODEL) -> SynthFaceDetector:
    """Frozen SynthFaceDetector from a folder written by `faces.py train-synth`."""
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
    return {f"landmark_error_px_{size}": error, f"face_accuracy_{size}": ((score > 0.5) == present).float().mean().item()}


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


# ----------------------------------------------------------------------------- landmarks of a manifest

def precompute_landmarks(manifest, out_manifest, detector) -> int:
    """Detect the best face in every source frame of every clip of a JSONL manifest (see
    data.ManifestDataset); write `<video>.faces.npz` beside each video with `landmarks`
    [F_src, 5, 2] (source pixels, 0 where none) and `present` [F_src], and `out_manifest`:
    the same lines with "faces" added (paths relative to the new manifest's folder).
    `detector` has FaceDetector's `detect(uint8 HxWx3 RGB)`. Returns the number of clips."""
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
        landmarks, present = np.zeros((len(frames), 5, 2), np.float32), np.zeros(len(frames), bool)
        for f, frame in enumerate(frames):
            faces = detector.detect(frame)
            if faces:
                landmarks[f], present[f] = faces[0][1], True
        npz = video.with_name(video.name + ".faces.npz")
        np.savez(npz, landmarks=landmarks, present=present)
        item["faces"] = os.path.relpath(npz, out_manifest.parent)
        lines.append(json.dumps(item))
        print(f"{video}: a face in {present.sum()}/{len(frames)} frames", flush=True)
    out_manifest.write_text("\n".join(lines) + "\n")
    return len(lines)


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Face models: train the synthetic world's, or detect the landmarks of a manifest.")
    sub = ap.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train-synth", help="train the synthetic world's face embedder and detector "
                                               "(OMP_NUM_THREADS=1 python faces.py train-synth --out assets/face_model)")
    add_flags(train, SynthTrainConfig)
    marks = sub.add_parser("landmarks", help="detect 5 landmarks in every frame of a manifest's videos (InsightFace SCRFD)")
    marks.add_argument("--manifest", required=True, help="JSONL manifest ({\"video\", \"caption\"} a line)")
    marks.add_argument("--out", default=None, help="manifest to write (default: MANIFEST with .faces.jsonl)")
    marks.add_argument("--face-models", default=None, help="folder of the buffalo_l pack (det_10g.onnx)")
    marks.add_argument("--threshold", type=float, default=0.5, help="detection score threshold")
    args = ap.parse_args(argv)

    if args.command == "train-synth":
        metrics = train_synth(config_from(SynthTrainConfig, args))
        print(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=2))
        return 0
    manifest = Path(args.manifest)
    out = Path(args.out) if args.out else manifest.with_suffix(".faces.jsonl")
    try:
        n = precompute_landmarks(manifest, out, FaceDetector(args.face_models, threshold=args.threshold))
    except (FileNotFoundError, ValueError) as e:
        print(f"faces.py: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({n} clips)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
