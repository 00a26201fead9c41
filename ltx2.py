"""LTX-2.3's video branch in model.py: checkpoint conversion and a memory plan.

`load_ltx2(path)` reads an LTX-2.3 transformer checkpoint (safetensors, diffusers' key layout or the
official single-file one) into `DiT(CONFIGS["ltx2-video"])`. The model is built on the meta device
and each tensor is read from the memory-mapped file only when its parameter is assigned, so a
48-layer checkpoint never needs two copies in memory; the audio branch is never read.

Key map (diffusers -> model.py; `N` a block index). Official single-file names are first renamed to
diffusers' (as diffusers' own single-file loader does): prefix `model.diffusion_model.` dropped
(keys without it — VAE, vocoder, text connector — are not the transformer's), `patchify_proj` ->
`proj_in`, `adaln_single` -> `time_embed`, `prompt_adaln_single` -> `prompt_adaln`, `q_norm` /
`k_norm` -> `norm_q` / `norm_k`.

| diffusers                                        | model.py                         |
|--------------------------------------------------|----------------------------------|
| `proj_in`                                        | `patchify`                       |
| `caption_projection.linear_1` / `.linear_2`      | `caption_projection.0` / `.2`    |
| `time_embed.emb.timestep_embedder.linear_1`/`_2` | `t_embedder.0` / `.2`            |
| `time_embed.linear`                              | `adaln_single.1`                 |
| `prompt_adaln.emb.timestep_embedder.linear_1`/`_2` | `prompt_t_embedder.0` / `.2`   |
| `prompt_adaln.linear`                            | `prompt_adaln.1`                 |
| `scale_shift_table`                              | `out_scale_shift_table`          |
| `proj_out`                                       | `proj_out`                       |
| `transformer_blocks.N.scale_shift_table`         | `blocks.N.scale_shift_table`     |
| `transformer_blocks.N.prompt_scale_shift_table`  | `blocks.N.prompt_scale_shift_table` |
| `transformer_blocks.N.attn{1,2}.to_{q,k,v}`      | `blocks.N.attn{1,2}.to_{q,k,v}`  |
| `transformer_blocks.N.attn{1,2}.norm_{q,k}`      | `blocks.N.attn{1,2}.{q,k}_norm`  |
| `transformer_blocks.N.attn{1,2}.to_out.0`        | `blocks.N.attn{1,2}.to_out`      |
| `transformer_blocks.N.attn{1,2}.to_gate_logits`  | `blocks.N.attn{1,2}.to_gate_logits` |
| `transformer_blocks.N.ff.net.0.proj` / `.net.2`  | `blocks.N.ff.0` / `.2`           |
| `audio_*`, `av_cross_attn_*` (official `av_ca_*`), `video_embeddings_connector.*`; in blocks `audio_*` (incl. `audio_to_video_*`), `video_to_audio_*`, `video_a2v_cross_attn_scale_shift_table` | dropped: the audio branch and the audio-video cross-attention |

RoPE layout: model.py rotates each head's channels in the rotate-half ("split") layout. A checkpoint
trained with the "interleaved" layout (pairs (2m, 2m+1)) is converted by permuting each head's
channels of attn1's `to_q`, `to_k`, `norm_q`, `norm_k` to (even..., odd...): q and k move together,
so every q.k — hence the attention — is unchanged (the qk-RMSNorm spans all heads and is
permutation invariant).

Memory plan (`python ltx2.py memory-plan`): full fine-tuning of ltx2-video as train.py runs it with
--fsdp (FSDP2, fp32 master weights sharded over the GPUs, bf16 compute, fp32 gradient reduction,
gradient checkpointing per block). Per GPU, for N GPUs and a micro-batch of b = ceil(batch / N):
parameters 4P/N + the bf16 copy of two gathered blocks (current + prefetched), gradients 4P/N,
AdamW moments 8P/N; activations b x (depth block inputs of n x dim in bf16 + one block's recompute,
~34 n dim bytes: Korthikanti et al.'s per-layer count without attention scores, which flash attention
never stores), n = video tokens + reference tokens. Buffers, the VAE (frozen, encodes up front) and
allocator fragmentation are not counted: keep ~10 % headroom.

    python ltx2.py memory-plan [--frames 121 --height 512 --width 768 --batch 32]
"""
import argparse
import math
import re
from collections.abc import Mapping

import torch

from model import CONFIGS, DiT, DiTConfig, rope_table

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
    """A safetensors file as a read-only mapping; a tensor is read (memory-mapped) on access."""

    def __init__(self, handle):
        self.handle = handle

    def __getitem__(self, key):
        return self.handle.get_tensor(key)

    def __iter__(self):
        return iter(self.handle.keys())

    def __len__(self):
        return len(self.handle.keys())


def load_dit(checkpoint: Mapping, cfg: DiTConfig, rope_type: str = "split") -> DiT:
    """Build DiT(cfg) on the meta device and assign the converted tensors (no second copy)."""
    with torch.device("meta"):
        model = DiT(cfg)
    model.load_state_dict(convert_state_dict(checkpoint, cfg, rope_type), strict=True, assign=True)
    model.freqs = rope_table(cfg)  # the non-persistent RoPE table, built on the meta device above
    return model


def load_ltx2(path: str, cfg: DiTConfig = CONFIGS["ltx2-video"], rope_type: str = "split") -> DiT:
    """An LTX-2.3 checkpoint file (.safetensors) -> model.py's DiT, in the checkpoint's dtype."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as handle:
        return load_dit(LazySafetensors(handle), cfg, rope_type)


def memory_plan(gpus: int, frames: int, height: int, width: int, batch: int,
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
            "adamw": 8 * P / gpus / gib, "activations": b * (cfg.depth * 2 * n * cfg.dim + 34 * n * cfg.dim) / gib}
    plan["total"] = plan["params"] + plan["grads"] + plan["adamw"] + plan["activations"]
    return plan


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("memory-plan", help="memory per GPU for full fine-tuning of ltx2-video, 1-64 GPUs")
    m.add_argument("--frames", type=int, default=121, help="pixel frames per clip (1 + 8k)")
    m.add_argument("--height", type=int, default=512, help="pixel height")
    m.add_argument("--width", type=int, default=768, help="pixel width")
    m.add_argument("--batch", type=int, default=32, help="global batch (no gradient accumulation)")
    args = p.parse_args()
    plans = [memory_plan(g, args.frames, args.height, args.width, args.batch) for g in (1, 2, 4, 8, 16, 32, 64)]
    print(f"ltx2-video full fine-tune, {args.frames} frames {args.height}x{args.width}, global batch {args.batch}, "
          f"{plans[0]['tokens']} tokens per sample (video + reference); GiB per GPU")
    print(f"{'GPUs':>5} {'micro-b':>7} {'params':>8} {'grads':>8} {'AdamW':>8} {'activ.':>8} {'total':>8}  80GB 96GB")
    for q in plans:
        fits = ["yes" if q["total"] <= 0.9 * cap * 1e9 / 2**30 else "no" for cap in (80, 96)]
        print(f"{q['gpus']:>5} {q['micro_batch']:>7} {q['params']:>8.1f} {q['grads']:>8.1f} {q['adamw']:>8.1f} "
              f"{q['activations']:>8.1f} {q['total']:>8.1f}  {fits[0]:>4} {fits[1]:>4}")
    for cap in (80, 96):
        ok = [q["gpus"] for q in plans if q["total"] <= 0.9 * cap * 1e9 / 2**30]
        print(f"smallest GPU count for batch {args.batch} on {cap} GB GPUs (10 % headroom): "
              f"{ok[0] if ok else 'none up to 64'}")


if __name__ == "__main__":
    main()
