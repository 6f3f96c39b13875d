#!/usr/bin/env bash
# One model per rate point: sweep the rate–distortion trade-off λ of HFD stage 1, then evaluate
# every run on one folder of images.   launch/sweep_lambda.sh runs/sweep [extra flags]
set -euo pipefail
root="${1:?root directory for the runs}"; shift
config="${CONFIG:-configs/hfd.py:base}"
runs=()
for lmbda in ${LAMBDAS:-0.0009 0.0018 0.0035 0.0067}; do
  python -m jaxcodec.train --config "$config" --workdir "$root/lmbda_$lmbda" \
    --config.loss.lmbda="$lmbda" "$@"
  runs+=("$root/lmbda_$lmbda")
done
python -m jaxcodec.evaluate --checkpoint "${runs[@]}" --data "${EVAL_DATA:-../shared/data/kodak}" \
  --out "$root/eval"
