"""LTX-2.3 prompt embeddings: Gemma 3 hidden states -> the video text connector, as diffusers'
LTX2Pipeline runs it, written as text.load_prompt_embeds reads them (`python -m ltx2 encode-prompts`)."""
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from text import EMPTY_EMBEDS, EMPTY_PROMPT

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
                                        dtype=dtype).to(device)

    @torch.no_grad()
    def encode(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        emb, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                             max_sequence_length=max_length, device=device)
        video, _, video_mask = pipe.connectors(emb, mask, padding_side=getattr(pipe.tokenizer, "padding_side", "left"))
        return video[0].cpu(), video_mask[0].bool().cpu()
    return encode
