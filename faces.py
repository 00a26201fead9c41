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
"""
import os

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

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
    """Unit-norm ArcFace embeddings [N, 512] of the faces in RGB images [N, 3, H, W] in [-1, 1]
    with landmarks [N, 5, 2]. Outside the image reads black (-1), as in insightface."""
    return F.normalize(embedder(align_faces(images, landmarks, fill=-1.0)), dim=-1)


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
