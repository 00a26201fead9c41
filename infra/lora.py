"""LoRA (Hu et al. 2021) in plain PyTorch, peft's conventions: a frozen linear layer W plus a low-rank update,
y = W x + (alpha / r) B A x, A [r, in] Kaiming-uniform, B [out, r] zero (so training starts from W). train.py
--lora-rank puts it on every DiT block's attention projections and FFN; checkpoints hold the merged weights
(W + (alpha / r) B A: what sample.py and `python -m ltx2 export` read) and the adapter alone (adapter.safetensors).
State-dict names: a wrapped `x.to_q` keeps `x.to_q.weight` / `.bias` (its base) and adds `x.to_q.lora_A.weight`,
`x.to_q.lora_B.weight`, as peft names them."""
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

LORA_TARGETS = re.compile(r"^blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out)|ff\.[02])$")  # in model.DiT


class LoRALinear(nn.Linear):
    """nn.Linear (frozen) + (alpha / r) lora_B(lora_A(x))."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__(base.in_features, base.out_features, base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the base's own tensors: no copy
        self.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's init: B A = 0 at the start
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank

    def forward(self, x):
        return super().forward(x) + self.scale * self.lora_B(self.lora_A(x))


def add_lora(model: nn.Module, rank: int, alpha: float, targets: re.Pattern = LORA_TARGETS) -> int:
    """Freeze `model` and wrap its linear layers whose names match `targets` in LoRALinear; returns how many."""
    model.requires_grad_(False)
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear and targets.match(name)]
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), rank, alpha))
    return len(names)


def is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def adapter_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a state dict."""
    return {k: v for k, v in state.items() if is_lora_key(k)}


def merged_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A state dict with LoRA tensors -> the plain one: each W + scale B A (in W's dtype), the LoRA tensors dropped."""
    out = {k: v for k, v in state.items() if not is_lora_key(k)}
    for key in state:
        if key.endswith(".lora_A.weight"):
            prefix = key[: -len(".lora_A.weight")]
            w = out[f"{prefix}.weight"]
            delta = state[f"{prefix}.lora_B.weight"].float() @ state[key].float()
            out[f"{prefix}.weight"] = (w.float() + scale * delta).to(w.dtype)
    return out


def save_adapter(folder: str | os.PathLike, adapter: dict[str, torch.Tensor], rank: int, alpha: float) -> None:
    """folder/adapter.safetensors (the LoRA tensors) and folder/adapter_config.json (r, lora_alpha, targets)."""
    folder = Path(folder)
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(folder / "adapter.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": alpha,
                                                            "target_modules": LORA_TARGETS.pattern}, indent=2))
