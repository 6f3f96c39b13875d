#!/usr/bin/env bash
# One model for every rate: trains the rate-conditioned HFD autoencoder (both HFD stages) and
# RDEIC (stage 1, then stage 2 from it), then evaluates each over its quality range and at
# target sizes, from real files.
#   DATA=/path/to/train/photos SD=/path/to/stable-diffusion-2-1-base launch/variable_rate.sh runs/vr [extra flags]
# VARIANT=tiny (default full) for a CPU-sized run (then SD is not needed; DATA defaults to the
# photos inside scikit-image; RDEIC's backbone is random unless BACKBONE names one trained by
# configs/ldm.py, WORKDIR/stage2/backbone), KIND=affine for the λ-embedding modulation instead
# of gain units, METHODS="hfd" or "rdeic" for one of them, QUALITIES / TARGETS for the evaluation.
# Extra flags go to every training run (e.g. --config.total_steps=1000, which HFD's stage 2
# overrides with its own stage2.total_steps), STEPS1 / STEPS2 to stage 1's / stage 2's alone
# (they win over the extra flags' total_steps; HFD's STEPS2 sets its stage2.total_steps).
# To compare against fixed-rate models trained for the same steps, see
# benchmarks/variable_rate.py (launch/sweep_lambda.sh and launch/rdeic_rates.sh train those).
set -euo pipefail
root="${1:?root directory for the runs}"; shift
variant="${VARIANT:-full}"
kind="${KIND:-gain}"
python="${PYTHON:-python}"
if [[ -n "${BACKBONE:-}" && "$variant" != tiny ]]; then
  echo "BACKBONE is for VARIANT=tiny (a folder from configs/ldm.py); full runs take SD" >&2; exit 2
fi
eval_data="${EVAL_DATA:-../shared/data/kodak}"
qualities=(${QUALITIES:-0 20 40 60 80 100})
targets=(${TARGETS:-0.1 0.2 0.3 0.4})
steps1=(${STEPS1:+--config.total_steps=$STEPS1})
steps2=(${STEPS2:+--config.total_steps=$STEPS2})
hfd_steps2=(${STEPS2:+--config.stage2.total_steps=$STEPS2})  # HFD: both stages in one run
data=()
if [[ -n "${DATA:-}" ]]; then
  data+=(--config.data.source=folder --config.data.path="$DATA")
elif [[ "$variant" != tiny ]]; then
  : "${DATA:?set DATA to a folder of training photos}"
fi
for method in ${METHODS:-hfd rdeic}; do
  dir="$root/${method}_$kind"
  case "$method" in
    hfd)
      "$python" -m jaxcodec.train --config "configs/hfd.py:$variant,variable_rate=1,rate_kind=$kind" \
        --workdir "$dir" "${data[@]}" "$@" ${steps1[@]+"${steps1[@]}"} \
        ${hfd_steps2[@]+"${hfd_steps2[@]}"}
      models=("$dir/stage1" "$dir/stage2")
      ;;
    rdeic)
      sd=()
      if [[ "$variant" != tiny ]]; then
        : "${SD:?set SD to a local diffusers SD 2.1-base folder}"
        sd+=(--config.model.sd_path="$SD")
      fi
      for stage in 1 2; do
        from=() steps=(${steps1[@]+"${steps1[@]}"})
        [[ $stage == 2 ]] && from+=(--config.init_from="$dir/stage1") steps=(${steps2[@]+"${steps2[@]}"})
        "$python" -m jaxcodec.train \
          --config "configs/rdeic.py:$variant${BACKBONE:+,backbone=$BACKBONE},stage=$stage,variable_rate=1,rate_kind=$kind" \
          --workdir "$dir/stage$stage" "${from[@]}" "${sd[@]}" "${data[@]}" "$@" \
          ${steps[@]+"${steps[@]}"}
      done
      models=("$dir/stage2")
      ;;
    *) echo "unknown method $method (hfd, rdeic)" >&2; exit 2 ;;
  esac
  for model in "${models[@]}"; do
    "$python" -m jaxcodec.evaluate --checkpoint "$model" --data "$eval_data" \
      --quality "${qualities[@]}" --target-bpp "${targets[@]}" \
      --out "$model/eval" --name "${method}_$kind"
  done
done
