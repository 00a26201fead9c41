"""LTX-2's video VAE (diffusers' AutoencoderKLLTX2Video) behind vae.VideoVAE's interface."""
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from vae import CausalShapes

# ----------------------------------------------------------------------------- the LTX-2 VAE

DOWNSAMPLE_FACTORS = {"conv": (2, 2), "spatial": (1, 2), "temporal": (2, 1), "spatiotemporal": (2, 2)}  # (time, space)


def vae_factors(config: Mapping) -> tuple[int, int]:
    """(tau, spatial) of an AutoencoderKLLTX2Video config, from its encoder blocks: patch sizes times
    the downsample of every scaling block (diffusers' default `*_compression_ratio` counts 2x in both
    time and space for every block, 64/16 for LTX-2's 32/8 unless the config sets them)."""
    scaling = config["spatio_temporal_scaling"]
    blocks = len(config["layers_per_block"]) - 1
    scaling = [scaling] * blocks if isinstance(scaling, bool) else list(scaling)
    tau, spatial = config["patch_size_t"], config["patch_size"]
    for on, kind in zip(scaling, config["downsample_type"]):
        if on:
            tau, spatial = tau * DOWNSAMPLE_FACTORS[kind][0], spatial * DOWNSAMPLE_FACTORS[kind][1]
    return tau, spatial


def normalise_latents(z, mean, std, scaling: float = 1.0):
    """(z - latents_mean) * scaling_factor / latents_std per channel (LTX2Pipeline._normalize_latents)."""
    return (z - mean.view(1, -1, 1, 1, 1).to(z)) * scaling / std.view(1, -1, 1, 1, 1).to(z)


def denormalise_latents(z, mean, std, scaling: float = 1.0):
    """The inverse: z * latents_std / scaling_factor + latents_mean (LTX2Pipeline._denormalize_latents)."""
    return z * std.view(1, -1, 1, 1, 1).to(z) / scaling + mean.view(1, -1, 1, 1, 1).to(z)


@dataclass
class LTX2VAEConfig:
    """An LTX2VAE's config: diffusers' AutoencoderKLLTX2Video config (rebuilds it) and VideoVAE's shape fields."""
    diffusers: dict
    in_channels: int = 3
    latent_channels: int = 128
    spatial: int = 32  # s: H, W -> H/s, W/s
    tau: int = 8  # 1 + tau k frames -> 1 + k latent frames
    kind: str = "ltx2"  # checkpoint.vae_from_config builds an LTX2VAE for this kind


class LTX2VAE(CausalShapes, nn.Module):
    """diffusers' AutoencoderKLLTX2Video behind VideoVAE's interface: encode -> normalised latents (the
    posterior mode, as LTX-2's pipelines encode images), decode <- them; the per-channel statistics
    are the checkpoint's `latents_mean` / `latents_std` buffers and config.scaling_factor."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        c = dict(vae.config)
        tau, spatial = vae_factors(c)
        for name, value, given in (("temporal", tau, c.get("temporal_compression_ratio")),
                                   ("spatial", spatial, c.get("spatial_compression_ratio"))):
            if given not in (None, value):
                raise ValueError(f"AutoencoderKLLTX2Video config says {name}_compression_ratio={given} but its "
                                 f"encoder blocks give {value}")
        self.config = LTX2VAEConfig({k: v for k, v in c.items() if not k.startswith("_")}, c["in_channels"],
                                    c["latent_channels"], spatial, tau)

    @classmethod
    def from_config(cls, cfg: Mapping) -> "LTX2VAE":
        """Rebuild (random weights) from an LTX2VAEConfig as a dict, e.g. a checkpoint's config.json."""
        from diffusers import AutoencoderKLLTX2Video
        return cls(AutoencoderKLLTX2Video.from_config(cfg["diffusers"]))

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels [B, 3, 1 + tau k, H, W] (or an image [B, 3, H, W]) in [-1, 1] -> [B, C, 1 + k, H/s, W/s]."""
        dist = self.vae.encode(self._as_video(x).to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return normalise_latents(z.float(), self.vae.latents_mean, self.vae.latents_std, self.vae.config.scaling_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, T, h, w] -> pixels [B, 3, 1 + tau (T - 1), h s, w s]."""
        z = denormalise_latents(self._as_latents(z), self.vae.latents_mean, self.vae.latents_std,
                                self.vae.config.scaling_factor).to(self.vae.dtype)
        # a timestep-conditioned decoder gets LTX2Pipeline's default decode_timestep 0 (and so no decode noise)
        temb = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype) if self.vae.config.timestep_conditioning else None
        return self.vae.decode(z, temb).sample.float()


def load_vae(path: str | os.PathLike) -> LTX2VAE:
    """A diffusers AutoencoderKLLTX2Video folder (or a pipeline folder: its vae/) -> LTX2VAE."""
    p = Path(path) if path else None
    if p is not None and (p / "vae" / "config.json").is_file():
        p = p / "vae"
    config = json.loads((p / "config.json").read_text()) if p is not None and (p / "config.json").is_file() else {}
    if config.get("_class_name") != "AutoencoderKLLTX2Video":
        raise FileNotFoundError(f"no LTX-2 VAE at {path or '(none given)'}: pass --vae <folder with "
                                f"AutoencoderKLLTX2Video's config.json and diffusion_pytorch_model.safetensors> "
                                f"(the vae/ folder of a diffusers LTX-2 pipeline)")
    from diffusers import AutoencoderKLLTX2Video
    return LTX2VAE(AutoencoderKLLTX2Video.from_pretrained(str(p)).eval())
