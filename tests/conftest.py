"""Without a GPU, run Triton kernels in the CPU interpreter. Triton reads TRITON_INTERPRET when a
kernel is decorated (when `fused` is imported), so it is set here, before any test module.
Tests use one fixed kernel config instead of autotuning (ROPE_ATTENTION_AUTOTUNE=0), so a GPU
run compiles one variant per dtype and head dim rather than timing every config."""
import os

import torch

os.environ.setdefault("ROPE_ATTENTION_AUTOTUNE", "0")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
