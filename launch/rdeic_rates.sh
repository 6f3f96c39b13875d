#!/usr/bin/env bash
# RDEIC's five rate points (one model per λ_r): stage 1 (independent timesteps), then stage 2
# (fixed-step fine-tuning: 2 steps for λ_r ≥ 1, 5 below) from it; then every final model is
# evaluated on one folder of images with the steps it was fine-tuned for.
#   SD=/path/to/stable-diffusion-2-1-base DATA=/path/to/train/photos launch/rdeic_rates.sh runs/rdeic [extra flags]
# Extra flags go to every training run (e.g. --config.total_steps=1000), STEPS1 / STEPS2 to
# stage 1's / stage 2's alone (they win over the extra flags' total_steps); VARIANT=tiny for a
# smoke run on a CPU (then SD and DATA are not needed; its backbone is random unless BACKBONE
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
fi
runs=()
for lambda_r in ${LAMBDAS:-2 1 0.5 0.25 0.1}; do
  dir="$root/lambda_$lambda_r"
  "$python" -m jaxcodec.train --config "configs/rdeic.py:$spec,stage=1,lambda_r=$lambda_r" \
    --workdir "$dir/stage1" "${common[@]}" "$@" ${steps1[@]+"${steps1[@]}"}
  "$python" -m jaxcodec.train --config "configs/rdeic.py:$spec,stage=2,lambda_r=$lambda_r" \
    --workdir "$dir/stage2" --config.init_from="$dir/stage1" "${common[@]}" "$@" \
    ${steps2[@]+"${steps2[@]}"}
  runs+=("$dir/stage2")
done
"$python" -m jaxcodec.evaluate --checkpoint "${runs[@]}" --data "${EVAL_DATA:-../shared/data/kodak}" \
  --out "$root/eval"
