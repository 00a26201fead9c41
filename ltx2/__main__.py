"""python -m ltx2 memory-plan | encode-prompts | export (see the package docstring)."""
import argparse
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import ltx2
from infra.cli import add_flags, config_from, flag
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


@dataclass
class MemoryPlanConfig:
    frames: int = flag(121, "pixel frames per clip (1 + 8k)", lo=1)
    height: int = flag(512, "pixel height", lo=32)
    width: int = flag(768, "pixel width", lo=32)
    batch: int = flag(32, "global batch (no gradient accumulation)", lo=1)
    no_ema: bool = flag(False, "without the EMA weights (train.py --ema 0)")
    lora_rank: int = flag(0, "also the plan for LoRA of this rank (train.py --lora-rank)", lo=0)


@dataclass
class EncodePromptsConfig:
    manifest: str = flag("", "JSONL manifest with a \"caption\" per line (required)")
    gemma: str = flag("", "local diffusers LTX-2.3 pipeline folder (model_index.json, text_encoder/, tokenizer/, "
                          "connectors/; required)")
    out: str = flag("", "folder for the embeddings (empty: prompt_embeds/ beside the manifest)")
    max_length: int = flag(1024, "Gemma tokens per prompt (LTX2Pipeline's default)", lo=1)
    device: str = flag("cpu", "cpu or cuda")


@dataclass
class ExportConfig:
    ckpt: str = flag("", "checkpoint or run folder written by train.py --config ltx2 (required)")
    base: str = flag("", "the LTX-2.3 transformer it was trained from (diffusers folder, or a pipeline folder: its "
                         "transformer/; required)")
    out: str = flag("", "folder to write (config.json, diffusion_pytorch_model.safetensors; required)")


CONFIGS = {"memory-plan": (MemoryPlanConfig, "memory per GPU for full fine-tuning of ltx2-video, 1-64 GPUs"),
           "encode-prompts": (EncodePromptsConfig, "precompute LTX-2.3 prompt embeddings (Gemma 3 + text connector) "
                                                   "for a manifest's captions"),
           "export": (ExportConfig, "a checkpoint of train.py --config ltx2 -> diffusers' LTX2VideoTransformer3DModel "
                                    "folder (the audio branch copied from --base)")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ltx2", description=ltx2.__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, (cls, help) in CONFIGS.items():
        add_flags(sub.add_parser(name, help=help, description=help), cls)
    parsed = p.parse_args(argv)
    cls = CONFIGS[parsed.command][0]
    args = config_from(cls, parsed)
    missing = [f.name for f in fields(cls) if "required" in f.metadata["help"] and not getattr(args, f.name)]
    if missing:
        p.error(f"{parsed.command} needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
    try:
        COMMANDS[parsed.command](args)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"ltx2 {parsed.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
