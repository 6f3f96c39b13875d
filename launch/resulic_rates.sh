#!/usr/bin/env bash
# ResULIC's rate points (one model per start step add_steps, with the official rate weight of
# configs/resulic.py's RATE_POINTS): stage 1 (ε loss + rate + ‖z_c − z_0‖²), then stage 2
# (adds MSE + LPIPS on the decoded ẑ_0) from it; then every final model is evaluated on one
# folder of images from real files (their caption streams included in the bpp).
#   SD=/path/to/stable-diffusion-2-1-base DATA=/path/to/train/photos CAPTIONS=captions.json \
#     launch/resulic_rates.sh runs/resulic [extra flags]
# CAPTIONS (optional) is a JSON {image name: caption} of the training photos; EVAL_CAPTIONS
# (optional) one of the evaluation images, coded into their files. Extra flags go to every
# training run (e.g. --config.total_steps=1000), STEPS1 / STEPS2 to stage 1's / stage 2's alone
# (they win over the extra flags' total_steps); VARIANT=tiny for a smoke run on a CPU (then
# SD and DATA are not needed; its backbone is random unless BACKBONE names one trained by
# configs/ldm.py, WORKDIR/stage2/backbone); ADD_STEPS overrides the rate points.
set -euo pipefail
root="${1:?root directory for the runs}"; shift
variant="${VARIANT:-full}"
python="${PYTHON:-python}"
if [[ -n "${BACKBONE:-}" && "$variant" != tiny ]]; then
  echo "BACKBONE is for VARIANT=tiny (a folder from configs/ldm.py); full runs take SD" >&2; exit 2
fi
spec="$variant${BACKBONE:+,backbone=$BACKBONE}"
steps1=(${STEPS1:+--config.total_steps=$STEPS1})
steps2=(${STEPS2:+--config.total_steps=$STEPS2})
common=()
if [[ "$variant" != tiny ]]; then
  : "${SD:?set SD to a local diffusers SD 2.1-base folder}" "${DATA:?set DATA to a folder of training photos}"
  common+=(--config.model.sd_path="$SD" --config.data.path="$DATA")
  if [[ -n "${CAPTIONS:-}" ]]; then common+=(--config.data.captions="$CAPTIONS"); fi
fi
if [[ -n "${EVAL_CAPTIONS:-}" ]]; then common+=(--config.encode.captions="$EVAL_CAPTIONS"); fi
runs=()
for steps in ${ADD_STEPS:-50 100 150 200 300 405 495 600 705 795}; do
  dir="$root/add_$steps"
  "$python" -m jaxcodec.train --config "configs/resulic.py:$spec,stage=1,add_steps=$steps" \
    --workdir "$dir/stage1" "${common[@]}" "$@" ${steps1[@]+"${steps1[@]}"}
  "$python" -m jaxcodec.train --config "configs/resulic.py:$spec,stage=2,add_steps=$steps" \
    --workdir "$dir/stage2" --config.init_from="$dir/stage1" "${common[@]}" "$@" \
    ${steps2[@]+"${steps2[@]}"}
  runs+=("$dir/stage2")
done
"$python" -m jaxcodec.evaluate --checkpoint "${runs[@]}" --data "${EVAL_DATA:-../shared/data/kodak}" \
  --out "$root/eval"
