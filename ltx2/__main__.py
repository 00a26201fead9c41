"""python -m ltx2 memory-plan | encode-prompts | export (see the package docstring)."""
import argparse
import sys
from pathlib import Path

import torch

import ltx2
from ltx2.export import export_checkpoint
from ltx2.gemma import gemma_encoder, write_prompt_embeds
from ltx2.memory import print_memory_plan

def encode_prompts(args) -> None:
    encode = gemma_encoder(args.gemma, args.device, args.max_length)
    out = Path(args.out) if args.out else Path(args.manifest).parent / "prompt_embeds"
    target = write_prompt_embeds(args.manifest, out, encode)
    print(f"wrote prompt embeddings to {out} and {target}; train with --data {target}")


def export(args) -> None:
    print(f"wrote {export_checkpoint(args.ckpt, args.base, args.out)}: diffusers' LTX2VideoTransformer3DModel")


COMMANDS = {"memory-plan": print_memory_plan, "encode-prompts": encode_prompts, "export": export}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=ltx2.__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("memory-plan", help="memory per GPU for full fine-tuning of ltx2-video, 1-64 GPUs")
    m.add_argument("--frames", type=int, default=121, help="pixel frames per clip (1 + 8k)")
    m.add_argument("--height", type=int, default=512, help="pixel height")
    m.add_argument("--width", type=int, default=768, help="pixel width")
    m.add_argument("--batch", type=int, default=32, help="global batch (no gradient accumulation)")
    m.add_argument("--no-ema", action="store_true", help="without the EMA weights (train.py --ema 0)")
    m.add_argument("--lora-rank", type=int, default=0, help="also the plan for LoRA of this rank (train.py --lora-rank)")
    e = sub.add_parser("encode-prompts", help="precompute LTX-2.3 prompt embeddings (Gemma 3 + text connector) "
                                              "for a manifest's captions")
    e.add_argument("--manifest", required=True, help="JSONL manifest with a \"caption\" per line")
    e.add_argument("--gemma", required=True, help="local diffusers LTX-2.3 pipeline folder (model_index.json, "
                                                 "text_encoder/, tokenizer/, connectors/)")
    e.add_argument("--out", default="", help="folder for the embeddings (default: prompt_embeds/ beside the manifest)")
    e.add_argument("--max-length", type=int, default=1024, help="Gemma tokens per prompt (LTX2Pipeline's default)")
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    x = sub.add_parser("export", help="a checkpoint of train.py --config ltx2 -> diffusers' LTX2VideoTransformer3DModel "
                                      "folder (the audio branch copied from --base)")
    x.add_argument("--ckpt", required=True, help="checkpoint or run folder written by train.py --config ltx2")
    x.add_argument("--base", required=True, help="the LTX-2.3 transformer it was trained from (diffusers folder, or a "
                                                "pipeline folder: its transformer/)")
    x.add_argument("--out", required=True, help="folder to write (config.json, diffusion_pytorch_model.safetensors)")
    args = p.parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"ltx2 {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
