"""InsightFace's ArcFace ONNX file -> faces.IResNet (weights only; nothing is downloaded).

Model files are looked for in `model_dir`, else $STDRC_FACE_MODELS, else
~/.insightface/models/buffalo_l. (Old MXNet-converted models normalise inside the graph and use
mean 0, std 1; this module refuses them.) Needs the `faces` extra (onnx).
"""
import os

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from faces import IRESNET_LAYERS, IResNet, iresnet

DEFAULT_MODEL_DIR = "~/.insightface/models/buffalo_l"
DETECTOR_FILES = ("det_10g.onnx", "scrfd_10g_bnkps.onnx")  # buffalo_l, antelopev2
ARCFACE_FILES = ("w600k_r50.onnx", "glintr100.onnx")  # buffalo_l, antelopev2


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
