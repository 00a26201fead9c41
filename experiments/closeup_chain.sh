#!/bin/bash
# Unattended chain (2026-12-07): close-up VAE fine-tune -> close-up ST-DRC DiT. Idempotent: rerun it to resume.
# nohup bash experiments/closeup_chain.sh >> runs/closeup/driver.log 2>&1 &   (the copy that ran: runs/closeup/driver.sh)
# Never start it while its train.py still runs (ps): two trainings would write the same folder.
set -u
cd "$(dirname "$0")/.."  # the checkout whose runs/ holds the chain
export OMP_NUM_THREADS=1
PY="${PYTHON:-python}"
VAE=runs/closeup-vae; DIT=runs/closeup-dit; KEEP=runs/closeup/milestones
VAE_STEPS=1200; DIT_STEPS=40000
mkdir -p $KEEP
echo "$(date -Is) driver start (pid $$)"
if [ ! -d $VAE/step_$(printf %06d $VAE_STEPS) ]; then
  R=""; [ -e $VAE/latest ] && R="--resume"
  $PY train.py --stage vae --config demo --init assets/stdrc-demo --framing closeup --face-weight 4 \
    --steps $VAE_STEPS --cooldown 400 --batch 8 --lr 1e-3 --warmup 50 --ema 0.995 --save-every 200 --keep 3 \
    --out $VAE $R || { echo "$(date -Is) vae failed"; exit 1; }
  echo "$(date -Is) vae done"
fi
# milestone copier: weights + config of every 1000th DiT step (state.pt only in the run folder's last --keep)
( while true; do
    for d in $DIT/step_*000; do
      [ -f "$d/model.safetensors" ] || continue
      n=$(basename $d); [ -d $KEEP/$n ] && continue
      sleep 5; mkdir -p $KEEP/$n.tmp && cp $d/model.safetensors $d/config.json $KEEP/$n.tmp/ && mv $KEEP/$n.tmp $KEEP/$n
    done
    sleep 60
  done ) &
COPIER=$!
R=""; [ -e $DIT/latest ] && R="--resume"
$PY train.py --stage dit --config demo --init assets/stdrc-demo --vae $VAE/step_$(printf %06d $VAE_STEPS) \
  --framing closeup --batch 16 --lr 5e-4 --warmup 50 --ema 0.995 --steps $DIT_STEPS \
  --save-every 250 --keep 4 --out $DIT $R
echo "$(date -Is) dit exited rc=$?"
sleep 90; kill $COPIER
