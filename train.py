"""Train the VAE, the text-to-video base model, or ST-DRC (paper Sec. 3.3).

    python train.py --stage vae --config tiny --out runs/vae
    python train.py --stage dit --config tiny --init runs/vae --ref none --out runs/base   # text-to-video base
    python train.py --stage dit --config tiny --init runs/base --out runs/stdrc              # ST-DRC fine-tune
    python train.py --stage dit --config ltx2 --init LTX-2.3/transformer --vae LTX-2.3/vae --data clips.embeds.jsonl
                                                    # ST-DRC on LTX-2.3 (prompt embeddings: ltx2.py encode-prompts)
    torchrun --nproc_per_node 2 train.py ...                                                # DDP (gloo on CPU)
    torchrun --nproc_per_node 8 train.py ... --fsdp                                         # FSDP2, no full copy per rank

Every flag is a field of TrainConfig (`--help` lists them). Checkpoints: see checkpoint.py;
`--resume` continues a run folder exactly (weights, EMA, optimizer, step; the data and noise
of step k are drawn from a generator seeded by (seed, rank, k)).
"""
import argparse
import contextlib
import copy
import json
import os
import resource
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

import checkpoint
from cli import add_flags, config_from, flag
import data
from guidance import dropout_masks, shift_for_tokens, shift_time
from losses import add_noise, clean_estimate, flow_loss, identity_loss, temporal_identity_loss, total_loss, w_aux
import ltx2
from model import identity_blocks
from text import EMPTY_PROMPT, check_text_width, pad_prompt_embeds, text_pair, tokenize
from vae import face_weight, latent_weight


T_DISTS = ("logit-normal", "uniform")  # --t-dist, see sample_t


@dataclass
class TrainConfig:
    stage: str = flag("dit", "vae: train the VAE then compute its latent statistics; dit: train text encoder + DiT")
    config: str = flag("tiny", "model and world size preset: tiny (CPU tests), small (the shipped demo), or ltx2 "
                               "(LTX-2.3 weights from --init and --vae, precomputed prompt embeddings)")
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
    size: int = flag(0, "frame size in pixels (0: the preset's; ltx2: 512)")
    frames: int = flag(0, "frames per clip, 1 + tau k (0: the preset's; ltx2: 121)")
    resume: bool = flag(False, "continue the run in --out from its latest checkpoint")
    ref: str = flag("tass", "reference RoPE placement (tass, shared, far, tass_t0) or 'none' for the text-to-video base")
    steps: int = flag(1000, "optimizer steps")
    batch: int = flag(8, "clips per process and step")
    lr: float = flag(5e-5, "AdamW learning rate (paper: 5e-5)")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    warmup: int = flag(50, "linear learning-rate warm-up steps")
    cooldown: int = flag(0, "linear learning-rate decay over the last N of --steps, to lr / N at the last (0: constant after warm-up)")
    grad_clip: float = flag(1.0, "gradient norm clip (0: off)")
    ema: float = flag(0.999, "EMA decay of the trained weights (0: off)")
    p_y: float = flag(0.05, "probability of dropping the text (paper: 0.05)")
    p_r: float = flag(0.20, "probability of dropping the reference (paper: 0.20)")
    lambda_id: float = flag(0.1, "weight of L_id (paper: 0.1); needs --face-model")
    lambda_tic: float = flag(0.05, "weight of L_tic (paper: 0.05); needs --face-model")
    gamma: float = flag(1.0, "exponent of w_aux(t) = (SNR / (SNR + 1))^gamma")
    face_weight: float = flag(0.0, "extra weight alpha inside a square around each frame's face landmarks (weight 1 + "
                                   "alpha there, 1 elsewhere; 0: off): vae stage on the L1 reconstruction, dit stage "
                                   "on the flow loss per latent token (not in the paper)")
    t_dist: str = flag("logit-normal", "training times t: logit-normal shifted like the sampler (LTX) or uniform on "
                                       "(0, 1), which trains the low-noise steps that draw fine detail far more often")
    face_model: str = flag("", "face embedder for L_id / L_tic (faces.py); empty: flow loss only")
    id_frames: int = flag(2, "latent frames decoded for the face loss (from the first)")
    ref_source: str = flag("cross", "synthetic references: cross (other clip of the identity), portrait (another "
                                     "shot posed like an ID photo: centred, fixed size, mild pose), in_clip, or mix")
    framing: str = flag("wide", "synthetic camera framing: wide (the original world) or closeup (head and shoulders "
                                "filling the frame; synth.frame_state)")
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
    attn: str = flag("torch", "attention backend: torch or triton")
    log_every: int = flag(10, "steps between metric lines")
    save_every: int = flag(500, "steps between checkpoints (and at the end)")
    sample_every: int = flag(0, "steps between sample GIFs (0: off)")
    keep: int = flag(2, "checkpoints kept in the run folder")
    seed: int = flag(0, "seed of weights, data and noise")
    workers: int = flag(2, "data loader workers for manifest data")
    fps: float = flag(8.0, "frame rate clips are sampled at (manifest data) and written at")
    progress: bool = flag(True, "progress bar on rank 0")


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return config_from(TrainConfig, add_flags(p, TrainConfig).parse_args(argv))


# ----------------------------------------------------------------------------- distributed

def setup_distributed(cfg: TrainConfig):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python runs as a world of one."""
    if cfg.fsdp and cfg.stage != "dit":
        sys.exit("train.py: --fsdp shards the DiT (--stage dit); train the VAE without it")
    if cfg.fsdp and "RANK" not in os.environ:
        sys.exit("train.py: --fsdp shards over the processes torchrun starts: torchrun --nproc_per_node N train.py ... --fsdp")
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return rank, world, torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return rank, world, torch.device("cpu")


def wrap(module: nn.Module, cfg: TrainConfig, world: int, device) -> nn.Module:
    if cfg.fsdp:
        return shard(module, device, bf16=cfg.bf16 and device.type == "cuda")
    if world > 1:
        return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return module


def shard(module: nn.Module, device, bf16: bool) -> nn.Module:
    """FSDP2 for the Denoiser without a full copy on any device: rank 0's module (its tensors memory-mapped
    from the checkpoint files, or a fresh preset's) is the source; every rank moves its module to the meta
    device (fp32 master weights), applies fully_shard to each DiT block, the DiT, the text encoder and the
    root, allocates only its own shards (to_empty) and receives them from rank 0 one tensor at a time."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    source = module.state_dict() if dist.get_rank() == 0 else {}
    module.to(device="meta", dtype=torch.float32)  # rank 0's source keeps its own tensors
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for unit in [*module.dit.blocks, module.dit, module.text]:  # the DiT and text encoder on their own: sampling calls them
        if unit is not None:
            fully_shard(unit, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    module.to_empty(device=device)
    set_model_state_dict(module, source, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    module.dit.reset_rope_table()  # a non-persistent buffer: not in the state dict
    local, total = sum(p.to_local().numel() for p in module.parameters()), sum(p.numel() for p in module.parameters())
    print(f"train.py: FSDP rank {dist.get_rank()} of {dist.get_world_size()} holds {local:,} of {total:,} parameters",
          flush=True)
    return module


def full_state(cfg, trained, opt, ema, rank) -> tuple[dict, dict, dict | None]:
    """(raw weights, optimizer state, EMA) for a checkpoint: the live ones, or under FSDP full tensors gathered
    onto rank 0's CPU one at a time (a collective: every rank calls it; the others get empty dicts)."""
    if not cfg.fsdp:
        return trained.state_dict(), opt.state_dict(), ema
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    raw, optim = get_model_state_dict(trained, options=options), get_optimizer_state_dict(trained, opt, options=options)
    if ema is None:
        return raw, optim, None
    full = {}
    for k, v in ema.items():
        v = v.full_tensor() if isinstance(v, DTensor) else v
        if rank == 0:
            full[k] = v.cpu()
    return raw, optim, full


def restore(cfg, trained, opt, state: dict) -> dict | None:
    """Load a checkpoint's state.pt (raw weights and optimizer) into the trained module; returns its EMA, under
    FSDP as this rank's shards (raw and optimizer are broadcast from rank 0, the EMA sliced on each rank)."""
    if state.get("fsdp", False) != cfg.fsdp:
        was = "with" if state.get("fsdp") else "without"
        sys.exit(f"train.py: the checkpoint was written {was} --fsdp: resume it {was} --fsdp (any number of processes)")
    if not cfg.fsdp:
        trained.load_state_dict(state["raw"])
        opt.load_state_dict(state["optimizer"])
        return state["ema"]
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    first = dist.get_rank() == 0
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(trained, state["raw"] if first else {}, options=options)
    set_optimizer_state_dict(trained, opt, state["optimizer"] if first else {}, options=options)
    if state["ema"] is None:
        return None
    like = trained.state_dict()  # FSDP's layout of each tensor
    return {k: distribute_tensor(v, like[k].device_mesh, like[k].placements, src_data_rank=None)
            if isinstance(like[k], DTensor) else v.to(like[k].device) for k, v in state["ema"].items()}


# ----------------------------------------------------------------------------- the trained module

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


def sample_t(batch: int, mu: float, g: torch.Generator, dist: str = "logit-normal") -> torch.Tensor:
    """Training times: logit-normal u shifted like the sampler's schedule (guidance.shift_time), or uniform t."""
    if dist == "uniform":
        return torch.rand(batch, generator=g)
    return shift_time(torch.sigmoid(torch.randn(batch, generator=g)), mu)


def face_terms(cfg, pipe, embedder, z_t, t, v, batch, keep_ref):
    """L_id and L_tic on the clean estimate (Sec. 3.3): decode the first id_frames latent
    frames of z^_0 with the frozen VAE, align with the clip's landmarks, embed."""
    from faces import embed_faces

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
    return identity_loss(e, e_ref, m), temporal_identity_loss(e, m)


# ----------------------------------------------------------------------------- loop helpers

def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, constant, then (--cooldown N) linear decay over the last N steps, ending at lr / N."""
    cool = (cfg.steps - step) / cfg.cooldown if cfg.cooldown else 1.0
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup), cool)


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], module: nn.Module, decay: float):
    for k, p in module.state_dict().items():
        if p.dtype.is_floating_point:
            ema[k].lerp_(p.detach().to(ema[k].dtype), 1 - decay)


def preset_checkpoint(path: str, preset: str, flag: str) -> tuple[Path, dict]:
    """The checkpoint folder `path` names, which must have been trained with --config preset (one-line exit),
    and its config.json."""
    src = checkpoint.resolve(path)
    saved = json.loads((src / "config.json").read_text())
    trained = saved.get("preset")
    if trained != preset:
        sys.exit(f"train.py: {flag} {src} was trained with --config {trained}, not {preset}; "
                 f"pass --config {trained} or start from a checkpoint of {preset}")
    return src, saved


def deepened(weights: dict[str, torch.Tensor], dit: nn.Module) -> dict[str, torch.Tensor]:
    """--init's weights for a DiT with as many or more blocks: the blocks the checkpoint lacks are `dit`'s own,
    made the identity (model.identity_blocks), so the deeper DiT computes --init's function at step 0."""
    n = len({k.split(".")[2] for k in weights if k.startswith("dit.blocks.")})
    if n == 0 or n == len(dit.blocks):
        return weights
    if n > len(dit.blocks):
        raise ValueError(f"a DiT of {len(dit.blocks)} blocks is shallower than --init's DiT ({n} blocks; a DiT only "
                         f"grows): pass --depth {n} or more, also with --resume of a grown run")
    identity_blocks(dit, n)
    return {**checkpoint.state_dict({"dit": dit}), **weights}


def rewidened(weights: dict[str, torch.Tensor], dit: nn.Module) -> dict[str, torch.Tensor]:
    """--init's weights for a DiT on latents of another width (a --vae with more or fewer latent channels):
    the DiT's 1x1x1 patchify and output projection, the only layers that see a latent channel, are `dit`'s own
    (fresh: random in, zero out); every block, the text path and the timestep embedding are --init's."""
    own = {k: v for k, v in checkpoint.state_dict({"dit": dit}).items() if k.split(".")[1] in ("patchify", "proj_out")}
    if all(weights.get(k, v).shape == v.shape for k, v in own.items()):
        return weights
    print(f"train.py: --init's DiT takes {weights['dit.patchify.weight'].shape[1]} latent channels, the VAE gives "
          f"{dit.cfg.in_channels}: its patchify and proj_out start fresh", file=sys.stderr)
    return {**weights, **own}


def build(cfg: TrainConfig, device) -> checkpoint.Pipeline:
    """The pipeline: fresh for this preset, from --init (a checkpoint of the same preset), or for
    --config ltx2 from LTX-2.3 weights (or a checkpoint of an ltx2 run, rebuilt from its config)."""
    overrides = dict(ref_mode=None if cfg.ref == "none" else cfg.ref, attn_backend=cfg.attn, depth=cfg.depth or None,
                     grad_checkpoint=cfg.grad_checkpoint, fps=cfg.fps, rope_theta=cfg.rope_theta or None)
    from_ltx2 = bool(cfg.init) and ltx2.find_transformer(cfg.init) is not None
    if from_ltx2 and cfg.config != "ltx2":
        sys.exit(f"train.py: --init {cfg.init} is an LTX-2.3 transformer checkpoint: pass --config ltx2")
    if cfg.config == "ltx2" and cfg.stage == "vae":
        sys.exit("train.py: --config ltx2 keeps the LTX-2 VAE frozen; --stage vae trains the project's own VAE")
    if cfg.config == "ltx2" and cfg.latent_channels:
        sys.exit("train.py: --latent-channels sizes the project's own VAE; the LTX-2 VAE has its own 128")
    if cfg.config == "ltx2" and cfg.depth:
        sys.exit("train.py: --depth grows the project's own DiT presets; an LTX-2.3 DiT keeps its 48 blocks")
    if cfg.config == "ltx2" and not cfg.init:
        sys.exit("train.py: --config ltx2 starts from LTX-2.3 weights: pass --init <LTX-2.3 transformer: diffusers "
                 "folder or .safetensors> and --vae <LTX-2 VAE folder>")
    try:
        if from_ltx2:
            dtype = None if cfg.fsdp else torch.float32  # FSDP: left memory-mapped, shard() makes fp32 shards
            pipe = ltx2.build_pipeline(cfg.init, cfg.vae, cfg.size, cfg.frames, dtype=dtype, **overrides)
        else:
            src, saved = preset_checkpoint(cfg.init, cfg.config, "--init") if cfg.init else (None, None)
            if cfg.config == "ltx2":  # a checkpoint of an ltx2 run describes its own pipeline
                pipe, _ = checkpoint.load(src)
                for name, value in overrides.items():  # runtime switches; the blocks share this config
                    if value is not None:
                        setattr(pipe.dit.cfg, name, value)
            else:
                if src and not cfg.rope_theta:  # --init's (and so --resume's) RoPE unless --rope-theta changes it
                    overrides["rope_theta"] = saved["dit"]["rope_theta"]
                pipe = checkpoint.build_pipeline(cfg.config, cfg.latent_channels, **overrides)
                if src:
                    weights = checkpoint.load_file(str(src / "model.safetensors"))
                    if cfg.vae:  # --vae's VAE replaces --init's, which may be of another latent width
                        weights = rewidened({k: v for k, v in weights.items() if not k.startswith("vae.")}, pipe.dit)
                    checkpoint.load_state(pipe.modules(), deepened(weights, pipe.dit), strict=False)
                if cfg.vae:  # another checkpoint's VAE (e.g. one trained further) in place of --init's
                    vae_src, _ = preset_checkpoint(cfg.vae, cfg.config, "--vae")
                    checkpoint.load_state({"vae": pipe.vae}, checkpoint.load_file(str(vae_src / "model.safetensors")))
            pipe.size, pipe.frames, pipe.fps = cfg.size or pipe.size, cfg.frames or pipe.frames, cfg.fps
        pipe.check()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"train.py: {e}")
    if cfg.fsdp:  # the trained modules stay on the CPU (memory-mapped where loaded): wrap() shards them
        pipe.vae.to(device)
        return pipe
    return pipe.to(device)


def batches(cfg: TrainConfig, pipe, rank: int, world: int, device):
    """Yields (step_generator, batch) forever; synthetic batches are a pure function of the step."""
    if cfg.data == "synth":
        def synth(step):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank * 7_919 + step)
            return g, data.synth_batch(cfg.batch, pipe.size, pipe.frames, g, cfg.ref_source, device,
                                             framing=cfg.framing)
        return synth
    dataset = data.ManifestDataset(cfg.data, pipe.frames, pipe.size, cfg.fps, train=True, seed=cfg.seed)
    sampler = torch.utils.data.DistributedSampler(dataset, world, rank, seed=cfg.seed) if world > 1 else None
    loader = torch.utils.data.DataLoader(dataset, cfg.batch, sampler=sampler, shuffle=sampler is None,
                                         num_workers=cfg.workers, collate_fn=data.collate, drop_last=True, persistent_workers=cfg.workers > 0)
    if len(loader) == 0:  # drop_last with fewer clips than a step needs would loop forever
        sys.exit(f"train.py: {cfg.data} has {len(dataset)} clips, fewer than one step needs ({world} processes x "
                 f"--batch {cfg.batch}): lower --batch or add clips")
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


# ----------------------------------------------------------------------------- stages

def pixel_face_weight(cfg, batch) -> torch.Tensor | None:
    """--face-weight's per-pixel weight of the batch's clips (vae.face_weight), or None when it is 0."""
    if not cfg.face_weight:
        return None
    if "landmarks" not in batch:
        raise SystemExit("train.py: --face-weight needs face landmarks: the synthetic world, or manifest lines "
                         "with \"faces\" (python faces.py landmarks)")
    return face_weight(batch["landmarks"], batch["video"].shape[-1], cfg.face_weight, batch.get("face_present"))


def vae_step(cfg, model, batch, autocast):
    weight = pixel_face_weight(cfg, batch)
    with autocast:
        terms = model(batch["video"], weight)
    return terms["total"], {k: v.item() for k, v in terms.items()}, batch["video"][:, 0].numel()  # tokens: pixels


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
                         "(python ltx2.py encode-prompts)")
    prompts = [p if k else EMPTY_PROMPT for p, k in zip(batch["prompt"], keep_y.tolist())]
    tokens, mask = tokenize(prompts, pipe.text.config.max_len)
    return tokens, mask, None


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
    if cfg.t_dist not in T_DISTS:
        raise SystemExit(f"train.py: --t-dist {cfg.t_dist!r}: use {' or '.join(T_DISTS)}")
    rank, world, device = setup_distributed(cfg)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    if cfg.resume:
        src = checkpoint.resolve(out)
        cfg.init = str(src)
    pipe = build(cfg, device)
    trained = VAETrainer(pipe.vae) if cfg.stage == "vae" else Denoiser(pipe.text, pipe.dit)
    if cfg.stage == "dit":
        pipe.vae.requires_grad_(False).eval()
    model = wrap(trained, cfg, world, device)
    opt = torch.optim.AdamW(trained.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = {k: v.detach().float().clone() for k, v in trained.state_dict().items()} if cfg.ema > 0 else None
    step = 0
    if cfg.resume:  # FSDP: memory-mapped, read where used
        state = torch.load(src / "state.pt", map_location="cpu" if cfg.fsdp else device, weights_only=False, mmap=cfg.fsdp)
        ema, step = restore(cfg, trained, opt, state), state["step"]
    embedder = None
    if cfg.stage == "dit" and cfg.face_model and cfg.ref != "none" and (cfg.lambda_id or cfg.lambda_tic):
        from faces import load_embedder
        embedder = load_embedder(cfg.face_model).to(device)
    next_batch = batches(cfg, pipe, rank, world, device)
    autocast = torch.autocast("cuda", torch.bfloat16) if cfg.bf16 and device.type == "cuda" else contextlib.nullcontext()
    if rank == 0:
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


def export_weights(cfg, pipe, raw, ema, next_batch) -> dict[str, torch.Tensor]:
    """Inference weights: the frozen modules', then the EMA of what this stage trains (`raw`: its full state
    dict) in place of the raw weights; for the VAE, the per-channel latent statistics of those weights over
    a few training batches."""
    trained = {k.split(".")[0] for k in raw}
    weights = checkpoint.state_dict({name: m for name, m in pipe.modules().items() if name not in trained})
    weights.update({k: v.detach().contiguous() for k, v in raw.items()})
    weights.update({k: v.to(weights[k].dtype) for k, v in (ema or {}).items()})
    if cfg.stage == "vae":
        from vae import compute_latent_stats

        vae = copy.deepcopy(pipe.vae)
        checkpoint.load_state({"vae": vae}, weights)
        mean, std = compute_latent_stats(vae, (next_batch(10**9 + k)[1]["video"] for k in range(4)))
        pipe.vae.set_latent_stats(mean, std)  # the raw weights' decoder reads them too
        weights.update({"vae.latent_mean": mean, "vae.latent_std": std})
    return weights


def save(cfg, out, pipe, raw, optim, ema, step, next_batch):
    """Writes <out>/step_XXXXXX atomically, then points `latest` at it (rank 0 only; full_state gives the states)."""
    weights = export_weights(cfg, pipe, raw, ema, next_batch)
    state = {"raw": raw, "optimizer": optim, "ema": ema, "step": step, "fsdp": cfg.fsdp}
    name = f"step_{step:06d}"
    checkpoint.save(out / name, pipe, weights, state, extra={"preset": cfg.config, "stage": cfg.stage, "step": step})
    checkpoint.write_latest(out, name)
    for old in sorted(p for p in out.glob("step_*") if p.is_dir())[: -cfg.keep]:
        shutil.rmtree(old, ignore_errors=True)


def write_sample(cfg, pipe, batch, path):
    from sample import generate

    text = None
    if "prompt_embeds" in batch:
        text = text_pair(*(batch[k][0] for k in ("prompt_embeds", "prompt_attention_mask", "empty_prompt_embeds",
                                                  "empty_prompt_attention_mask")))
    video = generate(pipe, batch["ref"][0] if cfg.ref != "none" else None, batch["prompt"][0], steps=20,
                     progress=False, text=text)
    if path is not None:
        data.save_video(path, video, pipe.fps)


if __name__ == "__main__":
    train(parse_args())
