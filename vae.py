"""A small causal video VAE (KL-regularised), from scratch.

Shapes: pixels x [B, 3, F, H, W] in [-1, 1]  <->  latents z [B, C, T, H/s, W/s].

Causality in time ("first frame alone, then groups of tau frames", as in LTX/CogVideoX VAEs):
F = 1 + tau*k pixel frames map to T = 1 + k latent frames, so a single image (F = 1) is exactly
one latent frame. Latent frame 0 sees only pixel frame 0; latent frame m >= 1 covers pixel frames
tau*(m-1)+1 .. tau*m and sees nothing later. Two pieces give this:

  * CausalConv3d pads time only on the past side, with copies of frame 0, so output frame t
    depends on input frames <= t. Norms act on each frame separately (FrameNorm).
  * A temporal downsample is a causal conv with time stride 2: 1 + 2k frames -> 1 + k, output m
    reading input frames 2m-2, 2m-1, 2m (frame 0 reads three copies of frame 0). Stacking
    log2(tau) of them gives the 1 + tau*k -> 1 + k rule. The decoder mirrors it: frame m is
    repeated into frames 2m-1, 2m (frame 0 stays alone) and then goes through a causal conv.

`encode` returns *normalised* latents (z - latent_mean) / latent_std and `decode` takes them;
the per-channel statistics are buffers saved with the weights. Set them after training with
`vae.set_latent_stats(*compute_latent_stats(vae, batches))`.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 16
    spatial: int = 4                # s: H, W -> H/s, W/s (power of 2)
    tau: int = 4                    # 1 + tau*k frames -> 1 + k latent frames (power of 2, or 1)
    width: int = 32                 # channels at full resolution
    channel_mult: tuple = (1, 2, 4)  # channels per level = width * mult; one entry per level + 1
    blocks: int = 1                 # residual blocks per (downsampled) level
    kl_weight: float = 1e-4         # total = recon (per-pixel L1) + kl_weight * kl (per-latent mean)

    def __post_init__(self):
        for name in ("spatial", "tau"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of 2 (or 1), got {value}")
        if len(self.channel_mult) != self.levels + 1:
            raise ValueError(f"channel_mult needs {self.levels + 1} entries (levels + 1) for "
                             f"spatial={self.spatial}, tau={self.tau}; got {self.channel_mult}")

    @property
    def levels(self) -> int:
        """Number of 2x downsampling stages: each halves space, time, or both."""
        return max(int(math.log2(self.spatial)), int(math.log2(self.tau)))


class CausalConv3d(nn.Module):
    """3D conv whose output frame t sees input frames <= t (time padded with copies of frame 0).

    Space is zero-padded by k//2, so stride 2 halves H and W. With time stride 2 (and kernel 3),
    1 + 2k frames become 1 + k: output m reads input frames 2m-2, 2m-1, 2m.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: tuple = (1, 1, 1)):
        super().__init__()
        self.time_pad = kernel - 1
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=(0, kernel // 2, kernel // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] == 1:  # a lone frame (an image) sees copies of itself: fold the time taps, 3x cheaper
            weight = self.conv.weight.sum(2, keepdim=True)
            return F.conv3d(x, weight, self.conv.bias, self.conv.stride, self.conv.padding)
        past = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
        return self.conv(torch.cat([past, x], dim=2))


class FrameNorm(nn.GroupNorm):
    """GroupNorm over (channels of a group, H, W) of each frame on its own: it never mixes time."""

    def __init__(self, channels: int):
        super().__init__(min(32, channels // 4), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        y = super().forward(x.transpose(1, 2).reshape(B * T, C, H, W))
        return y.reshape(B, T, C, H, W).transpose(1, 2)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1, self.conv1 = FrameNorm(channels), CausalConv3d(channels, channels)
        self.norm2, self.conv2 = FrameNorm(channels), CausalConv3d(channels, channels)
        nn.init.zeros_(self.conv2.conv.weight)  # start as the identity: trains faster
        nn.init.zeros_(self.conv2.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Upsample(nn.Module):
    """Nearest 2x upsample in time (frame m -> 2m-1, 2m; frame 0 stays alone) and/or space, then conv."""

    def __init__(self, cin: int, cout: int, temporal: bool, spatial: bool):
        super().__init__()
        self.temporal, self.spatial = temporal, spatial
        self.conv = CausalConv3d(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.temporal:
            x = x.repeat_interleave(2, dim=2)[:, :, 1:]
        if self.spatial:
            x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        return self.conv(x)


def _stage_factors(config: VAEConfig, level: int) -> tuple[bool, bool]:
    """(temporal, spatial): whether stage `level` halves time / space. Early stages do both."""
    return level < int(math.log2(config.tau)), level < int(math.log2(config.spatial))


def build_encoder(config: VAEConfig) -> nn.Sequential:
    """[B, 3, 1+tau*k, H, W] -> moments [B, 2C, 1+k, H/s, W/s] (mu and logvar stacked on channels)."""
    ch = [config.width * m for m in config.channel_mult]
    layers = [CausalConv3d(config.in_channels, ch[0])]
    for level in range(config.levels):
        temporal, spatial = _stage_factors(config, level)
        layers.append(CausalConv3d(ch[level], ch[level + 1], stride=(1 + temporal, 1 + spatial, 1 + spatial)))
        layers += [ResBlock(ch[level + 1]) for _ in range(config.blocks)]
    layers += [FrameNorm(ch[-1]), nn.SiLU(), CausalConv3d(ch[-1], 2 * config.latent_channels)]
    return nn.Sequential(*layers)


def build_decoder(config: VAEConfig) -> nn.Sequential:
    """Mirror of the encoder: [B, C, 1+k, h, w] -> [B, 3, 1+tau*k, h*s, w*s]."""
    ch = [config.width * m for m in config.channel_mult]
    layers = [CausalConv3d(config.latent_channels, ch[-1])]
    layers += [ResBlock(ch[-1]) for _ in range(config.blocks)]
    for level in reversed(range(config.levels)):
        layers.append(Upsample(ch[level + 1], ch[level], *_stage_factors(config, level)))
        if level > 0:  # like the encoder, no residual blocks at full resolution (the costly one)
            layers += [ResBlock(ch[level]) for _ in range(config.blocks)]
    layers += [FrameNorm(ch[0]), nn.SiLU(), CausalConv3d(ch[0], config.in_channels)]
    return nn.Sequential(*layers)


def _channel_view(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1, 1)


class CausalShapes:
    """Frame-count and shape checks of a causal video VAE (1 + tau k frames -> 1 + k latent frames,
    spatial factor s), shared by VideoVAE and ltx2.LTX2VAE; `self.config` has in_channels, tau, spatial."""

    def latent_frames(self, frames: int) -> int:
        """1 + tau*k pixel frames -> 1 + k latent frames; any other count raises ValueError."""
        tau = self.config.tau
        if frames < 1 or (frames - 1) % tau:
            valid = ", ".join(str(1 + tau * k) for k in range(5))
            raise ValueError(f"{type(self).__name__} with tau={tau} needs 1 + {tau}k frames ({valid}, ...); "
                             f"got {frames} frames")
        return 1 + (frames - 1) // tau

    def pixel_frames(self, latent_frames: int) -> int:
        if latent_frames < 1:
            raise ValueError(f"need at least 1 latent frame, got {latent_frames}")
        return 1 + self.config.tau * (latent_frames - 1)

    def _as_video(self, x: torch.Tensor) -> torch.Tensor:
        """Checks x and returns it as [B, 3, F, H, W] (an image [B, 3, H, W] becomes F = 1)."""
        if x.dim() == 4:
            x = x.unsqueeze(2)
        if x.dim() != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected [B, {self.config.in_channels}, F, H, W] or [B, {self.config.in_channels}, H, W], "
                             f"got {tuple(x.shape)}")
        self.latent_frames(x.shape[2])
        s = self.config.spatial
        if x.shape[3] % s or x.shape[4] % s:
            raise ValueError(f"{type(self).__name__} with spatial factor {s} needs H and W divisible by {s}; "
                             f"got {x.shape[3]}x{x.shape[4]}")
        return x

    def _as_latents(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"expected latents [B, {self.config.latent_channels}, T, h, w], got {tuple(z.shape)}")
        return z


class VideoVAE(CausalShapes, nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config)
        self.decoder = build_decoder(config)  # takes raw (unnormalised) latents
        self.register_buffer("latent_mean", torch.zeros(config.latent_channels))
        self.register_buffer("latent_std", torch.ones(config.latent_channels))

    def encode_dist(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw posterior (mu, logvar), each [B, C, 1+k, H/s, W/s]."""
        mu, logvar = self.encoder(self._as_video(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised latents (z - latent_mean) / latent_std, z = mu or a posterior sample."""
        mu, logvar = self.encode_dist(x)
        z = mu
        if sample:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + (0.5 * logvar).exp() * eps
        return (z - _channel_view(self.latent_mean)) / _channel_view(self.latent_std)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, T, h, w] -> pixels [B, 3, 1+tau*(T-1), h*s, w*s], roughly in [-1, 1]."""
        return self.decoder(self._as_latents(z) * _channel_view(self.latent_std) + _channel_view(self.latent_mean))

    def loss(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training losses on a clip or image batch: per-pixel L1 recon (a weighted mean with `weight`
        [B, 1, F, H, W], e.g. face_weight), per-latent-element KL, total."""
        x = self._as_video(x)
        mu, logvar = self.encode_dist(x)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        err = (self.decoder(z) - x).abs()
        recon = err.mean() if weight is None else (err * weight).sum() / weight.expand_as(err).sum()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        return {"recon": recon, "kl": kl, "total": recon + self.config.kl_weight * kl}

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)


def face_weight(landmarks: torch.Tensor, size: int, alpha: float, present: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel recon weight [B, 1, F, size, size]: 1 + alpha inside a square around each frame's
    five landmarks [B, F, 5, 2] (pixels; half-side 1.75x their larger span, eyes to mouth), 1
    elsewhere and in frames where `present` [B, F] is False. Spends the VAE's few latent numbers
    on the eyes, brows and mouth that carry identity, not only on the background."""
    centre = landmarks.mean(-2)  # [B, F, 2]
    half = 1.75 * (landmarks.amax(-2) - landmarks.amin(-2)).amax(-1)  # [B, F]
    pix = torch.arange(size, device=landmarks.device, dtype=landmarks.dtype) + 0.5
    dx = (pix - centre[..., 0, None]).abs() <= half[..., None]  # [B, F, W]
    dy = (pix - centre[..., 1, None]).abs() <= half[..., None]  # [B, F, H]
    inside = dy[..., :, None] & dx[..., None, :]
    if present is not None:
        inside = inside & present[..., None, None]
    return (1 + alpha * inside.to(landmarks.dtype))[:, None]


def latent_weight(weight: torch.Tensor, tau: int, s: int) -> torch.Tensor:
    """A pixel weight [B, 1, 1 + tau k, H, W] (e.g. face_weight) per latent token [B, 1, 1 + k, H/s, W/s]: the
    largest over the pixels the token encodes (latent frame 0 <- frame 0, frame m <- frames tau(m-1)+1 .. tau m)."""
    first = weight[:, :, :1].expand(-1, -1, tau - 1, -1, -1)  # causal: frame 0 alone, as the VAE pads it
    return F.max_pool3d(torch.cat([first, weight], 2), (tau, s, s))


@torch.no_grad()
def compute_latent_stats(vae: VideoVAE, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std [C] of the raw posterior means mu over all batches (x tensors)."""
    device = vae.latent_mean.device
    total = total_sq = 0.0
    count = 0
    for x in batches:
        mu, _ = vae.encode_dist(x.to(device))
        mu = mu.double().transpose(0, 1).reshape(mu.shape[1], -1)  # [C, B*T*h*w]
        total, total_sq, count = total + mu.sum(1), total_sq + mu.pow(2).sum(1), count + mu.shape[1]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(0.0).sqrt()
    return mean.float(), std.clamp_min(1e-6).float()  # a collapsed (constant) channel must not divide by 0
