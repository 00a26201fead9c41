"""The paper's ablation on the synthetic world, trained and scored by one command.

Rows (cumulative, as in the paper's table; rows 2-5 sample with standard CFG, the reference
inside the conditional stream: v = v_0 + s_y (v_yr - v_0), which is decoupled_cfg with s_r = s_y):

  1 base: text-to-video, no reference (--ref none), sampled text-only (s_r = 0)
  2 + in-context concat with shared coordinates (T, i, j)     --ref shared --no-augment
  3 + TASS-RoPE (T, H+i, W+j)                                  --ref tass   --no-augment
  4 + reference augmentation                                   --ref tass
  5 + ID loss (L_id, L_tic with the world's face embedder)     --ref tass --face-model
  6 + decoupled CFG: row 5's model, s_y = 5, s_r = 7.5

Every row starts from the same base (row 1's checkpoint), trains the same steps with the same
seed and is scored on the same held-out set (test identities, cross-clip references,
evaluate.benchmark: every figure with its 95% bootstrap interval). The placement probe adds
`far` (T+K, i, j) beside shared and TASS (no augmentation, standard CFG) and compares copy-paste.

    python -m experiments.ablation --vae assets/stdrc-demo --base-steps 4000 --steps 3000 --n 128 --out runs/ablation
    python -m experiments.ablation --quick --out /tmp/abl     # minutes: checks the pipeline end to end (CI)

A row whose final checkpoint exists is not trained again, and a stopped row resumes (--resume),
so the command can be rerun until it completes. Writes OUT/ablation.md and OUT/ablation.json.
"""
import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import evaluate
import train
from infra.cli import add_flags, config_from, flag
from world.synth import FRAMINGS

FACE_MODEL = "assets/face_model"
# name -> (train flags on top of the base, s_r at sampling: None = s_y, i.e. standard CFG)
ROWS = {
    "1 base (text-to-video)": (None, 0.0),
    "2 + concat, shared (T,i,j)": (["--ref", "shared", "--no-augment"], None),
    "3 + TASS-RoPE": (["--ref", "tass", "--no-augment"], None),
    "4 + reference augmentation": (["--ref", "tass"], None),
    "5 + ID loss": (["--ref", "tass", "--face-model", FACE_MODEL], None),
    "6 + decoupled CFG": ("5 + ID loss", 7.5),
}
PROBE = {"shared": "2 + concat, shared (T,i,j)", "tass": "3 + TASS-RoPE", "far": None}
FAR_FLAGS = ["--ref", "far", "--no-augment"]


def slug(name: str) -> str:
    """Row name -> folder name: "2 + concat, shared (T,i,j)" -> "2-concat-shared-t-i-j"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_training(flags: list[str], out: Path, steps: int, save_every: int) -> Path:
    """train.py with `flags` into `out` to `steps`; skipped when done, resumed when stopped."""
    final = out / f"step_{steps:06d}"
    if final.is_dir():
        return final
    resume = ["--resume"] if (out / "latest").exists() else []
    train.train(train.parse_args(flags + ["--steps", str(steps), "--save-every", str(save_every), "--out", str(out),
                                          "--no-progress"] + resume))
    return final


@dataclass
class AblationConfig:
    quick: bool = flag(False, "tiny preset, a few steps, 4 clips: the pipeline end to end")
    config: str = flag("demo", "model preset (pipeline.PRESETS)")
    vae: str = flag("assets/stdrc-demo", "checkpoint whose VAE every row uses (quick: one trained here)")
    framing: str = flag("wide", "synthetic camera framing", choices=FRAMINGS)
    base_steps: int = flag(4000, "steps of the text-to-video base (row 1)", lo=1)
    steps: int = flag(3000, "fine-tuning steps of each row from the base", lo=1)
    batch: int = flag(16, "clips per step", lo=1)
    lr: float = flag(5e-4, "AdamW learning rate", lo=0.0)
    n: int = flag(128, "held-out clips scored per row", lo=1)
    sample_steps: int = flag(30, "sampling steps", lo=1)
    s_text: float = flag(5.0, "text guidance scale s_y")
    seed: int = flag(0, "seed of training and of the held-out set", lo=0)
    out: str = flag("runs/ablation", "folder of the runs, ablation.md and ablation.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = config_from(AblationConfig, add_flags(p, AblationConfig).parse_args(argv))
    if args.quick:
        args.config, args.base_steps, args.steps, args.batch, args.n, args.sample_steps = "tiny", 2, 2, 2, 4, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--stage", "dit", "--config", args.config, "--batch", str(args.batch), "--lr", str(args.lr),
              "--warmup", str(min(50, args.steps)), "--ema", "0.995", "--seed", str(args.seed),
              "--framing", args.framing, "--keep", "1"]
    save_every = max(1, min(250, args.steps))
    vae = args.vae
    if args.quick:  # a throw-away tiny VAE so the dit stage has a trained latent
        vae = str(run_training(["--stage", "vae", "--config", "tiny", "--batch", "2", "--warmup", "1",
                                "--framing", args.framing], out / "vae", 2, 2))
    base = run_training(common + ["--init", vae, "--ref", "none"], out / "base", args.base_steps,
                        max(1, min(250, args.base_steps)))
    ckpts = {"1 base (text-to-video)": base}
    for name, (flags, _) in ROWS.items():
        if isinstance(flags, list):
            ckpts[name] = run_training(common + ["--init", str(base)] + flags, out / slug(name), args.steps, save_every)
    ckpts["6 + decoupled CFG"] = ckpts["5 + ID loss"]
    far = run_training(common + ["--init", str(base)] + FAR_FLAGS, out / "probe-far", args.steps, save_every)

    judges = evaluate.load_judges()
    table, probe = {}, {}

    def score(ckpt, s_r):
        rows = evaluate.benchmark(judges, ckpt, args.n, args.sample_steps, args.s_text, s_r, args.seed,
                                  ref="cross", framing=args.framing)
        real, *_, model = rows.values()
        if "real videos" not in table:
            table["real videos"] = real
        return model

    for name, (_, s_r) in ROWS.items():
        table[name] = score(ckpts[name], args.s_text if s_r is None else s_r)
    for placement, row in PROBE.items():
        probe[placement] = table[row] if row else score(far, args.s_text)
    text = ["## Ablation (held-out identities, cross-clip references, 95% bootstrap intervals)", "",
            f"config {args.config}, framing {args.framing}, base {args.base_steps} steps, rows +{args.steps} steps, "
            f"n = {args.n}, {args.sample_steps} sampling steps, s_y = {args.s_text}", "",
            evaluate.markdown_table(table), "", "## Placement probe (no augmentation, standard CFG)", "",
            evaluate.markdown_table(probe), ""]
    (out / "ablation.md").write_text("\n".join(text))
    (out / "ablation.json").write_text(json.dumps({"rows": table, "probe": probe, "args": vars(args)}, indent=2))
    print("\n".join(text))
    print(f"wrote {out / 'ablation.md'} and {out / 'ablation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
