#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command on every host; jax.distributed finds the
# other hosts itself (--distributed). The workdir must be on storage all hosts share.
#   TPU_NAME=my-v4-32 ZONE=us-central2-b WORKDIR=/mnt/shared/runs/hfd launch/tpu_pod.sh [extra flags]
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (shared by all hosts)}"
CONFIG="${CONFIG:-configs/hfd.py:full}"
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd ~/jaxcodec && .venv/bin/pip install -q -e . 'jax[tpu]' &&
  .venv/bin/python -m jaxcodec.train --config $CONFIG --workdir $WORKDIR --distributed $extra"
