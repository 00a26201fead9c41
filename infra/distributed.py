"""Distribution for train.py: DDP by torchrun's environment variables, FSDP2 for large DiTs, full
state dicts for checkpoints, peak memory."""
import os
import resource
import sys

import torch
import torch.distributed as dist
import torch.nn as nn


def setup_distributed(cfg):
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


def wrap(module: nn.Module, cfg, world: int, device) -> nn.Module:
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


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
