"""Train the VAE, the text-to-video base model, or ST-DRC (paper Sec. 3.3).

    python train.py --stage vae --config tiny --out runs/vae
    python train.py --stage dit --config tiny --init runs/vae --ref none --out runs/base   # text-to-video base
    python train.py --stage dit --config tiny --init runs/base --out runs/stdrc              # ST-DRC fine-tune
    python train.py --stage dit --config ltx2 --init LTX-2.3/transformer --vae LTX-2.3/vae --data clips.embeds.jsonl
                                                    # ST-DRC on LTX-2.3 (prompt embeddings: python -m ltx2 encode-prompts)
    torchrun --nproc_per_node 2 train.py ...                                                # DDP (gloo on CPU)
    torchrun --nproc_per_node 8 train.py ... --fsdp                                         # FSDP2, no full copy per rank

Every flag is a field of TrainConfig (`--help` lists them). Checkpoints: see infra/checkpoint.py;
`--resume` continues a run folder exactly (weights, EMA, optimizer, step; the data and noise
of step k are drawn from a generator seeded by (seed, rank, k)).
"""
import contextlib
import copy
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.checkpoint
from tqdm import tqdm

import data
from faces import embed_faces
from guidance import dropout_masks, shift_for_tokens, shift_time
from infra import checkpoint
from infra.cli import add_flags, config_from, flag, parser
from infra.errors import UsageError, check_attn, run_main
from infra.distributed import full_state, peak_memory_gb, restore, setup_distributed, wrap
from infra.lora import adapter_state_dict, is_lora_key, merged_state_dict, save_adapter
from infra.surgery import apply_lora, build
from losses import add_noise, clean_estimate, flow_loss, identity_loss, temporal_identity_loss, total_loss, w_aux
from pipeline import generate
from rope import REFERENCE_MODES
from text import EMPTY_PROMPT, check_text_width, pad_prompt_embeds, text_pair, tokenize
from vae import compute_latent_stats, face_weight, latent_weight
from world.face_nets import load_embedder
from world.synth import FRAMINGS, REF_SOURCES


T_DISTS = ("logit-normal", "uniform")  # --t-dist, see sample_t


# ----------------------------------------------------------------------------- config

@dataclass
class TrainConfig:
    stage: str = flag("dit", "vae: train the VAE then compute its latent statistics; dit: train text encoder + DiT",
                      choices=("vae", "dit"))
    config: str = flag("tiny", "model and world size preset: tiny (CPU tests), demo (the bundled model), small (the "
                               "synthetic world on one GPU), or ltx2 (LTX-2.3 weights from --init and --vae, "
                               "precomputed prompt embeddings)")
    data: str = flag("synth", "'synth' for the synthetic world, or a JSONL manifest of real videos")
    out: str = flag("runs/exp", "run folder: checkpoints, metrics.jsonl, sample GIFs")
    init: str = flag("", "checkpoint to start from (dit stage: a trained VAE or a base model; --config ltx2: an "
                         "LTX-2.3 transformer, diffusers folder or .safetensors)")
    vae: str = flag("", "the VAE: with --config ltx2 the LTX-2 VAE folder (diffusers AutoencoderKLLTX2Video; default: "
                        "vae/ of the pipeline folder given to --init); otherwise a checkpoint of this preset whose VAE "
                        "replaces --init's (e.g. a VAE trained further)")
    latent_channels: int = flag(0, "latent channels of the VAE, and so the DiT's input width (0: the preset's); pass "
                                   "it again to --resume such a run or to take its VAE with --vae (an --init DiT of "
                                   "another width keeps its blocks, its input and output layers start fresh)")
    size: int = flag(0, "frame size in pixels (0: the preset's; ltx2: 512)", lo=0, hi=4096)
    height: int = flag(0, "frame height in pixels for non-square video (0: --size)", lo=0, hi=4096)
    width: int = flag(0, "frame width in pixels for non-square video (0: --size); manifest data only", lo=0, hi=4096)
    frames: int = flag(0, "frames per clip, 1 + tau k (0: the preset's; ltx2: 121)", lo=0, hi=10_000)
    resume: bool = flag(False, "continue the run in --out from its latest checkpoint that loads")
    overwrite: bool = flag(False, "start afresh in an --out that holds an earlier run: deletes its checkpoints, "
                                  "metrics and samples")
    ref: str = flag("tass", "reference RoPE placement (tass, shared, far, tass_t0) or 'none' for the text-to-video base",
                    choices=(*REFERENCE_MODES, "none"))
    steps: int = flag(1000, "optimizer steps", lo=1)
    batch: int = flag(8, "clips per process and step", lo=1)
    lr: float = flag(5e-5, "AdamW learning rate (paper: 5e-5)", lo=0.0)
    weight_decay: float = flag(0.0, "AdamW weight decay", lo=0.0)
    warmup: int = flag(50, "linear learning-rate warm-up steps", lo=0)
    cooldown: int = flag(0, "linear learning-rate decay over the last N of --steps, to lr / N at the last (0: constant after warm-up)", lo=0)
    grad_clip: float = flag(1.0, "gradient norm clip (0: off)", lo=0.0)
    ema: float = flag(0.999, "EMA decay of the trained weights (0: off)", lo=0.0, hi=1.0)
    p_y: float = flag(0.05, "probability of dropping the text (paper: 0.05)", lo=0.0, hi=1.0)
    p_r: float = flag(0.20, "probability of dropping the reference (paper: 0.20)", lo=0.0, hi=1.0)
    lambda_id: float = flag(0.1, "weight of L_id (paper: 0.1); needs --face-model")
    lambda_tic: float = flag(0.05, "weight of L_tic (paper: 0.05); needs --face-model")
    gamma: float = flag(1.0, "exponent of w_aux(t) = (SNR / (SNR + 1))^gamma")
    face_weight: float = flag(0.0, "extra weight alpha inside a square around each frame's face landmarks (weight 1 + "
                                   "alpha there, 1 elsewhere; 0: off): vae stage on the L1 reconstruction, dit stage "
                                   "on the flow loss per latent token (not in the paper)")
    t_dist: str = flag("logit-normal", "training times t: logit-normal shifted like the sampler (LTX) or uniform on "
                                       "(0, 1), which trains the low-noise steps that draw fine detail far more often",
                       choices=T_DISTS)
    face_model: str = flag("", "face embedder for L_id / L_tic (faces.py); empty: flow loss only")
    id_frames: int = flag(2, "latent frames decoded for the face loss (from the first)", lo=1)
    ref_source: str = flag("cross", "synthetic references: cross (other clip of the identity), portrait (another "
                                     "shot posed like an ID photo: centred, fixed size, mild pose), in_clip, moved (the in-clip frame "
                                     "shifted by up to synth.MOVE_PX pixels), or mix",
                           choices=(*REF_SOURCES, "mix"))
    framing: str = flag("wide", "synthetic camera framing: wide (the original world) or closeup (head and shoulders "
                                "filling the frame; world.synth.frame_state)", choices=FRAMINGS)
    augment: bool = flag(True, "reference augmentation (flip, rotation, crop, colour jitter)")
    fsdp: bool = flag(False, "shard the dit stage with FSDP2 under torchrun: no rank copies the whole DiT (weights "
                             "memory-mapped, the model on the meta device until fully_shard per block; bf16 params, "
                             "fp32 reduce on GPU), rank 0 sends each its shards; checkpoints gather full state dicts "
                             "on rank 0; CPU: gloo, fp32")
    bf16: bool = flag(True, "bf16 compute on GPU: autocast, and bf16 parameters under --fsdp")
    grad_checkpoint: bool = flag(False, "activation checkpointing of every DiT block")
    depth: int = flag(0, "DiT blocks (0: the preset's); more than --init's DiT has grows it: the new blocks are "
                         "appended as the identity (zero output projections), so training starts from --init's function")
    rope_theta: float = flag(0.0, "RoPE base theta of the DiT (0: --init's, else the preset's); pair m of an axis "
                                   "with n pairs turns at theta^(-m/n) per latent position")
    lora_rank: int = flag(0, "LoRA rank r on the DiT blocks' attention and FFN, the rest frozen (infra/lora.py; 0: "
                             "full fine-tuning); checkpoints hold the merged weights and adapter.safetensors", lo=0)
    lora_alpha: float = flag(0.0, "LoRA alpha: the update is scaled by alpha / r (0: alpha = r)", lo=0.0)
    attn: str = flag("torch", "attention backend: torch or triton (a CUDA GPU)", choices=("torch", "triton"))
    log_every: int = flag(10, "steps between metric lines", lo=1)
    save_every: int = flag(500, "steps between checkpoints (and at the end)", lo=1)
    sample_every: int = flag(0, "steps between sample GIFs (0: off)", lo=0)
    keep: int = flag(2, "checkpoints kept in the run folder", lo=1)
    seed: int = flag(0, "seed of weights, data and noise", lo=0, hi=2**31 - 1)
    workers: int = flag(2, "data loader workers for manifest data", lo=0)
    fps: float = flag(8.0, "frame rate clips are sampled at (manifest data) and written at", lo=1e-3)
    progress: bool = flag(True, "progress bar on rank 0")


def parse_args(argv=None) -> TrainConfig:
    return config_from(TrainConfig, add_flags(parser("train.py", __doc__), TrainConfig).parse_args(argv))


# ----------------------------------------------------------------------------- build: the trained module around the pipeline (infra/surgery.py builds the pipeline itself)

class VAETrainer(nn.Module):
    """The VAE's training losses as a forward (so DDP/FSDP see the VAE)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, video, weight=None):
        return self.vae.loss(video, weight)


class Denoiser(nn.Module):
    """Text encoder (None with precomputed prompt embeddings) + DiT: what the dit stage trains (one
    module, so DDP/FSDP see both)."""

    def __init__(self, text, dit):
        super().__init__()
        self.text, self.dit = text, dit

    def forward(self, tokens, mask, z_t, t, z_ref=None, ref_keep=None, embeds=None):
        y = self.text(tokens, mask) if embeds is None else embeds
        return self.dit(z_t, t, y, mask, z_ref=z_ref, ref_keep=ref_keep)


def check_run(cfg: TrainConfig, device) -> None:
    """The flags that only make sense together, checked before any work starts."""
    check_attn(cfg.attn, device)
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume continues the run in --out, --overwrite deletes it: pass one of them")
    if cfg.stage == "dit" and not (cfg.init or cfg.vae or cfg.resume) and cfg.config != "ltx2":
        raise UsageError("--stage dit trains on a frozen VAE and a fresh one is random: pass --init <a run of "
                         "--stage vae, or a base model> or --vae <a run of --stage vae>")


# ----------------------------------------------------------------------------- data

def batches(cfg: TrainConfig, pipe, rank: int, world: int, device):
    """Yields (step_generator, batch) forever; synthetic batches are a pure function of the step."""
    if cfg.data == "synth" and pipe.hw[0] != pipe.hw[1]:
        sys.exit(f"train.py: the synthetic world renders square frames; {pipe.hw[0]}x{pipe.hw[1]} needs --data <manifest>")
    if cfg.data == "synth":
        def synth(step):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank * 7_919 + step)
            return g, data.synth_batch(cfg.batch, pipe.size, pipe.frames, g, cfg.ref_source, device,
                                             framing=cfg.framing)
        return synth
    dataset = data.ManifestDataset(cfg.data, pipe.frames, pipe.hw, cfg.fps, train=True, seed=cfg.seed)
    sampler = torch.utils.data.DistributedSampler(dataset, world, rank, seed=cfg.seed) if world > 1 else None
    loader = torch.utils.data.DataLoader(dataset, cfg.batch, sampler=sampler, shuffle=sampler is None,
                                         num_workers=cfg.workers, collate_fn=data.collate, drop_last=True, persistent_workers=cfg.workers > 0)
    if len(loader) == 0:  # drop_last with fewer clips than a step needs would loop forever
        errors = [e for e in (dataset[k].get("error") for k in range(len(dataset))) if e]  # few: name them
        unreadable = f"; {len(errors)} of them cannot be read (first: {errors[0]})" if errors else ""
        sys.exit(f"train.py: {cfg.data} has {len(dataset)} clips, fewer than one step needs ({world} processes x "
                 f"--batch {cfg.batch}){unreadable}: lower --batch, fix or add clips")
    state = {"it": iter(loader), "epoch": 0, "skipped": 0, "read": 0, "error": ""}

    def manifest(step):
        while True:
            try:
                b = next(state["it"])
            except StopIteration:
                if not state["read"]:  # a whole epoch of unreadable clips would loop forever
                    sys.exit(f"train.py: no clip of {cfg.data} could be read ({state['skipped']} skipped; last: "
                             f"{state['error']}): fix the files or the manifest")
                state["epoch"] += 1
                if sampler is not None:
                    sampler.set_epoch(state["epoch"])
                state["it"] = iter(loader)
                continue
            state["skipped"] += b["skipped"]
            state["error"] = b["errors"][-1] if b["errors"] else state["error"]
            if "video" in b:
                state["read"] += 1
                break
        if state["skipped"] and rank == 0 and b["skipped"]:
            tqdm.write(f"skipped {state['skipped']} unreadable clips so far (last: {b['errors'][0]})")
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank * 7_919 + step)
        return g, {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
    return manifest


def pixel_face_weight(cfg, batch) -> torch.Tensor | None:
    """--face-weight's per-pixel weight of the batch's clips (vae.face_weight), or None when it is 0."""
    if not cfg.face_weight:
        return None
    if "landmarks" not in batch:
        raise SystemExit("train.py: --face-weight needs face landmarks: the synthetic world, or manifest lines "
                         "with \"faces\" (python -m interop.scrfd)")
    return face_weight(batch["landmarks"], batch["video"].shape[-1], cfg.face_weight, batch.get("face_present"))


def drop_text_embeds(batch, keep_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Text dropout (Sec. 3.4) on precomputed prompt embeddings: the empty prompt's where keep_y is
    False; both padded to one length -> (y [B, L, D], mask [B, L])."""
    B = keep_y.shape[0]
    y, mask = pad_prompt_embeds([*batch["prompt_embeds"], *batch["empty_prompt_embeds"]],
                                [*batch["prompt_attention_mask"], *batch["empty_prompt_attention_mask"]])
    keep = keep_y.to(y.device)
    return torch.where(keep[:, None, None], y[:B], y[B:]), torch.where(keep[:, None], mask[:B], mask[B:])


def text_inputs(pipe, batch, keep_y):
    """(tokens, mask, embeds) for the Denoiser: the batch's precomputed prompt embeddings when it has
    them, else its prompts tokenised for the text encoder; the empty prompt where the text is dropped."""
    if "prompt_embeds" in batch:
        y, mask = drop_text_embeds(batch, keep_y)
        return None, mask, check_text_width(y, pipe.dit.cfg.text_dim)
    if pipe.text is None:
        raise ValueError("this pipeline has no text encoder: train on a manifest whose lines carry \"prompt_embeds\" "
                         "(python -m ltx2 encode-prompts)")
    prompts = [p if k else EMPTY_PROMPT for p, k in zip(batch["prompt"], keep_y.tolist())]
    tokens, mask = tokenize(prompts, pipe.text.config.max_len)
    return tokens, mask, None


# ----------------------------------------------------------------------------- step

def sample_t(batch: int, mu: float, g: torch.Generator, dist: str = "logit-normal") -> torch.Tensor:
    """Training times: logit-normal u shifted like the sampler's schedule (guidance.shift_time), or uniform t."""
    if dist == "uniform":
        return torch.rand(batch, generator=g)
    return shift_time(torch.sigmoid(torch.randn(batch, generator=g)), mu)


def check_face_fields(batch) -> None:
    """The identity loss needs the clip's and the reference's landmarks: one-line SystemExit when a batch lacks them."""
    if missing := [k for k in ("landmarks", "ref_landmarks") if k not in batch]:
        raise SystemExit(f"train.py: the identity loss (--face-model) needs face landmarks of the clips and of their "
                         f"references, this batch has no {' or '.join(missing)}: run `python -m interop.scrfd "
                         f"--manifest M` and train on the manifest it writes")


def face_terms(cfg, pipe, embedder, z_t, t, v, batch, keep_ref):
    """L_id and L_tic on the clean estimate (Sec. 3.3): decode the first id_frames latent
    frames of z^_0 with the frozen VAE, align with the clip's landmarks, embed."""

    check_face_fields(batch)
    z0_hat = clean_estimate(z_t, t, v)[:, :, : cfg.id_frames]
    if cfg.grad_checkpoint:  # recompute the decoder's activations in the backward pass
        x = torch.utils.checkpoint.checkpoint(pipe.vae.decode, z0_hat, use_reentrant=False)
    else:
        x = pipe.vae.decode(z0_hat)  # [B, 3, F', S, S]
    B, _, Fp = x.shape[:3]
    e = embed_faces(embedder, x.transpose(1, 2).flatten(0, 1), batch["landmarks"][:, :Fp].flatten(0, 1)).view(B, Fp, -1)
    with torch.no_grad():
        e_ref = embed_faces(embedder, batch["ref"], batch["ref_landmarks"])  # the UNaugmented reference
    m = batch.get("face_present", torch.ones(B, Fp, dtype=torch.bool, device=x.device))[:, :Fp]
    m = m & keep_ref[:, None]  # no reference, no identity to keep
    if "ref_present" in batch:  # no face found in the reference: nothing to compare with
        m = m & batch["ref_present"][:, None].to(m.device)
    return identity_loss(e, e_ref, m), temporal_identity_loss(e, m)


def vae_step(cfg, model, batch, autocast):
    weight = pixel_face_weight(cfg, batch)
    with autocast:
        terms = model(batch["video"], weight)
    return terms["total"], {k: v.item() for k, v in terms.items()}, batch["video"][:, 0].numel()  # tokens: pixels


def dit_step(cfg, pipe, model, embedder, batch, g, autocast):
    device = batch["video"].device
    B = batch["video"].shape[0]
    with torch.no_grad():
        z_0 = pipe.vae.encode(batch["video"])  # frozen VAE
        ref_in = data.augment_reference(batch["ref"], g) if cfg.augment else batch["ref"]
        z_ref = pipe.vae.encode(ref_in)[:, :, 0] if cfg.ref != "none" else None
    keep_y, keep_r = dropout_masks(B, cfg.p_y, cfg.p_r, g)  # Sec. 3.4, independent dropout
    tokens, mask, embeds = text_inputs(pipe, batch, keep_y)
    T, H, W = z_0.shape[2:]
    t = sample_t(B, shift_for_tokens(T * H * W), g, cfg.t_dist).to(device)
    eps = torch.randn(z_0.shape, generator=g).to(device)
    z_t = add_noise(z_0, eps, t)
    keep_r = keep_r.to(device)
    with autocast:
        v = model(None if tokens is None else tokens.to(device), mask.to(device), z_t, t, z_ref=z_ref,
                  ref_keep=keep_r if z_ref is not None else None, embeds=None if embeds is None else embeds.to(device))
    weight = pixel_face_weight(cfg, batch)
    if weight is not None:  # per latent token (vae.latent_weight)
        weight = latent_weight(weight, pipe.vae.config.tau, pipe.vae.config.spatial)
    l_flow = flow_loss(v, z_0, eps, weight)
    logs = {"l_flow": l_flow.mean().item(), "w_aux": w_aux(t, cfg.gamma).mean().item()}
    l_id = l_tic = None
    if embedder is not None and z_ref is not None:
        with autocast:
            l_id, l_tic = face_terms(cfg, pipe, embedder, z_t, t, v.float(), batch, keep_r)
        logs.update(l_id=l_id.mean().item(), l_tic=l_tic.mean().item())
    loss = total_loss(l_flow, t, l_id, l_tic, cfg.lambda_id, cfg.lambda_tic, cfg.gamma)
    return loss, logs, B * (T + (z_ref is not None)) * H * W  # tokens: video + reference


# ----------------------------------------------------------------------------- loop

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, constant, then (--cooldown N) linear decay over the last N steps, ending at lr / N."""
    cool = (cfg.steps - step) / cfg.cooldown if cfg.cooldown else 1.0
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup), cool)


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], module: nn.Module, decay: float):
    for k, p in module.state_dict().items():
        if k in ema and p.dtype.is_floating_point:
            ema[k].lerp_(p.detach().to(ema[k].dtype), 1 - decay)


def open_metrics(path: Path, resumed_step: int | None):
    """metrics.jsonl to append to. On resume, first drop the rows a stopped run logged after its
    last checkpoint (and a line cut off mid-write), so each step is logged once."""
    def before_checkpoint(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= resumed_step
        except (ValueError, KeyError):
            return False

    if resumed_step is not None and path.exists():
        kept = "".join(line for line in path.read_text().splitlines(keepends=True) if before_checkpoint(line))
        checkpoint.write_text_atomic(path, kept)
    return open(path, "a")


def train(cfg: TrainConfig) -> Path:
    rank, world, device = setup_distributed(cfg)
    check_run(cfg, device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    if rank == 0:
        for line in checkpoint.clean_partial(out):
            print(f"train.py: {line} (left by an interrupted save)", file=sys.stderr)
    if world > 1:
        dist.barrier()
    src, state, notes = checkpoint.open_run(out, cfg.resume, cfg.overwrite, cfg.steps, rank == 0,  # FSDP: mmap
                                            map_location="cpu" if cfg.fsdp else device, mmap=cfg.fsdp)
    for line in notes:
        print(f"train.py: {line}", file=sys.stderr)
    if cfg.resume:
        cfg.init = str(src)
    pipe = build(cfg, device)
    apply_lora(cfg, pipe)
    trained = VAETrainer(pipe.vae) if cfg.stage == "vae" else Denoiser(pipe.text, pipe.dit)
    if cfg.stage == "dit":
        pipe.vae.requires_grad_(False).eval()
    model = wrap(trained, cfg, world, device)
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = {k: v.detach().float().clone() for k, v in trained.state_dict().items()
           if not cfg.lora_rank or is_lora_key(k)} if cfg.ema > 0 else None  # LoRA: the adapters' EMA only
    step = 0
    if cfg.resume:
        ema, step = restore(cfg, trained, opt, state), state["step"]
        if rank == 0:
            tqdm.write(f"train.py: resuming {src} at step {step}")
    embedder = None
    if cfg.stage == "dit" and cfg.face_model and cfg.ref != "none" and (cfg.lambda_id or cfg.lambda_tic):
        embedder = load_embedder(cfg.face_model).to(device)
    next_batch = batches(cfg, pipe, rank, world, device)
    autocast = torch.autocast("cuda", torch.bfloat16) if cfg.bf16 and device.type == "cuda" else contextlib.nullcontext()
    if rank == 0:
        if cfg.overwrite:
            checkpoint.clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    bar = tqdm(total=cfg.steps, initial=step, disable=rank != 0 or not cfg.progress, desc=f"{cfg.stage}")
    metrics = open_metrics(out / "metrics.jsonl", step if cfg.resume else None) if rank == 0 else None
    tic, tokens_seen = time.perf_counter(), 0
    while step < cfg.steps:
        g, batch = next_batch(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        model.train()
        if cfg.stage == "vae":
            loss, logs, tokens = vae_step(cfg, model, batch, autocast)
        else:
            loss, logs, tokens = dit_step(cfg, pipe, model, embedder, batch, g, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            logs["grad_norm"] = float(nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip))
        opt.step()
        if ema is not None:
            ema_update(ema, trained, cfg.ema)
        step += 1
        tokens_seen += tokens * world
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            dt = time.perf_counter() - tic
            row = {"step": step, "loss": loss.item(), **logs, "lr": lr_at(step - 1, cfg),
                   "tokens_per_s": tokens_seen / dt, "peak_mem_gb": peak_memory_gb(device)}
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            tic, tokens_seen = time.perf_counter(), 0
        if step % cfg.save_every == 0 or step == cfg.steps:
            raw, optim, full_ema = full_state(cfg, trained, opt, ema, rank)
            if rank == 0:
                save(cfg, out, pipe, raw, optim, full_ema, step, next_batch)
        if cfg.sample_every and step % cfg.sample_every == 0 and (rank == 0 or cfg.fsdp) and cfg.stage == "dit":
            write_sample(cfg, pipe, batch, out / f"sample_{step:06d}.gif" if rank == 0 else None)  # FSDP: all ranks run it
    bar.close()
    if metrics is not None:
        metrics.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


# ----------------------------------------------------------------------------- save

def export_weights(cfg, pipe, raw, ema, next_batch) -> dict[str, torch.Tensor]:
    """Inference weights: the frozen modules', then the EMA of what this stage trains (`raw`: its full state
    dict) in place of the raw weights; for the VAE, the per-channel latent statistics of those weights over
    a few training batches."""
    trained = {k.split(".")[0] for k in raw}
    weights = checkpoint.state_dict({name: m for name, m in pipe.modules().items() if name not in trained})
    weights.update({k: v.detach().contiguous() for k, v in raw.items()})
    weights.update({k: v.to(weights[k].dtype) for k, v in (ema or {}).items()})
    if cfg.stage == "vae":
        vae = copy.deepcopy(pipe.vae)
        checkpoint.load_state({"vae": vae}, weights)
        mean, std = compute_latent_stats(vae, (next_batch(10**9 + k)[1]["video"] for k in range(4)))
        pipe.vae.set_latent_stats(mean, std)  # the raw weights' decoder reads them too
        weights.update({"vae.latent_mean": mean, "vae.latent_std": std})
    return weights


def save(cfg, out, pipe, raw, optim, ema, step, next_batch):
    """Writes <out>/step_XXXXXX atomically, then points `latest` at it (rank 0 only; full_state gives the states)."""
    weights = export_weights(cfg, pipe, raw, ema, next_batch)
    adapter, alpha = adapter_state_dict(weights), cfg.lora_alpha or cfg.lora_rank  # LoRA: saved alone, and merged
    weights = merged_state_dict(weights, alpha / cfg.lora_rank) if adapter else weights
    state = {"raw": raw, "optimizer": optim, "ema": ema, "step": step, "fsdp": cfg.fsdp}
    name = f"step_{step:06d}"
    checkpoint.save(out / name, pipe, weights, state, extra={"preset": cfg.config, "stage": cfg.stage, "step": step})
    if adapter:
        save_adapter(out / name, adapter, cfg.lora_rank, alpha)
    checkpoint.write_latest(out, name)
    for old in checkpoint.step_folders(out)[: -cfg.keep]:
        shutil.rmtree(old, ignore_errors=True)
    tqdm.write(f"train.py: saved {out / name} (step {step})")


def write_sample(cfg, pipe, batch, path):
    text = None
    if "prompt_embeds" in batch:
        text = text_pair(*(batch[k][0] for k in ("prompt_embeds", "prompt_attention_mask", "empty_prompt_embeds",
                                                  "empty_prompt_attention_mask")))
    video = generate(pipe, batch["ref"][0] if cfg.ref != "none" else None, batch["prompt"][0], steps=20,
                     progress=False, text=text)
    if path is not None:
        data.save_video(path, video, pipe.fps)


def main(argv=None) -> int:
    return run_main("train.py", lambda a: train(parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
