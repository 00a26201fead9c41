"""Real clips (no model) scored by the judges under each framing. python -m experiments.judges [n]"""
import sys

import torch

from evaluate import evaluate_videos, summarise
from world.judges import load_judges
from world.synth import SynthWorld

torch.set_num_threads(1)


def fmt(s, keys):
    return " ".join(f"{k} {s[k]:.3f} [{s[k + '_ci'][0]:.3f}, {s[k + '_ci'][1]:.3f}]" for k in keys)


j = load_judges()
n = int(sys.argv[1]) if len(sys.argv) > 1 else 64
for framing in ("wide", "closeup"):
    for ref in ("cross", "in_clip"):
        b = SynthWorld(framing=framing).sample(n, "test", 9, 32, ref, seed=0)
        with torch.no_grad():
            s = summarise(evaluate_videos(j, b["video"], b["ref"], b["prompt"], b["identity"]))
        print(framing, ref, fmt(s, ("face_sim", "id_top1", "face_frames", "scene_acc", "action_acc", "copy_paste")), flush=True)
