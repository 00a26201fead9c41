"""LTX-2.3's video branch in model.py: checkpoint conversion, the LTX-2 VAE, prompt embeddings, a memory plan.

`load_ltx2(path)` reads an LTX-2.3 transformer checkpoint (safetensors, diffusers' key layout or the
official single-file one; one file or diffusers' shards) into `DiT(CONFIGS["ltx2-video"])`. The model
is built on the meta device and each parameter is assigned its tensor memory-mapped from the file
(read where used), so a 48-layer checkpoint never needs two copies in memory; the audio branch is
never read. `build_pipeline` puts it in the project's Pipeline (train.py --config ltx2 --init,
sample.py --ckpt): the DiT from a diffusers folder (config.json + diffusion_pytorch_model*.safetensors,
or a whole pipeline folder: its transformer/ and vae/) or one .safetensors file (then the full
ltx2-video shape and the "split" RoPE layout); `LTX2VAE` wraps diffusers' AutoencoderKLLTX2Video
behind VideoVAE's interface; no text encoder: the DiT reads precomputed prompt embeddings.

Prompt embeddings (`python ltx2.py encode-prompts --manifest m.jsonl --gemma PATH`): each distinct
caption goes through LTX-2.3's prompt encoding as diffusers' LTX2Pipeline runs it (Gemma 3 hidden
states of every layer -> the video text connector), written as text.load_prompt_embeds reads it,
plus the empty prompt's (text.EMPTY_EMBEDS), and a copy of the manifest with "prompt_embeds" fields.
PATH is a local diffusers LTX-2.3 pipeline folder (model_index.json, text_encoder/, tokenizer/,
connectors/); the `transformers` package runs Gemma.

Key map: the table in README.md ("LTX-2.3 scale"); in code, OFFICIAL_RENAMES, TOP_LEVEL and
IN_BLOCK_RENAMES below.

RoPE layout: model.py rotates each head's channels in the rotate-half ("split") layout. A checkpoint
trained with the "interleaved" layout (pairs (2m, 2m+1)) is converted by permuting each head's
channels of attn1's `to_q`, `to_k`, `norm_q`, `norm_k` to (even..., odd...): q and k move together,
so every q.k — hence the attention — is unchanged (the qk-RMSNorm spans all heads and is
permutation invariant).

Memory plan (`python ltx2.py memory-plan`): full fine-tuning of ltx2-video as train.py runs it with
--fsdp (FSDP2, fp32 master weights sharded over the GPUs, bf16 compute, fp32 gradient reduction,
gradient checkpointing per block). Per GPU, for N GPUs and a micro-batch of b = ceil(batch / N):
parameters 4P/N + the bf16 copy of two gathered blocks (current + prefetched), gradients 4P/N,
AdamW moments 8P/N, the EMA 4P/N (sharded like the weights; --ema 0: none); activations b x (depth
block inputs of n x dim in bf16 + one block's recompute, ~34 n dim bytes: Korthikanti et al.'s
per-layer count without attention scores, which flash attention never stores), n = video tokens +
reference tokens. Buffers, the VAE (frozen, encodes up front) and
allocator fragmentation are not counted: keep ~10 % headroom.

    python ltx2.py memory-plan [--frames 121 --height 512 --width 768 --batch 32]
"""
import argparse
import contextlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from model import CONFIGS, DiT, DiTConfig, with_overrides
from text import EMPTY_EMBEDS, EMPTY_PROMPT
from vae import CausalShapes

OFFICIAL_RENAMES = [  # official single-file -> diffusers (regex, replacement)
    (r"^model\.diffusion_model\.", ""),
    (r"^patchify_proj\.", "proj_in."),
    (r"^adaln_single\.", "time_embed."),
    (r"^prompt_adaln_single\.", "prompt_adaln."),
    (r"\.q_norm\.", ".norm_q."),
    (r"\.k_norm\.", ".norm_k."),
]
TOP_LEVEL = {  # diffusers module -> model.py module
    "proj_in": "patchify",
    "caption_projection.linear_1": "caption_projection.0",
    "caption_projection.linear_2": "caption_projection.2",
    "time_embed.emb.timestep_embedder.linear_1": "t_embedder.0",
    "time_embed.emb.timestep_embedder.linear_2": "t_embedder.2",
    "time_embed.linear": "adaln_single.1",
    "prompt_adaln.emb.timestep_embedder.linear_1": "prompt_t_embedder.0",
    "prompt_adaln.emb.timestep_embedder.linear_2": "prompt_t_embedder.2",
    "prompt_adaln.linear": "prompt_adaln.1",
    "proj_out": "proj_out",
}
IN_BLOCK_RENAMES = [  # inside transformer_blocks.N, diffusers -> model.py (regex, replacement)
    (r"\.norm_q\.", ".q_norm."),
    (r"\.norm_k\.", ".k_norm."),
    (r"\.to_out\.0\.", ".to_out."),
    (r"^ff\.net\.0\.proj\.", "ff.0."),
    (r"^ff\.net\.2\.", "ff.2."),
]
DROPPED_TOP = re.compile(r"^(audio_|av_cross_attn_|av_ca_|video_embeddings_connector\.)")
DROPPED_IN_BLOCK = re.compile(r"^(audio_|video_to_audio_|video_a2v_)")
ROPE_PERMUTED = re.compile(r"^blocks\.\d+\.attn1\.(to_q|to_k|q_norm|k_norm)\.")


def apply_renames(key: str, renames: list) -> str:
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


def official_to_diffusers(key: str) -> str:
    return apply_renames(key, OFFICIAL_RENAMES)


def rename_module(key: str, table: dict) -> str:
    """Rename the module part of `module.leaf` through `table`."""
    module, _, leaf = key.rpartition(".")
    return f"{table.get(module, module)}.{leaf}"


def map_key(key: str) -> str | None:
    """A diffusers key -> model.py's, None for the dropped audio / audio-video parts."""
    if key == "scale_shift_table":
        return "out_scale_shift_table"
    if m := re.match(r"^transformer_blocks\.(\d+)\.(.*)$", key):
        index, rest = m.groups()
        return None if DROPPED_IN_BLOCK.match(rest) else f"blocks.{index}.{apply_renames(rest, IN_BLOCK_RENAMES)}"
    return None if DROPPED_TOP.match(key) else rename_module(key, TOP_LEVEL)


# diffusers config values that model.py builds in (LTX-2.3's); anything else is refused.
FIXED_CONFIG = {
    "patch_size": 1, "patch_size_t": 1, "vae_scale_factors": [8, 32, 32], "pos_embed_max_pos": 20,
    "base_height": 2048, "base_width": 2048, "causal_offset": 1, "activation_fn": "gelu-approximate",
    "qk_norm": "rms_norm_across_heads", "norm_elementwise_affine": False, "norm_eps": 1e-6,
    "attention_bias": True, "attention_out_bias": True, "ff_bias": True, "timestep_scale_multiplier": 1000,
    "use_prompt_adaln_single": True, "use_keyframes_abs_pos_embedding": False,
}


def dit_config_from_diffusers(config: Mapping) -> tuple[DiTConfig, str]:
    """diffusers' LTX2VideoTransformer3DModel config (its config.json) -> (DiTConfig, rope_type)."""
    wrong = {k: config[k] for k, v in FIXED_CONFIG.items()
             if k in config and (list(config[k]) if isinstance(v, list) else config[k]) != v}
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    if config.get("out_channels") not in (None, config["in_channels"]):
        wrong["out_channels"] = config["out_channels"]
    if config["cross_attention_dim"] != dim:
        wrong["cross_attention_dim"] = config["cross_attention_dim"]
    if wrong:
        raise ValueError(f"LTX-2 transformer config not supported by model.py: {wrong} (expected {FIXED_CONFIG}, "
                         f"out_channels == in_channels, cross_attention_dim == heads * head_dim = {dim})")
    captions = config.get("use_prompt_embeddings", True)
    cfg = DiTConfig(in_channels=config["in_channels"], dim=dim, depth=config["num_layers"],
                    heads=config["num_attention_heads"], text_dim=config["caption_channels"] if captions else dim,
                    rope_theta=config["rope_theta"], gated_attention=config["gated_attn"],
                    cross_attention_adaln=config["cross_attn_mod"], caption_projection=captions, rope="ltx2")
    return cfg, config["rope_type"]


def interleaved_to_split(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's output channels from (0, 1, 2, 3, ...) to (0, 2, ..., 1, 3, ...)."""
    return w.unflatten(0, (heads, -1, 2)).transpose(1, 2).flatten(0, 2)


def convert_state_dict(checkpoint: Mapping, cfg: DiTConfig, rope_type: str = "split") -> dict:
    """An LTX-2.3 transformer state dict (diffusers or official names; tensors read lazily, one at a
    time) -> model.py's state dict for `cfg`. Raises one ValueError listing missing and unexpected keys."""
    if rope_type not in ("split", "interleaved"):
        raise ValueError(f"unknown rope_type {rope_type!r}; choose 'split' or 'interleaved'")
    keys = list(checkpoint.keys())
    if any(k.startswith("model.diffusion_model.") for k in keys):  # a whole official pipeline file
        keys = [k for k in keys if k.startswith("model.diffusion_model.")]
    names = {}
    for key in keys:
        name = map_key(official_to_diffusers(key))
        if name is not None:
            names[name] = key
    with torch.device("meta"):
        expected = set(DiT(cfg).state_dict())
    missing, unexpected = sorted(expected - names.keys()), sorted(names.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"LTX-2.3 checkpoint does not match DiT config (dim {cfg.dim}, depth {cfg.depth}): "
                         f"missing {len(missing)} keys {missing}; unexpected {len(unexpected)} keys "
                         f"{[names[n] for n in unexpected]}")
    out = {}
    for name, key in names.items():
        w = checkpoint[key]
        out[name] = interleaved_to_split(w, cfg.heads) if rope_type == "interleaved" and ROPE_PERMUTED.match(name) else w
    return out


class LazySafetensors(Mapping):
    """Open safetensors files as one read-only mapping; a tensor is read (memory-mapped) on access."""

    def __init__(self, *handles):
        self.where = {key: handle for handle in handles for key in handle.keys()}

    def __getitem__(self, key):
        return self.where[key].get_tensor(key)

    def __iter__(self):
        return iter(self.where)

    def __len__(self):
        return len(self.where)


def load_dit(checkpoint: Mapping, cfg: DiTConfig, rope_type: str = "split") -> DiT:
    """Build DiT(cfg) on the meta device and assign the converted tensors (no second copy)."""
    with torch.device("meta"):
        model = DiT(cfg)
    model.load_state_dict(convert_state_dict(checkpoint, cfg, rope_type), strict=True, assign=True)
    model.reset_rope_table()  # built on the meta device above
    return model


def load_ltx2(path: str | os.PathLike | list, cfg: DiTConfig = CONFIGS["ltx2-video"], rope_type: str = "split") -> DiT:
    """An LTX-2.3 checkpoint (a .safetensors file, or a list of diffusers' shards) -> model.py's DiT,
    in the checkpoint's dtype."""
    from safetensors import safe_open
    paths = path if isinstance(path, (list, tuple)) else [path]
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(p), framework="pt")) for p in paths]
        return load_dit(LazySafetensors(*handles), cfg, rope_type)


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


# ----------------------------------------------------------------------------- the pipeline

LTX2_SIZE, LTX2_FRAMES, LTX2_FPS = 512, 121, 24.0  # defaults: LTX-2's 121 frames at 24 fps; square frames


def find_transformer(path: str | os.PathLike) -> tuple[list[Path], dict | None] | None:
    """An LTX-2.3 transformer checkpoint -> (its safetensors files, diffusers' config or None for one
    file); None when `path` is not one (e.g. a checkpoint folder written by train.py)."""
    p = Path(path)
    if (p / "transformer" / "config.json").is_file():  # a diffusers pipeline folder
        p = p / "transformer"
    if p.is_file() and p.suffix == ".safetensors":
        return [p], None
    if not (p / "config.json").is_file():
        return None
    config = json.loads((p / "config.json").read_text())
    if config.get("_class_name") != "LTX2VideoTransformer3DModel":
        return None
    index = p / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():  # diffusers' shards
        files = [p / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        files = [p / "diffusion_pytorch_model.safetensors"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"LTX-2.3 transformer at {p}: weights missing: {missing}")
    return files, config


def build_pipeline(transformer: str | os.PathLike, vae: str | os.PathLike = "", size: int = 0, frames: int = 0,
                   fps: float = LTX2_FPS, dtype: torch.dtype | None = torch.float32, **dit_overrides):
    """An LTX-2.3 transformer checkpoint + the LTX-2 VAE (`vae`, default: the pipeline folder's vae/)
    -> checkpoint.Pipeline without a text encoder (precomputed prompt embeddings), DiT in `dtype` (None: the
    checkpoint's, its tensors left memory-mapped: read only where used)."""
    from checkpoint import Pipeline

    found = find_transformer(transformer)
    if found is None:
        raise ValueError(f"{transformer} is not an LTX-2.3 transformer checkpoint (a diffusers folder with "
                         f"LTX2VideoTransformer3DModel's config.json, or a .safetensors file)")
    files, config = found
    cfg, rope_type = dit_config_from_diffusers(config) if config is not None else (CONFIGS["ltx2-video"], "split")
    cfg = with_overrides(cfg, fps=fps, **dit_overrides)
    if not vae and (Path(transformer) / "vae").is_dir():
        vae = Path(transformer) / "vae"
    autoencoder = load_vae(vae)
    if autoencoder.config.latent_channels != cfg.in_channels:
        raise ValueError(f"the LTX-2 VAE at {vae} has {autoencoder.config.latent_channels} latent channels, "
                         f"the transformer {cfg.in_channels}")
    dit = load_ltx2(files, cfg, rope_type)
    dit = dit if dtype is None else dit.to(dtype)
    return Pipeline(autoencoder, None, dit, size or LTX2_SIZE, frames or LTX2_FRAMES, fps).check()


# ----------------------------------------------------------------------------- prompt embeddings

GEMMA_PARTS = ("model_index.json", "text_encoder", "tokenizer", "connectors")


def save_prompt_embeds(path: Path, emb: torch.Tensor, mask: torch.Tensor) -> None:
    from safetensors.torch import save_file
    save_file({"prompt_embeds": emb.contiguous(), "prompt_attention_mask": mask.contiguous()}, str(path))


def write_prompt_embeds(manifest: str | os.PathLike, out: str | os.PathLike,
                        encode: Callable[[str], tuple[torch.Tensor, torch.Tensor]]) -> Path:
    """Encode each distinct caption of a manifest and the empty prompt (encode(prompt) -> ([L, D], [L]));
    write out/prompt_NNNNNN.safetensors, out/EMPTY_EMBEDS and `<manifest>.embeds.jsonl` beside the
    manifest: its lines with "prompt_embeds" (relative to it). Returns that manifest's path."""
    manifest, out = Path(manifest), Path(out)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    items = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    if any("caption" not in item for item in items):
        raise ValueError(f"{manifest}: every line needs a \"caption\"")
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for item in items:
        if item["caption"] not in files:
            files[item["caption"]] = out / f"prompt_{len(files):06d}.safetensors"
            save_prompt_embeds(files[item["caption"]], *encode(item["caption"]))
        item["prompt_embeds"] = os.path.relpath(files[item["caption"]], manifest.parent)
    save_prompt_embeds(out / EMPTY_EMBEDS, *encode(EMPTY_PROMPT))
    target = manifest.with_name(manifest.stem + ".embeds.jsonl")
    target.write_text("".join(json.dumps(item) + "\n" for item in items))
    return target


def gemma_encoder(path: str | os.PathLike, device: str = "cpu", max_length: int = 1024):
    """LTX-2.3's prompt encoding from a local diffusers LTX-2.3 pipeline folder -> encode(prompt) ->
    (video prompt embeddings [L, D], mask [L]): LTX2Pipeline.encode_prompt (Gemma 3, every layer's hidden
    states) then its video text connector, as LTX2Pipeline.__call__ runs them."""
    p = Path(path)
    missing = [part for part in GEMMA_PARTS if not (p / part).exists()]
    if missing:
        raise FileNotFoundError(f"no Gemma weights at {p} (missing {', '.join(missing)}): put a diffusers LTX-2.3 "
                                f"pipeline folder there (model_index.json, text_encoder/ = Gemma 3, tokenizer/, "
                                f"connectors/; e.g. Lightricks/LTX-2 downloaded where there is internet)")
    try:
        import transformers  # noqa: F401  (diffusers' LTX2Pipeline needs it for Gemma)
        from diffusers import LTX2Pipeline
    except ImportError as e:
        raise ImportError(f"encoding prompts with Gemma needs diffusers and transformers ({e}): "
                          f"pip install diffusers transformers") from None
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    pipe = LTX2Pipeline.from_pretrained(str(p), transformer=None, vae=None, audio_vae=None, vocoder=None,
                                        torch_dtype=dtype).to(device)

    @torch.no_grad()
    def encode(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        emb, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                             max_sequence_length=max_length, device=device)
        video, _, video_mask = pipe.connectors(emb, mask, padding_side=getattr(pipe.tokenizer, "padding_side", "left"))
        return video[0].cpu(), video_mask[0].bool().cpu()
    return encode


def memory_plan(gpus: int, frames: int, height: int, width: int, batch: int, ema: bool = True,
                cfg: DiTConfig = CONFIGS["ltx2-video"]) -> dict:
    """GiB per GPU (see the module docstring for the model of memory) for full fine-tuning on `gpus`."""
    with torch.device("meta"):
        model = DiT(cfg)
    P = sum(p.numel() for p in model.parameters())
    P_block = sum(p.numel() for p in model.blocks[0].parameters())
    h, w = height // 32, width // 32  # LTX-2's VAE: 32x spatial, 8x temporal after the first frame
    n = (1 + (frames - 1) // 8) * h * w + h * w  # video tokens + one reference frame
    b = math.ceil(batch / gpus)
    gib = 2**30
    plan = {"gpus": gpus, "micro_batch": b, "tokens": n,
            "params": (4 * P / gpus + 2 * 2 * P_block) / gib, "grads": 4 * P / gpus / gib,
            "adamw": 8 * P / gpus / gib, "ema": 4 * P / gpus / gib * ema,
            "activations": b * (cfg.depth * 2 * n * cfg.dim + 34 * n * cfg.dim) / gib}
    plan["total"] = plan["params"] + plan["grads"] + plan["adamw"] + plan["ema"] + plan["activations"]
    return plan


def print_memory_plan(args) -> None:
    plans = [memory_plan(g, args.frames, args.height, args.width, args.batch, not args.no_ema)
             for g in (1, 2, 4, 8, 16, 32, 64)]
    print(f"ltx2-video full fine-tune, {args.frames} frames {args.height}x{args.width}, global batch {args.batch}, "
          f"{plans[0]['tokens']} tokens per sample (video + reference); GiB per GPU")
    print(f"{'GPUs':>5} {'micro-b':>7} {'params':>8} {'grads':>8} {'AdamW':>8} {'EMA':>8} {'activ.':>8} {'total':>8}"
          f"  80GB 96GB")
    for q in plans:
        fits = ["yes" if q["total"] <= 0.9 * cap * 1e9 / 2**30 else "no" for cap in (80, 96)]
        print(f"{q['gpus']:>5} {q['micro_batch']:>7} {q['params']:>8.1f} {q['grads']:>8.1f} {q['adamw']:>8.1f} "
              f"{q['ema']:>8.1f} {q['activations']:>8.1f} {q['total']:>8.1f}  {fits[0]:>4} {fits[1]:>4}")
    for cap in (80, 96):
        ok = [q["gpus"] for q in plans if q["total"] <= 0.9 * cap * 1e9 / 2**30]
        print(f"smallest GPU count for batch {args.batch} on {cap} GB GPUs (10 % headroom): "
              f"{ok[0] if ok else 'none up to 64'}")


def encode_prompts(args) -> None:
    encode = gemma_encoder(args.gemma, args.device, args.max_length)
    out = Path(args.out) if args.out else Path(args.manifest).parent / "prompt_embeds"
    target = write_prompt_embeds(args.manifest, out, encode)
    print(f"wrote prompt embeddings to {out} and {target}; train with --data {target}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("memory-plan", help="memory per GPU for full fine-tuning of ltx2-video, 1-64 GPUs")
    m.add_argument("--frames", type=int, default=121, help="pixel frames per clip (1 + 8k)")
    m.add_argument("--height", type=int, default=512, help="pixel height")
    m.add_argument("--width", type=int, default=768, help="pixel width")
    m.add_argument("--batch", type=int, default=32, help="global batch (no gradient accumulation)")
    m.add_argument("--no-ema", action="store_true", help="without the EMA weights (train.py --ema 0)")
    e = sub.add_parser("encode-prompts", help="precompute LTX-2.3 prompt embeddings (Gemma 3 + text connector) "
                                              "for a manifest's captions")
    e.add_argument("--manifest", required=True, help="JSONL manifest with a \"caption\" per line")
    e.add_argument("--gemma", required=True, help="local diffusers LTX-2.3 pipeline folder (model_index.json, "
                                                 "text_encoder/, tokenizer/, connectors/)")
    e.add_argument("--out", default="", help="folder for the embeddings (default: prompt_embeds/ beside the manifest)")
    e.add_argument("--max-length", type=int, default=1024, help="Gemma tokens per prompt (LTX2Pipeline's default)")
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    try:
        (print_memory_plan if args.command == "memory-plan" else encode_prompts)(args)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"ltx2.py {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
