#!/usr/bin/env bash
# Every check that needs a GPU, in one run of under 10 minutes (each step has its own time limit, 585 s in all):
#   1. the kernel's first GPU run (python -m fused.gpu_check: kernel parity on hardware, the attention benchmark
#      at N = 2560 / 6528 / 26112 against cuDNN and eager/compiled RoPE + SDPA, autotune choices with registers
#      and spills, a bf16 training step of `small` with each attention backend), one table
#   2. a bf16 train.py run with the Triton backend (2 steps of --stage dit on a 1-step VAE of `small`)
#   3. FSDP2 over the GPUs present (torchrun train.py --fsdp, 2 steps and a --resume), on the `small` preset
#   4. LTX-2.3 at full width: one 4096-wide, 32-head block of ltx2-video (bf16, 121 frames 512x768 + the
#      reference: 6,528 tokens), forward + backward time and peak memory; and the LTX-2.3 tests (tests/test_ltx2.py)
# Usage: bash scripts/gpu_checks.sh [LOG_DIR]   (default: $OUT if set, else gpu_checks/); prints a summary.
set -u
cd "$(dirname "$0")/.."
LOG="${1:-${OUT:-gpu_checks}}"
mkdir -p "$LOG"
unset TRITON_INTERPRET
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
PY="${PYTHON:-python}"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
SUMMARY=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $LOG/NAME.log, record pass/fail
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$LOG/$name.log" 2>&1
    local rc=$?
    SUMMARY+=("$(printf '%-22s %s (%ds)' "$name" "$([ $rc -eq 0 ] && echo ok || echo "FAILED rc=$rc")" $((SECONDS - start)))")
    tail -n 15 "$LOG/$name.log"
}

nvidia-smi >"$LOG/nvidia-smi.txt" 2>&1
[ "$NGPU" -ge 1 ] || { echo "no CUDA device visible to torch"; exit 1; }
step kernel_gpu_check 300 "$PY" -m fused.gpu_check
step vae_1_step 30 "$PY" train.py --stage vae --config small --steps 1 --batch 2 --no-progress --out "$LOG/run_vae"
step train_bf16_triton 45 "$PY" train.py --stage dit --config small --init "$LOG/run_vae" --attn triton --steps 2 \
    --batch 2 --no-progress --log-every 1 --out "$LOG/run_triton"
step fsdp2 60 torchrun --nproc_per_node "$NGPU" train.py --stage dit --config small --init "$LOG/run_vae" --fsdp \
    --grad-checkpoint --steps 2 --batch 2 --no-progress --log-every 1 --out "$LOG/run_fsdp"
step fsdp2_resume 45 torchrun --nproc_per_node "$NGPU" train.py --stage dit --config small --init "$LOG/run_vae" \
    --fsdp --grad-checkpoint --steps 3 --batch 2 --no-progress --log-every 1 --resume --out "$LOG/run_fsdp"
step ltx2_block 45 "$PY" - <<'PY'
import time
import torch
from model import DiT, with_overrides
from pipeline import PRESETS
cfg = with_overrides(PRESETS["ltx2-video"].dit, depth=1)
dit = DiT(cfg).cuda().to(torch.bfloat16)
T, h, w = 16, 16, 24  # 121 frames of 512x768 -> 16 x 16 x 24 latents, + one reference frame
z_t = torch.randn(1, 128, T, h, w, device="cuda", dtype=torch.bfloat16)
z_ref = torch.randn(1, 128, h, w, device="cuda", dtype=torch.bfloat16)
y = torch.randn(1, 256, 4096, device="cuda", dtype=torch.bfloat16)
mask = torch.ones(1, 256, dtype=torch.bool, device="cuda")
t = torch.tensor([0.5], device="cuda")
for k in range(3):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); start = time.perf_counter()
    dit(z_t, t, y, mask, z_ref=z_ref).float().square().mean().backward()
    torch.cuda.synchronize()
    print(f"run {k}: one ltx2-video block fwd+bwd, {T * h * w + h * w} tokens: {1e3 * (time.perf_counter() - start):.1f} ms, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
PY
step ltx2_tests 60 "$PY" -m pytest tests/test_ltx2.py -q -x
echo; echo "GPU checks ($NGPU GPU(s)); logs in $LOG:"
printf '  %s\n' "${SUMMARY[@]}"
! printf '%s\n' "${SUMMARY[@]}" | grep -q FAILED
