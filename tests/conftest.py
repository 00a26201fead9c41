"""Without a GPU, run Triton kernels in the CPU interpreter. Triton reads TRITON_INTERPRET when a
kernel is decorated (when `kernels` is imported), so it is set here, before any test module."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
