"""Faces for the identity loss (paper Sec. 3.3): align and embed.

The identity loss decodes the clean estimate, finds faces, warps each face onto the standard
112x112 ArcFace crop with a 5-point similarity transform and embeds it with a frozen ArcFace.
Detection is not differentiable and needs none: landmarks are constants. Alignment and
embedding are plain PyTorch, so gradients reach the decoded pixels.

- Alignment: least-squares similarity (landmarks -> ARCFACE_TEMPLATE) and `grid_sample`,
  the differentiable twin of insightface's `norm_crop` (skimage similarity + cv2.warpAffine).
- Embedding: the arcface_torch IResNet in PyTorch. Its weights are read from the ONNX file
  InsightFace ships (interop/arcface_onnx.py); detection with SCRFD is interop/scrfd.py; the
  synthetic world's own detector and embedder are world/face_nets.py.

Input convention of the embedder, from insightface's `model_zoo/arcface_onnx.py`: it calls
`cv2.dnn.blobFromImages(bgr_images, 1/127.5, size, (127.5,) * 3, swapRB=True)`, so the ONNX
input is RGB, NCHW, (pixel - 127.5) / 127.5, i.e. RGB in [-1, 1]: the range the VAE decodes
to. The output is the raw 512-d feature; compare with cosine similarity.
"""
import torch
import torch.nn.functional as F
from torch import nn

# Where the five landmarks (left eye, right eye, nose, left mouth, right mouth) of the
# 112x112 ArcFace crop sit, in pixel coordinates (pixel centres at integers, as cv2).
ARCFACE_TEMPLATE = [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                    [41.5493, 92.3655], [70.7299, 92.2041]]


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


def align_faces(images: torch.Tensor, landmarks, size: int | tuple[int, int] = 112, fill: float = 0.0,
                template=None) -> torch.Tensor:
    """Warp each image onto the ArcFace crop of its face: [N, C, H, W] -> [N, C, size, size] (or size = (h, w)).

    landmarks [N, 5, 2] are (x, y) pixel coordinates in `images`. Like insightface's
    `norm_crop`, the similarity is fitted landmarks -> template and inverted, every crop
    pixel centre is mapped back into the image and sampled bilinearly; outside the image
    reads `fill`. Differentiable in the images (and the landmarks). template: where the five
    landmarks go in the crop, [5, 2] pixels (default: ArcFace's, scaled to `size`).
    """
    n, _, h, w = images.shape
    landmarks = torch.as_tensor(landmarks, dtype=images.dtype, device=images.device)
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    if template is None:
        template = torch.tensor(ARCFACE_TEMPLATE) * (crop_w / 112)
    template = torch.as_tensor(template).to(images)
    crop_to_image = _invert_affine(similarity_transform(landmarks, template))  # [N, 2, 3]
    ys, xs = torch.meshgrid(torch.arange(crop_h, dtype=images.dtype, device=images.device),
                            torch.arange(crop_w, dtype=images.dtype, device=images.device), indexing="ij")
    crop_pixels = torch.stack([xs, ys, torch.ones_like(xs)], -1)  # [size, size, 3] as (x, y, 1)
    image_pixels = torch.einsum("nij,yxj->nyxi", crop_to_image, crop_pixels)  # [N, size, size, 2]
    # grid_sample, align_corners=False: pixel i of an axis of length L sits at (i + 0.5) / L * 2 - 1
    image_size = torch.tensor([w, h], dtype=images.dtype, device=images.device)
    grid = (image_pixels + 0.5) / image_size * 2 - 1
    crops = F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return crops + fill


def face_scale(landmarks: torch.Tensor) -> torch.Tensor:
    """The size of faces [..., 5, 2]: the root-mean-square distance of their landmarks from their centre."""
    return (landmarks - landmarks.mean(-2, keepdim=True)).pow(2).sum(-1).mean(-1).sqrt()


def crop_face(image: torch.Tensor, faces: torch.Tensor, framing: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A photo's largest face as a reference: image [3, H, W] in [-1, 1], faces [K, 5, 2] the landmarks of every
    face found (pixels) -> [3, h, w] (size), the largest face (face_scale) aligned so that its landmarks land on
    `framing` [5, 2] (pixel centres as fractions of the side: (x + 0.5) / side) in the centred min(h, w) square;
    outside the photo reads white."""
    h, w = size
    side = min(h, w)
    template = framing * side - 0.5 + torch.tensor([(w - side) / 2, (h - side) / 2])
    largest = faces[face_scale(faces).argmax()]
    return align_faces(image[None], largest[None], (h, w), fill=1.0, template=template)[0]


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


def embed_faces(embedder: nn.Module, images: torch.Tensor, landmarks) -> torch.Tensor:
    """Unit-norm embeddings [N, D] of the faces in RGB images [N, 3, H, W] in [-1, 1] with
    landmarks [N, 5, 2]: each face is aligned onto the ArcFace template scaled to the
    embedder's `input_size` (112 for IResNet). Outside the image reads black (-1), as in
    insightface."""
    crops = align_faces(images, landmarks, size=embedder.input_size, fill=-1.0)
    return F.normalize(embedder(crops), dim=-1)
