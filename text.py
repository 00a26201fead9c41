"""Byte-level tokenizer and a small transformer text encoder, from scratch.

Tokens: the UTF-8 bytes of a prompt (ids 0..255), framed as BOS + bytes + EOS and right-padded
with PAD to a fixed max_len (long prompts lose bytes at the end; EOS is always kept). The mask is
True on real tokens (BOS, bytes, EOS) and False on padding. EMPTY_PROMPT is the prompt used when
text is dropped (classifier-free guidance); it tokenises to just BOS, EOS.

The encoder never attends to padding and zeroes its output there, so a prompt's embedding does
not depend on how much padding follows it.

Precomputed prompt embeddings (a larger model's text encoder, e.g. LTX-2.3's Gemma 3 + text
connector, written by `python -m ltx2 encode-prompts`) replace the encoder: a safetensors file with
`prompt_embeds` [L, D] and `prompt_attention_mask` [L] per prompt; the empty prompt's, used when the
text is dropped, sit beside them in `empty.safetensors` (EMPTY_EMBEDS).
"""
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259
EMPTY_PROMPT = ""
EMPTY_EMBEDS = "empty.safetensors"  # the empty prompt's precomputed embeddings, beside the prompts'


def tokenize(prompts: list[str], max_len: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts -> (tokens LongTensor [B, max_len], mask BoolTensor [B, max_len])."""
    if max_len < 2:
        raise ValueError(f"max_len must leave room for BOS and EOS (>= 2), got {max_len}")
    tokens = torch.full((len(prompts), max_len), PAD, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids = [BOS, *prompt.encode("utf-8")[: max_len - 2], EOS]
        tokens[row, : len(ids)] = torch.tensor(ids)
    return tokens, tokens != PAD


@dataclass
class TextConfig:
    vocab_size: int = VOCAB_SIZE
    dim: int = 128
    depth: int = 2
    heads: int = 4
    max_len: int = 64
    mlp_ratio: int = 4


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); padded keys masked out."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.heads = config.heads
        self.norm1 = nn.LayerNorm(config.dim)
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.norm2 = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, config.mlp_ratio * config.dim),
            nn.GELU(),
            nn.Linear(config.mlp_ratio * config.dim, config.dim),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # [B, heads, L, D/heads]
        x = x + self.proj(attn.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        if config.dim % config.heads:
            raise ValueError(f"dim {config.dim} must be divisible by heads {config.heads}")
        self.config = config
        self.token_emb = nn.Embedding(config.vocab_size, config.dim)
        self.pos_emb = nn.Parameter(torch.randn(config.max_len, config.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens [B, L], mask [B, L] (True = real) -> [B, L, dim], zero at padded positions."""
        L = tokens.shape[1]
        if L > self.config.max_len:
            raise ValueError(f"sequence length {L} exceeds the encoder's max_len {self.config.max_len}")
        x = self.token_emb(tokens) + self.pos_emb[:L]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x) * mask[..., None]

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise on this module's device and encode: -> (emb [B, max_len, dim], mask [B, max_len])."""
        tokens, mask = tokenize(prompts, self.config.max_len)
        device = self.pos_emb.device
        tokens, mask = tokens.to(device), mask.to(device)
        return self(tokens, mask), mask


# ----------------------------------------------------------------------------- precomputed embeddings

def load_prompt_embeds(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """A precomputed-embeddings file -> (prompt_embeds [L, D] float32, prompt_attention_mask [L] bool)."""
    from infra.errors import read_safetensors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt embeddings not found: {path} (write them with `python -m ltx2 encode-prompts`)")
    w = read_safetensors(path)
    if "prompt_embeds" not in w or "prompt_attention_mask" not in w:
        raise ValueError(f"{path} needs tensors prompt_embeds [L, D] and prompt_attention_mask [L]; has {sorted(w)}")
    emb, mask = w["prompt_embeds"], w["prompt_attention_mask"]
    if emb.dim() == 3 and emb.shape[0] == 1:  # a batch of one, as diffusers' pipelines return it
        emb, mask = emb[0], mask.reshape(mask.shape[-1])
    if emb.dim() != 2 or tuple(mask.shape) != tuple(emb.shape[:1]):
        raise ValueError(f"{path}: expected prompt_embeds [L, D] and prompt_attention_mask [L], "
                         f"got {tuple(emb.shape)} and {tuple(mask.shape)}")
    return emb.float(), mask.bool()


def empty_embeds_path(prompt_embeds: str | os.PathLike, explicit: str | os.PathLike | None = None) -> Path:
    """Where the empty prompt's embeddings are: `explicit`, or EMPTY_EMBEDS beside `prompt_embeds`."""
    return Path(explicit) if explicit else Path(prompt_embeds).parent / EMPTY_EMBEDS


def pad_prompt_embeds(embeds: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad [L_b, D] embeddings (zeros, mask False) to the longest: -> ([B, L, D], [B, L] bool)."""
    L = max(e.shape[0] for e in embeds)
    y = torch.stack([F.pad(e, (0, 0, 0, L - e.shape[0])) for e in embeds])
    return y, torch.stack([F.pad(m.bool(), (0, L - m.shape[0])) for m in masks])


def text_pair(emb, mask, empty_emb, empty_mask) -> tuple[torch.Tensor, ...]:
    """A prompt's and the empty prompt's embeddings ([L, D], [L]) padded to one length -> (y, y_mask,
    y_0, y_0_mask), [1, L', D] and [1, L'], as guidance.three_stream_velocity takes them."""
    y, m = pad_prompt_embeds([emb, empty_emb], [mask, empty_mask])
    return y[:1], m[:1], y[1:], m[1:]


def check_text_width(y: torch.Tensor, text_dim: int) -> torch.Tensor:
    """Precomputed embeddings [..., D] must come at the DiT's text width."""
    if y.shape[-1] != text_dim:
        raise ValueError(f"prompt embeddings are {y.shape[-1]} wide but the DiT's text_dim is {text_dim}: encode the "
                         f"prompts with the text encoder this DiT was trained with (LTX-2.3: python -m ltx2 encode-prompts)")
    return y
