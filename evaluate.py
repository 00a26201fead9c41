"""Metrics of identity-preserving text-to-video (the paper's evaluation table, Sec. 4).

    python evaluate.py --benchmark --ckpt runs/stdrc          # synthetic test set: real videos vs the model
    python evaluate.py --videos out/a.mp4 --refs face.png --prompts "a person nods in the snow"

The judges (the world's face detector and embedder, scene and action classifiers) are
world/face_nets.py and world/judges.py.

Videos are [B, 3, F, S, S] in [-1, 1], each with a reference face image [3, S, S] and a prompt.
Faces are found by the synthetic world's detector (world.face_nets.SynthFaceDetector) and embedded by its
embedder, or by ArcFace with --face-onnx. Per video:

- face_sim (FaceSim): mean cos(e_f, e_ref) over up to 16 evenly spaced frames, e_f the frame's
  face embedding and e_ref the reference's. Frames where no face is detected are skipped and
  counted: face_frames is the share with a face (a video with none has no face_sim).
- temporal_id (temporal identity consistency): mean cos(e_f, e_bar) of those frames to the
  normalised mean of their embeddings.
- id_top1 (identification, --benchmark only): 1 when the reference nearest to the video's e_bar,
  among the references of all the test clips, is of the video's own identity. It asks what a
  person asks of a generated face: whose is it? Chance is about 1 / (test clips).
- scene_acc, action_acc (prompt alignment, the CLIP-Score analogue on this world): the scene
  and the action recognised in the video by the world's classifiers (SceneNet on frames,
  ActionNet on detected landmark trajectories and aligned face crops) are the ones the
  prompt names (synth.parse_prompt).
- copy_pose, copy_scene, copy_paste (how much of the reference leaks into the video):
  mean over face frames of exp(-d_f / POSE_SCALE), d_f the mean distance of the frame's
  landmarks to the reference's in face sizes; the probability the scene classifier gives the
  reference's scene; copy_paste is their mean (the scene's alone without a face). Higher =
  more copied.
- smoothness: 1 - mean |x_f - (x_{f-1} + x_{f+1}) / 2| / 2, the error of predicting each frame
  from its neighbours, in units of the pixel range (VBench's motion smoothness with its learned
  interpolator replaced by the neighbours' mean); 1 for a still or perfectly linear video.
- dynamic (dynamic degree): mean |x_{f+1} - x_f| / 2 over pixels and frame pairs, 0 for a
  still video; motion: mean landmark displacement between consecutive face frames, in face sizes.

Every synthetic metric is checked in tests/test_evaluate.py: ground-truth clips score high,
a reference of another identity gives chance FaceSim, mismatched prompts chance accuracy,
in-clip references more copy-paste than cross-clip ones, a still video no dynamics.
"""
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from data import AV_SUFFIXES, PIL_SUFFIXES, contact_sheet, load_image, read_frames, resize_center_crop, to_tensor
from faces import embed_faces
from infra import checkpoint
from infra.cli import add_flags, config_from, flag, parser
from infra.errors import check_device, check_suffix, check_writable, run_main
from pipeline import generate
from world.face_nets import FACE_THRESHOLD, SYNTH_FACE_MODEL, resize_frames
from world.judges import WORLD_MODEL, WORLD_SIZE, Judges, accuracy, face_size, load_judges
from world.synth import FRAMINGS, REF_SOURCES, SynthWorld, parse_prompt

POSE_SCALE = 0.25    # face sizes at which copy_pose has fallen to 1/e
FACE_FRAMES = 16     # frames per video for face_sim and temporal_id


# ----------------------------------------------------------------------------- metrics

def evenly_spaced(n: int, k: int) -> torch.Tensor:
    """k evenly spaced indices of range(n) (all of them when n <= k)."""
    return torch.linspace(0, n - 1, min(n, k)).round().long()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Mean of x where mask, NaN where mask is empty."""
    mask = mask.to(x.dtype)
    return (x * mask).sum(dim) / mask.sum(dim)  # 0 / 0 = NaN


def top1_identification(e_bar, e_ref, ref_present, identities) -> torch.Tensor:
    """1 where the present reference of largest cos to video b's mean face e_bar[b] has b's
    identity, else 0: e_bar, e_ref [B, D] unit vectors, ref_present, identities [B]."""
    sim = (e_bar @ e_ref.T).masked_fill(~ref_present[None], -math.inf)
    return (identities[sim.argmax(1)] == identities).float()


@torch.no_grad()
def identity_metrics(embedder, videos, landmarks, present, refs, ref_landmarks, ref_present, identities=None) -> dict:
    """face_sim, temporal_id, face_frames and (given identities [B]) id_top1 [B] on FACE_FRAMES
    evenly spaced frames."""
    B, Fr = present.shape
    pick = evenly_spaced(Fr, FACE_FRAMES)
    e = embed_faces(embedder, videos[:, :, pick].transpose(1, 2).flatten(0, 1), landmarks[:, pick].flatten(0, 1))
    e, m = e.view(B, len(pick), -1), present[:, pick]
    e_ref = embed_faces(embedder, refs, ref_landmarks)
    face_sim = masked_mean((e * e_ref[:, None]).sum(-1), m)
    e_bar = F.normalize((e * m[..., None]).sum(1), dim=-1)
    temporal_id = masked_mean((e * e_bar[:, None]).sum(-1), m)
    id_top1 = torch.full((B,), math.nan, device=e.device) if identities is None else \
        torch.where(ref_present & m.any(1), top1_identification(e_bar, e_ref, ref_present, identities), math.nan)
    return {"face_sim": torch.where(ref_present, face_sim, math.nan), "id_top1": id_top1,
            "temporal_id": torch.where(m.sum(1) >= 2, temporal_id, math.nan),
            "face_frames": m.float().mean(1), "skipped_frames": (~m).sum(1).float()}


def smoothness(videos: torch.Tensor) -> torch.Tensor:
    """1 - mean |x_f - (x_{f-1} + x_{f+1}) / 2| / 2 per video [B] (NaN under 3 frames)."""
    middle = (videos[:, :, :-2] + videos[:, :, 2:]) / 2
    return 1 - (videos[:, :, 1:-1] - middle).abs().flatten(1).mean(1) / 2


def dynamic_degree(videos: torch.Tensor) -> torch.Tensor:
    """Mean |x_{f+1} - x_f| / 2 per video [B]: 0 for a still video."""
    return (videos[:, :, 1:] - videos[:, :, :-1]).abs().flatten(1).mean(1) / 2


def landmark_motion(points: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean landmark displacement between consecutive face frames, in face sizes: [B]."""
    step = (points[:, 1:] - points[:, :-1]).norm(dim=-1).mean(-1) / face_size(points[:, :-1])
    return masked_mean(step, present[:, 1:] & present[:, :-1])


def copy_pose(points, present, ref_points, ref_present) -> torch.Tensor:
    """Mean over face frames of exp(-d_f / POSE_SCALE), d_f the mean landmark distance frame vs
    reference in the reference's face sizes (normalised coordinates [B, F, 5, 2] / [B, 5, 2])."""
    d = (points - ref_points[:, None]).norm(dim=-1).mean(-1) / face_size(ref_points)[:, None]
    return torch.where(ref_present, masked_mean(torch.exp(-d / POSE_SCALE), present), math.nan)


def labels_of(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(action, scene) indices the prompts name, -1 where none or several."""
    parsed = torch.tensor([parse_prompt(p) for p in prompts]).view(-1, 2)
    return parsed[:, 0], parsed[:, 1]


@torch.no_grad()
def evaluate_videos(judges: Judges, videos: torch.Tensor, refs: torch.Tensor, prompts: list[str],
                    identities: torch.Tensor | None = None) -> dict:
    """Every metric of every video: videos [B, 3, F, S, S], refs [B, 3, S, S] -> {name: [B]};
    id_top1 needs the identities [B] of the references (NaN without)."""
    B, _, Fr, S, _ = videos.shape
    frames = videos.transpose(1, 2).flatten(0, 1)
    landmarks, score = judges.detector.detect_batch(frames)
    landmarks, present = landmarks.view(B, Fr, 5, 2), (score > FACE_THRESHOLD).view(B, Fr)
    ref_landmarks, ref_score = judges.detector.detect_batch(refs)
    out = identity_metrics(judges.embedder, videos, landmarks, present, refs, ref_landmarks, ref_score > FACE_THRESHOLD,
                           identities)

    small = resize_frames(frames, WORLD_SIZE).view(B, Fr, 3, WORLD_SIZE, WORLD_SIZE)
    small_landmarks = (landmarks + 0.5) * (WORLD_SIZE / S) - 0.5
    scene_p = judges.scenes(small.flatten(0, 1)).softmax(-1).view(B, Fr, -1).mean(1)
    action_p = judges.actions(small, small_landmarks).softmax(-1)
    ref_scene = judges.scenes(resize_frames(refs, WORLD_SIZE)).argmax(-1)
    action, scene = labels_of(prompts)
    points, ref_points = (landmarks + 0.5) / S, (ref_landmarks + 0.5) / S  # normalised: size-free
    out.update({
        "scene_acc": accuracy(scene_p, scene), "action_acc": accuracy(action_p, action),
        "copy_pose": copy_pose(points, present, ref_points, ref_score > FACE_THRESHOLD),
        "copy_scene": scene_p.gather(1, ref_scene[:, None])[:, 0],
        "smoothness": smoothness(videos), "dynamic": dynamic_degree(videos),
        "motion": landmark_motion(points, present),
    })
    out["copy_paste"] = torch.stack([out["copy_pose"], out["copy_scene"]]).nanmean(0)  # the scene alone without faces
    return out


BOOTSTRAP = 2000  # resamples of the 95% bootstrap intervals


def bootstrap_ci(values: torch.Tensor, level: float = 0.95, resamples: int = BOOTSTRAP, seed: int = 0):
    """Percentile bootstrap interval of the mean of `values` [N] over the videos that have one
    (NaN: left out, as in summarise): resample them with replacement `resamples` times, take the
    (1-level)/2 and (1+level)/2 quantiles of the resampled means. (lo, hi); None without values.
    ID top-1 is resampled per video with the gallery of references held fixed."""
    v = values.double().flatten()
    v = v[~v.isnan()]
    if len(v) == 0:
        return None
    g = torch.Generator().manual_seed(seed)
    means = v[torch.randint(len(v), (resamples, len(v)), generator=g)].mean(1)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, q).tolist()
    return lo, hi


def summarise(per_video: dict) -> dict:
    """Mean of each metric over the videos that have it, with its 95% bootstrap interval
    (`<metric>_ci`: [lo, hi]); skipped_frames summed; counts."""
    summary = {k: torch.nanmean(v.float()).item() for k, v in per_video.items() if k != "skipped_frames"}
    summary = {k: None if math.isnan(v) else v for k, v in summary.items()}  # JSON has no NaN
    for k, v in per_video.items():
        if k != "skipped_frames" and summary.get(k) is not None:
            ci = bootstrap_ci(v)
            summary[f"{k}_ci"] = None if ci is None else list(ci)
    summary["skipped_frames"] = int(per_video["skipped_frames"].sum())
    summary["videos"] = len(per_video["face_sim"])
    summary["videos_with_face_sim"] = int((~per_video["face_sim"].isnan()).sum())
    return summary


TABLE = (("face_sim", "FaceSim ↑"), ("id_top1", "ID top-1 ↑"), ("face_frames", "face frames"), ("scene_acc", "scene acc ↑"),
         ("action_acc", "action acc ↑"), ("temporal_id", "temporal ID ↑"), ("smoothness", "smoothness ↑"),
         ("dynamic", "dynamic"), ("copy_paste", "copy-paste ↓"))


def markdown_table(rows: dict[str, dict]) -> str:
    """The paper-style table: one row per method (name -> summarise() output); a figure with an
    interval (`<metric>_ci`) prints as `mean [lo, hi]` (95% bootstrap over the videos)."""
    def cell(v, ci=None):
        if v is None or math.isnan(v):
            return "n/a"
        return f"{v:.3f}" if not ci else f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"

    lines = ["| | " + " | ".join(h for _, h in TABLE) + " |", "|---" * (len(TABLE) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(row.get(k), row.get(f"{k}_ci")) for k, _ in TABLE) + " |"
              for name, row in rows.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- benchmark on the synthetic world

def benchmark(judges: Judges, ckpt, n: int = 32, steps: int = 20, s_y: float = 5.0, s_r: float = 7.5,
              seed: int = 0, device="cpu", sheet: str | None = None, sheet_rows: int = 4,
              ref: str = "cross", framing: str = "wide") -> dict[str, dict]:
    """The synthetic test set (held-out identities, template prompts, references as SynthWorld.sample's
    `ref`: "cross", another clip of the identity, "portrait", one posed like an ID photo, or
    "in_clip", a frame of the clip itself, "moved", that frame shifted by up to synth.MOVE_PX pixels):
    its ground-truth clips ("real videos"), those clips through the VAE (the ceiling of any DiT
    on it) and the model's videos, each summarised. `sheet`:
    a PNG of the first sheet_rows clips, each generated row above the real clip of its identity."""
    pipe, _ = checkpoint.load(ckpt, device)
    batch = SynthWorld(framing=framing).sample(n, "test", pipe.frames, pipe.size, ref, seed=seed)
    start = time.perf_counter()
    videos = torch.stack([generate(pipe, batch["ref"][b], batch["prompt"][b], s_y, s_r, steps, seed + b, progress=False).cpu()
                          for b in range(n)])
    print(f"generated {n} videos in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if sheet:
        rows = [row for b in range(min(n, sheet_rows)) for row in
                ((batch["ref"][b], videos[b].float(), f"generated: {batch['prompt'][b]}"),
                 (batch["ref"][b], batch["video"][b], "real clip of the same identity"))]
        Path(sheet).parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(rows).save(sheet)
    ids = batch["identity"]
    print(f"id_top1 chance: {(ids[:, None] == ids[None]).float().mean():.3f}", file=sys.stderr)
    with torch.no_grad():  # decode(encode(x)): what any DiT on this VAE can at best give back
        recon = pipe.vae.eval().decode(pipe.vae.encode(batch["video"].to(device))).cpu().float()
    return {"real videos": summarise(evaluate_videos(judges, batch["video"], batch["ref"], batch["prompt"], ids)),
            "real videos through the VAE": summarise(evaluate_videos(judges, recon, batch["ref"], batch["prompt"], ids)),
            f"ST-DRC ({Path(ckpt).name})": summarise(evaluate_videos(judges, videos.float(), batch["ref"], batch["prompt"], ids))}


@torch.no_grad()
def reconstruction(vae, n: int = 64, size: int = 32, frames: int = 9, seed: int = 0, batch: int = 16,
                   sheet: str | None = None, sheet_rows: int = 4, framing: str = "wide") -> dict:
    """The VAE on held-out clips and reference images of the synthetic world: PSNR (dB, pixel
    range [-1, 1], so peak-to-peak 2) and mean absolute error of decode(encode(x)), the mean.
    `sheet`: a PNG of the first sheet_rows clips (reference | frames), each above its reconstruction."""
    world, sums = SynthWorld(framing=framing), {"video": [0.0, 0.0], "image": [0.0, 0.0]}
    for start in range(0, n, batch):
        b = world.sample(min(batch, n - start), "test", frames, size, "cross", seed=seed + start)
        out = {}
        for kind, x in (("video", b["video"]), ("image", b["ref"])):
            out[kind] = vae.decode(vae.encode(x)).reshape(x.shape)
            err = out[kind] - x
            sums[kind][0] += err.pow(2).mean().item() * len(x)
            sums[kind][1] += err.abs().mean().item() * len(x)
        if sheet and start == 0:
            Path(sheet).parent.mkdir(parents=True, exist_ok=True)
            contact_sheet([row for k in range(min(len(b["ref"]), sheet_rows)) for row in
                           ((b["ref"][k], b["video"][k], "held-out clip"),
                            (out["image"][k], out["video"][k], "decode(encode(x))"))]).save(sheet)
    return {f"{stat}_{kind}": value for kind, (mse, l1) in sums.items()
            for stat, value in (("psnr", 10 * math.log10(4 / (mse / n))), ("l1", l1 / n))}


# ----------------------------------------------------------------------------- command line

def read_videos(paths: list[str], refs: list[str], prompts: list[str]):
    """(video [1, 3, F, S, S], ref [1, 3, S, S], [prompt]) for each video file (or each one in
    a folder), centre-cropped square; one reference and one prompt each, or one for all."""
    files = []
    for p in map(Path, paths):
        files += sorted(q for q in p.iterdir() if q.suffix.lower() in AV_SUFFIXES | PIL_SUFFIXES) if p.is_dir() else [p]
    if not files:
        raise ValueError(f"no video files in {' '.join(paths)} (types: {' '.join(sorted(AV_SUFFIXES | PIL_SUFFIXES))})")
    if len(refs) not in (1, len(files)) or len(prompts) not in (1, len(files)):
        raise ValueError(f"{len(files)} videos need one reference and one prompt each, or one for all")
    for k, path in enumerate(files):
        frames = to_tensor(read_frames(path)[0])  # [F, 3, H, W]
        size = min(frames.shape[-2:])
        video = resize_center_crop(frames, size).transpose(0, 1)[None]
        yield video, load_image(refs[k % len(refs)], size)[None], [prompts[k % len(prompts)]]


@dataclass
class EvalConfig:
    benchmark: bool = flag(False, "generate the synthetic test set with --ckpt and score it")
    recon: bool = flag(False, "the VAE of --ckpt on --n held-out clips and images: PSNR and L1")
    ckpt: str = flag("", "checkpoint folder or run folder (train.py) for --benchmark and --recon")
    n: int = flag(32, "test clips", lo=1)
    steps: int = flag(20, "sampling steps", lo=1, hi=10_000)
    s_text: float = flag(5.0, "text guidance scale s_y")
    s_ref: float = flag(7.5, "reference guidance scale s_r")
    seed: int = flag(0, "seed of the test set and the noise", lo=0, hi=2**31 - 1)
    ref_source: str = flag("cross", f"--benchmark references, one of {REF_SOURCES}: cross (another clip of the "
                                    "identity: other pose, light, scene; the paper's setting), portrait (the same, "
                                    "posed like an ID photo), in_clip (a frame of the clip itself: the copy-paste trap) or "
                                    "moved (that frame shifted by up to synth.MOVE_PX pixels on each axis)",
                      choices=REF_SOURCES)
    framing: str = flag("wide", "--benchmark, --recon: synthetic camera framing, wide (the original world) or closeup "
                                "(head and shoulders filling the frame)", choices=FRAMINGS)
    videos: list = flag([], "video files or folders of them to score")
    refs: list = flag([], "reference image per video (or one for all)")
    prompts: list = flag([], "prompt per video (or one for all)")
    out: str = flag("out/evaluation", "writes OUT.json and OUT.md")
    sheet: str = flag("", "--benchmark: PNG of generated rows above the real clips of their identities; --recon: "
                          "held-out clips above their reconstructions")
    sheet_rows: int = flag(4, "--benchmark, --recon: test clips shown in --sheet", lo=1)
    face_model: str = flag(str(SYNTH_FACE_MODEL), "synthetic face detector + embedder folder")
    face_onnx: str = flag("", "InsightFace ArcFace .onnx to embed faces with instead")
    world_model: str = flag(str(WORLD_MODEL), "scene and action classifier folder")
    device: str = flag("cpu", "device for generation (cpu, cuda)")


def evaluate(argv=None) -> None:
    p = add_flags(parser("evaluate.py", __doc__), EvalConfig)
    args = config_from(EvalConfig, p.parse_args(argv))
    if not args.benchmark and not args.recon and not args.videos:
        p.error("pass --benchmark --ckpt PATH, --recon --ckpt PATH or --videos ...")
    if (args.benchmark or args.recon) and not args.ckpt:
        p.error("--benchmark and --recon need --ckpt")
    check_device(args.device)
    check_writable(args.out, "--out")
    if args.sheet:
        check_suffix(args.sheet, {".png", ".jpg", ".jpeg"}, "--sheet")
        check_writable(args.sheet, "--sheet")
    if args.recon:
        pipe, _ = checkpoint.load(args.ckpt)
        print(json.dumps(reconstruction(pipe.vae.eval(), args.n, pipe.size, pipe.frames, args.seed,
                                        sheet=args.sheet or None, sheet_rows=args.sheet_rows, framing=args.framing),
                         indent=2))
        return
    judges = load_judges(args.face_model, args.world_model, args.face_onnx or None)
    if args.benchmark:
        rows = benchmark(judges, args.ckpt, args.n, args.steps, args.s_text, args.s_ref, args.seed, args.device,
                         args.sheet or None, args.sheet_rows, args.ref_source, args.framing)
    else:
        per_video = [evaluate_videos(judges, *item) for item in read_videos(args.videos, args.refs, args.prompts)]
        rows = {"videos": summarise({k: torch.cat([m[k] for m in per_video]) for k in per_video[0]})}
    table = markdown_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def main(argv=None) -> int:
    return run_main("evaluate.py", evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
