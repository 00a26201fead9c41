"""The video DiT with a latent in-context reference (paper Sec. 3.1-3.2), LTX-2 style blocks.

Read top to bottom: config -> attention -> block -> DiT. Latents are [B, C, T, H, W]; the
1x1x1 patchify turns them into T*H*W tokens (t-major). The reference latent z_ref is one more
latent frame appended after the video tokens, z~_t = [z_t, z_ref] (Sec. 3.1), positioned by
TASS-RoPE (Sec. 3.2) and seen at timestep 0 (it is clean); its output is discarded.

Dropping the reference for sample b = hiding keys >= N_video from every query of b: a
per-sample key length kv_len[b] (see guidance.py and fused/rope_attention.py).
"""
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fused import rope_attention
from rope import (LTX2_MAX_LATENT_HW, apply_rope, ltx2_positions, ltx2_rope_frequencies, reference_positions,
                  rope_frequencies, video_positions)


@dataclass
class DiTConfig:
    in_channels: int = 8  # latent channels C
    dim: int = 128
    depth: int = 4
    heads: int = 4
    text_dim: int = 128  # width of the text encoder's output
    mlp_ratio: float = 4.0
    rope_theta: float = 10000.0
    ref_mode: str = "tass"  # rope.reference_positions mode
    attn_backend: str = "torch"  # "torch" (reference) or "triton" (fused.rope_attention)
    grad_checkpoint: bool = False
    # LTX-2.3 features (all off for the project's own configs; on in "ltx2-video")
    gated_attention: bool = False  # per-head gates 2 sigmoid(W x) on each attention's output
    cross_attention_adaln: bool = False  # AdaLN on the cross-attention query (3 more rows) and on the text (prompt AdaLN)
    caption_projection: bool = True  # text MLP inside the DiT (LTX-2.3 has it in its text connector: then text_dim == dim)
    rope: str = "axes"  # "axes" (rope.rope_frequencies) or "ltx2" (rope.ltx2_positions / ltx2_rope_frequencies)
    fps: float = 24.0  # frame rate for LTX-2's time coordinate (rope="ltx2")

    @property
    def n_mod(self) -> int:
        """Rows of timestep modulation per block: shift/scale/gate for self-attn and FFN (+ cross-attn query)."""
        return 9 if self.cross_attention_adaln else 6


def with_overrides(cfg: DiTConfig, **overrides) -> DiTConfig:
    """cfg with the given fields replaced; unknown names and None values are ignored."""
    known = {f.name for f in fields(DiTConfig)}
    return replace(cfg, **{k: v for k, v in overrides.items() if k in known and v is not None})


# ----------------------------------------------------------------------------- attention

def key_mask(kv_len: torch.Tensor | None, n_keys: int) -> torch.Tensor | None:
    """[B, 1, 1, N] bool: key n is visible to sample b iff n < kv_len[b]."""
    if kv_len is None:
        return None
    return (torch.arange(n_keys, device=kv_len.device)[None] < kv_len[:, None])[:, None, None]


def rope_sdpa(q, k, v, pos, freqs, kv_len):
    """The `torch` backend: apply_rope on q and k, then masked scaled-dot-product attention."""
    q, k = apply_rope(q, pos, freqs), apply_rope(k, pos, freqs)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask(kv_len, k.shape[2]))


def self_attention(q, k, v, pos, freqs, kv_len, backend: str):
    if backend == "triton":
        return rope_attention(q, k, v, pos, freqs, kv_len)
    if backend != "torch":
        raise ValueError(f"unknown attention backend {backend!r}; choose 'torch' or 'triton'")
    return rope_sdpa(q, k, v, pos, freqs, kv_len)


class Attention(nn.Module):
    """Multi-head attention with qk-RMSNorm (across heads); self-attention with 3D RoPE or
    cross-attention; optionally LTX-2.3's per-head output gates 2 sigmoid(to_gate_logits(x))."""

    def __init__(self, dim: int, heads: int, ctx_dim: int | None = None, gated: bool = False):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(ctx_dim or dim, dim)
        self.to_v = nn.Linear(ctx_dim or dim, dim)
        self.q_norm, self.k_norm = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.to_gate_logits = nn.Linear(dim, heads) if gated else None
        self.to_out = nn.Linear(dim, dim)

    def split_heads(self, x):  # [B, N, dim] -> [B, heads, N, dim/heads]
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x, ctx=None, ctx_mask=None, pos=None, freqs=None, kv_len=None, backend="torch", skip=None):
        """skip [B] bool: those samples' attention is replaced by its values (LTX-2's spatio-temporal guidance)."""
        src = x if ctx is None else ctx
        q = self.split_heads(self.q_norm(self.to_q(x)))
        k = self.split_heads(self.k_norm(self.to_k(src)))
        v = self.split_heads(self.to_v(src))
        if ctx is None:
            o = self_attention(q, k, v, pos, freqs, kv_len, backend)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx_mask[:, None, None])
        if skip is not None:
            o = torch.where(skip[:, None, None, None], v, o)
        if self.to_gate_logits is not None:  # zero logits -> gate 1
            o = o * 2 * torch.sigmoid(self.to_gate_logits(x)).transpose(1, 2)[..., None]
        return self.to_out(o.transpose(1, 2).flatten(2))


# ----------------------------------------------------------------------------- blocks

def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def per_segment(fn, x: torch.Tensor, lens: list[int], mods: torch.Tensor) -> torch.Tensor:
    """Apply fn(x_s, mod_s) to each token segment s (video, reference) with its own
    modulation mods[:, s] ([B, k, D]); the per-token timestep is never materialised."""
    return torch.cat([fn(xs, mods[:, s]) for s, xs in enumerate(x.split(lens, dim=1))], dim=1)


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: float):
        hidden = int(dim * mult)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class Block(nn.Module):
    """LTX-2 style transformer block: AdaLN-single modulated self-attention (3D RoPE) and FFN,
    cross-attention to the text, gates initialised to zero (DiT's adaLN-Zero). The cross-attention
    is plain, or with cross_attention_adaln (LTX-2.3) modulated on both sides: query by the token's
    timestep (rows 6-8: shift, scale, gate), text by the prompt AdaLN (prompt_scale_shift_table)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.RMSNorm(d, eps=1e-6, elementwise_affine=False)
        self.attn1 = Attention(d, cfg.heads, gated=cfg.gated_attention)
        self.norm2 = nn.RMSNorm(d, eps=1e-6, elementwise_affine=False)
        self.attn2 = Attention(d, cfg.heads, gated=cfg.gated_attention)
        self.norm3 = nn.RMSNorm(d, eps=1e-6, elementwise_affine=False)
        self.ff = FeedForward(d, cfg.mlp_ratio)
        # rows: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp[, shift_q, scale_q, gate_q]
        self.scale_shift_table = nn.Parameter(torch.randn(cfg.n_mod, d) / d**0.5)
        with torch.no_grad():
            self.scale_shift_table[[2, 5]] = 0.0
        if cfg.cross_attention_adaln:
            with torch.no_grad():  # the query AdaLN starts as the identity: shift 0, scale 0, gate 1
                self.scale_shift_table[6:] = torch.tensor([0.0, 0.0, 1.0])[:, None]
            self.prompt_scale_shift_table = nn.Parameter(torch.zeros(2, d))  # rows: shift, scale of the text
        self.cfg = cfg  # shared with the DiT: attn_backend can be switched after building

    def cross_attention(self, x, lens, mods, y, y_mask, y_mod):
        h = self.norm2(x)
        if not self.cfg.cross_attention_adaln:
            return self.attn2(h, ctx=y, ctx_mask=y_mask)
        shift_y, scale_y = (y_mod + self.prompt_scale_shift_table).unbind(1)  # y_mod [B, 2, D]
        h = per_segment(lambda xs, m: modulate(xs, m[:, 6:7], m[:, 7:8]), h, lens, mods)
        h = self.attn2(h, ctx=modulate(y, shift_y[:, None], scale_y[:, None]), ctx_mask=y_mask)
        return per_segment(lambda hs, m: m[:, 8:9] * hs, h, lens, mods)

    def forward(self, x, t_mod, lens, y, y_mask, y_mod, pos, freqs, kv_len, skip=None):
        mods = t_mod + self.scale_shift_table  # [B, S, n_mod, D], one row set per segment
        h = per_segment(lambda xs, m: modulate(xs, m[:, 0:1], m[:, 1:2]), self.norm1(x), lens, mods)
        h = self.attn1(h, pos=pos, freqs=freqs, kv_len=kv_len, backend=self.cfg.attn_backend, skip=skip)
        x = x + per_segment(lambda hs, m: m[:, 2:3] * hs, h, lens, mods)
        x = x + self.cross_attention(x, lens, mods, y, y_mask, y_mod)
        h = per_segment(lambda xs, m: modulate(xs, m[:, 3:4], m[:, 4:5]), self.norm3(x), lens, mods)
        return x + per_segment(lambda hs, m: m[:, 5:6] * hs, self.ff(h), lens, mods)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the network time 1000 t (flow convention: t=1 noise, t=0 data)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def timestep_mlp(dim: int) -> nn.Sequential:
    """Sinusoidal features of 1000 t -> [B, dim] (LTX-2's TimestepEmbedding)."""
    return nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))


def rope_table(cfg: DiTConfig) -> torch.Tensor:
    """The RoPE frequency matrix of a config: [D/2, 3] shared by heads, or LTX-2's [heads, D/2, 3]."""
    if cfg.rope == "ltx2":
        return ltx2_rope_frequencies(cfg.dim, cfg.heads, cfg.rope_theta)
    if cfg.rope != "axes":
        raise ValueError(f"unknown rope {cfg.rope!r}; choose 'axes' or 'ltx2'")
    return rope_frequencies(cfg.dim // cfg.heads, cfg.rope_theta)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if not cfg.caption_projection and cfg.text_dim != cfg.dim:
            raise ValueError(f"without caption_projection the text must come at the model width: "
                             f"text_dim {cfg.text_dim} != dim {cfg.dim}")
        self.cfg = cfg
        d = cfg.dim
        self.patchify = nn.Linear(cfg.in_channels, d)  # 1x1x1 patches
        if cfg.caption_projection:
            self.caption_projection = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.t_embedder = timestep_mlp(d)
        self.adaln_single = nn.Sequential(nn.SiLU(), nn.Linear(d, cfg.n_mod * d))  # shared by all blocks
        if cfg.cross_attention_adaln:  # LTX-2.3's prompt AdaLN: the text's shift and scale from the video's t
            self.prompt_t_embedder = timestep_mlp(d)
            self.prompt_adaln = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.out_scale_shift_table = nn.Parameter(torch.randn(2, d) / d**0.5)
        self.proj_out = nn.Linear(d, cfg.in_channels)
        self.register_buffer("freqs", rope_table(cfg), persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.adaln_single[1].weight)  # adaLN-Zero: modulation starts at the table
        if self.cfg.cross_attention_adaln:
            nn.init.zeros_(self.prompt_adaln[1].weight)
        for block in self.blocks:  # zero gate logits: every gate starts at 2 sigmoid(0) = 1
            for attn in (block.attn1, block.attn2):
                if attn.to_gate_logits is not None:
                    nn.init.zeros_(attn.to_gate_logits.weight)
        nn.init.zeros_(self.proj_out.weight)

    def reset_rope_table(self):
        """Recompute the RoPE table beside the weights: a non-persistent buffer (no checkpoint holds it), so a DiT
        built on the meta device gets it back once its weights are assigned or materialised (to_empty)."""
        self.freqs = rope_table(self.cfg).to(self.patchify.weight.device)

    def timestep_modulation(self, t):
        """t [B] -> (embedded t [B, D], per-block modulation [B, n_mod, D])."""
        emb = self.t_embedder(timestep_embedding(t).to(self.patchify.weight.dtype))
        return emb, self.adaln_single(emb).unflatten(-1, (self.cfg.n_mod, -1))

    def prompt_modulation(self, t):
        """t [B] -> the text's (shift, scale) base [B, 2, D] (LTX-2.3), None without cross_attention_adaln."""
        if not self.cfg.cross_attention_adaln:
            return None
        emb = self.prompt_t_embedder(timestep_embedding(t).to(self.patchify.weight.dtype))
        return self.prompt_adaln(emb).unflatten(-1, (2, -1))

    def rope_positions(self, T: int, H: int, W: int, reference: bool) -> torch.Tensor:
        """The video's (or the reference's, Sec. 3.2) positions, as the RoPE table expects them: the latent grid,
        or for rope="ltx2" LTX-2's coordinates (the reference as an appended single image, kept in range)."""
        if self.cfg.rope != "ltx2":
            return reference_positions(T, H, W, self.cfg.ref_mode) if reference else video_positions(T, H, W)
        if not reference:
            return ltx2_positions(video_positions(T, H, W), self.cfg.fps)
        latent = reference_positions(T, H, W, self.cfg.ref_mode, max_hw=LTX2_MAX_LATENT_HW)
        return ltx2_positions(latent, self.cfg.fps, single_frame=True)

    def forward(self, z_t, t, y, y_mask, z_ref=None, ref_keep=None, stg_blocks=(), stg=None):
        """Predict the velocity v for the video latents.

        z_t [B, C, T, H, W] noisy video latents, t [B] in [0, 1], y [B, L, text_dim] text
        features with mask y_mask [B, L]; z_ref [B, C, H, W] or [B, C, 1, H, W] the clean
        reference latent (optional), ref_keep [B] bool: False hides the reference of that sample;
        stg [B] bool: those samples skip self-attention in blocks `stg_blocks` (LTX-2's STG).
        Returns v [B, C, T, H, W] (the reference stream's output is discarded).
        """
        B, C, T, H, W = z_t.shape
        x = self.patchify(z_t.flatten(2).transpose(1, 2))  # [B, T*H*W, D]
        pos = self.rope_positions(T, H, W, reference=False)
        emb_t, mod_t = self.timestep_modulation(t)
        lens, mods, kv_len = [x.shape[1]], mod_t[:, None], None
        if z_ref is not None:
            r = self.patchify(z_ref.reshape(B, C, H * W).transpose(1, 2))  # [B, H*W, D]
            x = torch.cat([x, r], dim=1)  # z~_t = [z_t, z_ref] along time (Sec. 3.1)
            pos = torch.cat([pos, self.rope_positions(T, H, W, reference=True)])  # Sec. 3.2
            _, mod_ref = self.timestep_modulation(torch.zeros_like(t))  # the reference is clean: t = 0
            lens, mods = lens + [H * W], torch.stack([mod_t, mod_ref], dim=1)
            keep = torch.ones(B, dtype=torch.bool, device=x.device) if ref_keep is None else ref_keep
            kv_len = (lens[0] + keep.long() * lens[1]).to(torch.int32)
        pos = pos.to(x.device)
        if self.cfg.caption_projection:
            y = self.caption_projection(y)
        y_mod = self.prompt_modulation(t)  # the text is modulated by the video's t, reference or not
        for i, block in enumerate(self.blocks):
            args = (x, mods, lens, y, y_mask, y_mod, pos, self.freqs, kv_len, stg if i in stg_blocks else None)
            if self.cfg.grad_checkpoint and self.training:
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        x = x[:, : lens[0]]  # discard the reference stream
        shift, scale = (self.out_scale_shift_table[None] + emb_t[:, None]).unbind(1)
        x = self.proj_out(modulate(self.norm_out(x), shift[:, None], scale[:, None]))
        return x.transpose(1, 2).reshape(B, C, T, H, W)


def identity_blocks(dit: DiT, start: int) -> None:
    """Zero the output projections of blocks[start:] (both attentions and the FFN): each such block is then
    x -> x, so a DiT deepened by appending them computes the shallower DiT's function (DiT's zero-init residuals)."""
    for block in dit.blocks[start:]:
        for out in (block.attn1.to_out, block.attn2.to_out, block.ff[2]):
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
