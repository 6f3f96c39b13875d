#!/usr/bin/env bash
# HFD's `base` variant within an hour of a 2-core CPU, then Kodak from real files beside
# classical codecs (the README's bullet on it says what such a run shows).
#   DATA=../shared/data/photos KODAK=../shared/data/kodak launch/hfd_base_cpu.sh runs/hfd_base
# The models are base's (autoencoder N=128, M=192; UNet 64·[1,2,4]); what is cut for the CPU is
# the crop (128 for stage 1, 64 for stage 2), the batch (8) and the steps (1300 + 300, about
# 25 + 30 minutes here). Stage 2 diffuses the residual over the stage-1 reconstruction
# (`decoder.target=residual`), which a few hundred steps can learn; the paper's target is the
# image. Extra flags go to the training run; STEPS sets the sampler steps of the evaluation,
# QUALITIES_<CODEC> the classical sweeps (default: each codec's own).
set -euo pipefail
root="${1:?root directory for the run}"; shift
python="${PYTHON:-python}"
: "${DATA:?set DATA to a folder of training photos}" "${KODAK:?set KODAK to the Kodak folder}"
"$python" -m jaxcodec.train --config configs/hfd.py:base --workdir "$root/w" \
  --config.data.path="$DATA" --config.data.crop_size=128 --config.batch_size=8 \
  --config.total_steps=1300 --config.optimizer.lr=3e-4 --config.ema_decay=0.99 \
  --config.checkpoint_every=100 --config.log_every=25 --config.eval_every=0 \
  --config.real_file_eval=False --config.decoder.target=residual \
  --config.stage2.total_steps=300 --config.stage2.batch_size=8 \
  --config.stage2.data.crop_size=64 --config.stage2.optimizer.lr=3e-4 \
  --config.stage2.optimizer.warmup_steps=20 --config.stage2.ema_decay=0.95 "$@"
evaluate=("$python" -m jaxcodec.evaluate --data "$KODAK" --metrics psnr,lpips,dists)
"${evaluate[@]}" --checkpoint "$root/w/stage1" --name hfd-base-stage1 --out "$root/kodak/stage1"
"${evaluate[@]}" --checkpoint "$root/w/stage2" --name hfd-base-stage2 --out "$root/kodak/stage2" \
  --option steps="${STEPS:-2}"
for codec in jpeg webp avif heic; do
  var="QUALITIES_${codec^^}"
  "${evaluate[@]}" --codec "$codec" --out "$root/kodak/$codec" ${!var:+--qualities "${!var}"}
done
