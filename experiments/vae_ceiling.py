"""The judges on real clips through a checkpoint's VAE, per framing.
python -m experiments.vae_ceiling CKPT n [wide,closeup]"""
import sys

import torch

from evaluate import evaluate_videos, reconstruction, summarise
from infra import checkpoint
from world.judges import load_judges
from world.synth import SynthWorld

torch.set_num_threads(1)


def fmt(s, keys):
    return " ".join(f"{k} {s[k]:.3f} [{s[k + '_ci'][0]:.3f}, {s[k + '_ci'][1]:.3f}]" for k in keys)


j = load_judges()
ckpt, n = sys.argv[1], int(sys.argv[2])
framings = sys.argv[3].split(",") if len(sys.argv) > 3 else ["wide", "closeup"]
pipe, _ = checkpoint.load(ckpt, "cpu")
vae = pipe.vae.eval()
for framing in framings:
    b = SynthWorld(framing=framing).sample(n, "test", pipe.frames, pipe.size, "cross", seed=0)
    with torch.no_grad():
        recon = torch.cat([vae.decode(vae.encode(b["video"][i:i + 16])) for i in range(0, n, 16)]).float()
        s = summarise(evaluate_videos(j, recon, b["ref"], b["prompt"], b["identity"]))
        r = reconstruction(vae, n, pipe.size, pipe.frames, 0, framing=framing)
    print(ckpt, framing, fmt(s, ("face_sim", "id_top1", "face_frames", "scene_acc", "action_acc")),
          {k: round(v, 2) for k, v in r.items()}, flush=True)
