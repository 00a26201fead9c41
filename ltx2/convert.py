"""LTX-2.3 transformer checkpoints -> model.DiT: the key map, the RoPE layout, lazy loading, and the
project's Pipeline around it (see the package docstring and docs/ltx2.md)."""
import contextlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ltx2.vae import load_vae
from model import DiT, DiTConfig, with_overrides
from pipeline import PRESETS, Pipeline

OFFICIAL_RENAMES = [  # official single-file -> diffusers (regex, replacement)
    (r"^model\.diffusion_model\.", ""),
    (r"^patchify_proj\.", "proj_in."),
    (r"^adaln_single\.", "time_embed."),
    (r"^prompt_adaln_single\.", "prompt_adaln."),
    (r"\.q_norm\.", ".norm_q."),
    (r"\.k_norm\.", ".norm_k."),
    (r"\.scale_shift_table_a2v_ca_video$", ".video_a2v_cross_attn_scale_shift_table"),  # audio-video: dropped
    (r"\.scale_shift_table_a2v_ca_audio$", ".audio_a2v_cross_attn_scale_shift_table"),
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


def split_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of interleaved_to_split: each head's channels from (0, 2, ..., 1, 3, ...) back to (0, 1, 2, ...)."""
    return w.unflatten(0, (heads, 2, -1)).transpose(1, 2).flatten(0, 2)


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


def load_ltx2(path: str | os.PathLike | list, cfg: DiTConfig = PRESETS["ltx2-video"].dit, rope_type: str = "split") -> DiT:
    """An LTX-2.3 checkpoint (a .safetensors file, or a list of diffusers' shards) -> model.py's DiT,
    in the checkpoint's dtype."""
    from safetensors import safe_open
    paths = path if isinstance(path, (list, tuple)) else [path]
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(p), framework="pt")) for p in paths]
        return load_dit(LazySafetensors(*handles), cfg, rope_type)


# ----------------------------------------------------------------------------- the pipeline

LTX2_SIZE, LTX2_FRAMES, LTX2_FPS = 512, 121, 24.0  # defaults: LTX-2's 121 frames at 24 fps; square frames
LTX2_SCHEDULER = {"use_dynamic_shifting": True, "base_shift": 0.95, "max_shift": 2.05, "base_image_seq_len": 1024,
                  "max_image_seq_len": 4096, "shift_terminal": 0.1}  # LTX-2.3's shipped scheduler config


def scheduler_terminal(folder: str | os.PathLike) -> float:
    """shift_terminal of the scheduler config beside an LTX-2.3 transformer (a pipeline folder's scheduler/), else
    LTX-2.3's; a config whose dynamic shift differs from guidance.shift_for_tokens' (LTX-2.3's) is refused."""
    p = Path(folder)
    found = [f for f in (p / "scheduler", p.parent / "scheduler") if (f / "scheduler_config.json").is_file()]
    config = {**LTX2_SCHEDULER, **(json.loads((found[0] / "scheduler_config.json").read_text()) if found else {})}
    wrong = {k: config[k] for k, v in LTX2_SCHEDULER.items() if k != "shift_terminal" and config[k] != v}
    if wrong:
        raise ValueError(f"{found[0]}: scheduler settings {wrong} differ from LTX-2.3's {LTX2_SCHEDULER}, which the "
                         f"sampler (guidance.shift_for_tokens) follows")
    return float(config["shift_terminal"] or 0.0)


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
    -> pipeline.Pipeline without a text encoder (precomputed prompt embeddings), DiT in `dtype` (None: the
    checkpoint's, its tensors left memory-mapped: read only where used)."""
    found = find_transformer(transformer)
    if found is None:
        raise ValueError(f"{transformer} is not an LTX-2.3 transformer checkpoint (a diffusers folder with "
                         f"LTX2VideoTransformer3DModel's config.json, or a .safetensors file)")
    files, config = found
    cfg, rope_type = dit_config_from_diffusers(config) if config is not None else (PRESETS["ltx2-video"].dit, "split")
    cfg = with_overrides(cfg, fps=fps, **dit_overrides)
    if not vae and (Path(transformer) / "vae").is_dir():
        vae = Path(transformer) / "vae"
    autoencoder = load_vae(vae)
    if autoencoder.config.latent_channels != cfg.in_channels:
        raise ValueError(f"the LTX-2 VAE at {vae} has {autoencoder.config.latent_channels} latent channels, "
                         f"the transformer {cfg.in_channels}")
    dit = load_ltx2(files, cfg, rope_type)
    dit = dit if dtype is None else dit.to(dtype)
    return Pipeline(autoencoder, None, dit, size or LTX2_SIZE, frames or LTX2_FRAMES, fps,
                    scheduler_terminal(transformer)).check()
