#!/usr/bin/env bash
# DiffCR's rate points (one model per λ_r, meant to span the four released models, ≈ 0.06 to
# 0.02 bpp on Kodak): stage 1 (compressor + FaSE: rate, ĉ and ẑ_0 losses, consistency against
# an EMA target), then stage 2 (compressor frozen, FaSE through the two-step sampler with
# MSE + LPIPS) from it; then every final model is evaluated from real files on one folder.
#   SD=/path/to/stable-diffusion-2-1-base CLIP=/path/to/open_clip_vit_h14 DATA=/path/to/photos \
#     launch/diffcr_rates.sh runs/diffcr [extra flags]
# Extra flags go to every training run (e.g. --config.total_steps=1000), STEPS1 / STEPS2 to
# stage 1's / stage 2's alone (they win over the extra flags' total_steps); without CLIP the UNet's
# context is the empty prompt (--config.model.condition=empty_prompt); VARIANT=tiny for a smoke
# run on a CPU (then SD, CLIP and DATA are not needed; its backbone is random unless BACKBONE
# names one trained by configs/ldm.py, WORKDIR/stage2/backbone); LAMBDAS overrides the rate points.
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
  if [[ -n "${CLIP:-}" ]]; then
    common+=(--config.model.clip_path="$CLIP")
  else
    common+=(--config.model.condition=empty_prompt)
  fi
fi
runs=()
for lambda_r in ${LAMBDAS:-1 0.5 0.25 0.1}; do
  dir="$root/lambda_$lambda_r"
  "$python" -m jaxcodec.train --config "configs/diffcr.py:$spec,stage=1,lambda_r=$lambda_r" \
    --workdir "$dir/stage1" ${common[@]+"${common[@]}"} "$@" ${steps1[@]+"${steps1[@]}"}
  "$python" -m jaxcodec.train --config "configs/diffcr.py:$spec,stage=2,lambda_r=$lambda_r" \
    --workdir "$dir/stage2" --config.init_from="$dir/stage1" ${common[@]+"${common[@]}"} "$@" \
    ${steps2[@]+"${steps2[@]}"}
  runs+=("$dir/stage2")
done
"$python" -m jaxcodec.evaluate --checkpoint "${runs[@]}" --data "${EVAL_DATA:-../shared/data/kodak}" \
  --out "$root/eval"
