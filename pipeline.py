"""The pipeline (VAE + text encoder + DiT), its presets, and generation with it (paper Sec. 3.1, 3.4).

One table, PRESETS, names every size: the DiT, the VAE and the text encoder of a preset and the
pixel size and frame count it is built for. `generate` is the paper's inference: encode the
reference to one latent frame, run the three-stream Euler sampler, decode.
"""
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn

from guidance import euler_sample, shift_for_tokens, three_stream_velocity, timesteps
from ltx2.vae import LTX2VAE
from model import DiT, DiTConfig, with_overrides
from text import EMPTY_PROMPT, TextConfig, TextEncoder, check_text_width, empty_embeds_path, load_prompt_embeds, text_pair
from vae import VAEConfig, VideoVAE


@dataclass(frozen=True)
class Preset:
    dit: DiTConfig
    vae: VAEConfig | None  # None: the VAE comes with the weights (LTX-2.3)
    text: TextConfig | None  # None: precomputed prompt embeddings (LTX-2.3)
    size: int  # pixel side of the square frames
    frames: int  # pixel frames, 1 + tau k


PRESETS = {
    "tiny": Preset(DiTConfig(in_channels=8, dim=64, depth=2, heads=2, text_dim=64),  # tests on CPU
                   VAEConfig(latent_channels=8, spatial=4, tau=4, width=16), TextConfig(dim=64, depth=1, heads=2), 32, 9),
    "demo": Preset(DiTConfig(in_channels=8, dim=128, depth=4, heads=4, text_dim=128),  # the bundled model, 2-core CPU
                   VAEConfig(latent_channels=8, spatial=4, tau=4, width=32), TextConfig(dim=128, depth=2, heads=4), 32, 9),
    "small": Preset(DiTConfig(in_channels=16, dim=384, depth=8, heads=6, text_dim=128),  # the world on one GPU
                    VAEConfig(latent_channels=16, spatial=4, tau=4, width=32, channel_mult=(1, 2, 3)),
                    TextConfig(dim=128, depth=2, heads=4), 64, 17),
    # LTX-2.3's video branch: 48 layers, 4096 wide, 32 heads of 128, 128 latent channels (ltx2/)
    "ltx2-video": Preset(DiTConfig(in_channels=128, dim=4096, depth=48, heads=32, text_dim=4096, gated_attention=True,
                                   cross_attention_adaln=True, caption_projection=False, rope="ltx2"),
                         None, None, 512, 121),
}


def preset_of(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


@dataclass
class Pipeline:
    vae: VideoVAE  # or ltx2.vae.LTX2VAE: the same interface
    text: TextEncoder | None  # None: the DiT takes precomputed prompt embeddings (LTX-2.3)
    dit: DiT
    size: int
    frames: int
    fps: float = 8.0
    shift_terminal: float = 0.0  # the sampler's last non-zero time (guidance.timesteps; LTX-2.3's scheduler: 0.1)
    width: int = 0  # frame width in pixels; 0: square frames (size x size)

    @property
    def hw(self) -> tuple[int, int]:
        """The frame (height, width) in pixels."""
        return self.size, self.width or self.size

    def with_frame(self, height: int = 0, width: int = 0) -> "Pipeline":
        """Frames of height x width pixels (0 keeps the pipeline's)."""
        self.size, self.width = height or self.size, width or self.width
        return self

    def modules(self) -> dict[str, nn.Module]:
        return {name: m for name, m in (("vae", self.vae), ("text", self.text), ("dit", self.dit)) if m is not None}

    def config(self) -> dict:
        return {"vae": asdict(self.vae.config), "text": None if self.text is None else asdict(self.text.config),
                "dit": asdict(self.dit.cfg), "size": self.size, "frames": self.frames, "fps": self.fps,
                "shift_terminal": self.shift_terminal, "width": self.width}

    def check(self) -> "Pipeline":
        """Raise ValueError unless frames and size fit the VAE (1 + tau k frames, height and width divisible by s)."""
        self.vae.latent_frames(self.frames)
        if any(side % self.vae.config.spatial for side in self.hw):
            raise ValueError(f"frame size {self.hw[0]}x{self.hw[1]} must be divisible by the VAE's spatial factor "
                             f"{self.vae.config.spatial}")
        return self

    def to(self, device) -> "Pipeline":
        for m in self.modules().values():
            m.to(device)
        return self


def _dataclass(cls, d: dict):
    known = {f.name for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


def build_pipeline(preset: str, latent_channels: int = 0, **dit_overrides) -> Pipeline:
    """A fresh pipeline of the preset; latent_channels > 0 widens (or narrows) the VAE's latent and with it
    the DiT's input."""
    p = preset_of(preset)
    if p.vae is None:
        raise ValueError(f"config {preset!r} has no VAE of this project's: build it from LTX-2.3 weights (--init)")
    vae_cfg = replace(p.vae, latent_channels=latent_channels) if latent_channels else p.vae
    text = TextEncoder(p.text)
    dit = DiT(with_overrides(p.dit, text_dim=p.text.dim, in_channels=vae_cfg.latent_channels, **dit_overrides))
    return Pipeline(VideoVAE(vae_cfg), text, dit, p.size, p.frames)


def vae_from_config(cfg: dict) -> nn.Module:
    """VideoVAE, or the LTX-2 VAE wrapper when the config says kind "ltx2"."""
    if cfg.get("kind") == "ltx2":
        return LTX2VAE.from_config(cfg)
    return VideoVAE(_dataclass(VAEConfig, cfg))


def pipeline_from_config(cfg: dict) -> Pipeline:
    """The pipeline a checkpoint's config describes, its DiT on the meta device (load_state(..., assign=True))."""
    text = None if cfg["text"] is None else TextEncoder(_dataclass(TextConfig, cfg["text"]))
    with torch.device("meta"):
        dit = DiT(_dataclass(DiTConfig, cfg["dit"]))
    return Pipeline(vae_from_config(cfg["vae"]), text, dit, cfg["size"], cfg["frames"], cfg.get("fps", 8.0),
                    cfg.get("shift_terminal", 0.0), cfg.get("width", 0))


def encode_text(pipe: Pipeline, prompt: str) -> tuple[torch.Tensor, ...]:
    """(y, y_mask, y_0, y_0_mask): the prompt and the empty prompt through the pipeline's text encoder."""
    if pipe.text is None:
        raise ValueError("this pipeline has no text encoder: pass --prompt-embeds (python -m ltx2 encode-prompts)")
    return (*pipe.text.encode([prompt]), *pipe.text.encode([EMPTY_PROMPT]))


def load_text(pipe: Pipeline, prompt_embeds: str, empty_embeds: str = "") -> tuple[torch.Tensor, ...]:
    """(y, y_mask, y_0, y_0_mask) from precomputed prompt embeddings and the empty prompt's."""
    prompt, empty = (load_prompt_embeds(p) for p in (prompt_embeds, empty_embeds_path(prompt_embeds, empty_embeds)))
    for emb, _ in (prompt, empty):
        check_text_width(emb, pipe.dit.cfg.text_dim)
    return text_pair(*prompt, *empty)


@torch.no_grad()
def denoise(dit: DiT, z: torch.Tensor, text: tuple, z_ref: torch.Tensor | None, s_y: float = 5.0, s_r: float = 7.5,
            steps: int = 30, s_stg: float = 0.0, stg_blocks=(), rescale: float = 0.0, terminal: float = 0.0,
            progress: bool = True) -> torch.Tensor:
    """Noise z [B, C, T, h, w] -> z_0: the Euler sampler on the shifted schedule (LTX-2's dynamic shift for T h w
    tokens, stretched to `terminal`), each step one batched forward of the guided streams (Sec. 3.4; STG and the
    guidance rescale: guidance.three_stream_velocity). text: (y, y_mask, y_0, y_0_mask)."""
    y, y_mask, y_0, y_0_mask = text
    T, h, w = z.shape[2:]

    def velocity(z_t, t):
        return three_stream_velocity(dit, z_t, t, y, y_mask, y_0, y_0_mask, z_ref, s_y, s_r, s_stg, stg_blocks, rescale)

    return euler_sample(velocity, z, timesteps(steps, shift_for_tokens(T * h * w), terminal), progress)


@torch.no_grad()
def generate(pipe: Pipeline, ref: torch.Tensor | None, prompt: str, s_y: float = 5.0, s_r: float = 7.5,
             steps: int = 30, seed: int = 0, progress: bool = True, text: tuple | None = None, s_stg: float = 0.0,
             stg_blocks=(), rescale: float = 0.0) -> torch.Tensor:
    """ref [3, H, W] in [-1, 1] (None: text only) -> video [3, F, H, W] in [-1, 1] (pipe.hw). `text`: precomputed
    (y, y_mask, y_0, y_0_mask) (load_text) in place of encoding `prompt` with the pipeline's encoder."""
    device = next(pipe.dit.parameters()).device
    for m in pipe.modules().values():
        m.eval()
    text = tuple(t.to(device) for t in (encode_text(pipe, prompt) if text is None else text))
    z_ref = None if ref is None else pipe.vae.encode(ref[None].to(device))[:, :, 0]  # z_ref = E_vae(I_ref), Sec. 3.1
    T = pipe.vae.latent_frames(pipe.frames)
    h, w = (side // pipe.vae.config.spatial for side in pipe.hw)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, pipe.dit.cfg.in_channels, T, h, w, generator=g).to(device)
    z_0 = denoise(pipe.dit, z, text, z_ref, s_y, s_r, steps, s_stg, stg_blocks, rescale, pipe.shift_terminal, progress)
    return pipe.vae.decode(z_0)[0]
