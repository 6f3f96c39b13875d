#!/usr/bin/env bash
# N local processes on CPU, as on N hosts (gloo collectives): a check of the multi-host path on
# one machine.   [PYTHON=.venv/bin/python] launch/local_processes.sh [--dry-run] 2 runs/multi [extra flags]
# The processes differ only in --process_id; --dry-run prints their commands instead.
set -euo pipefail
dry_run=0
if [[ "${1:-}" == --dry-run ]]; then dry_run=1; shift; fi
n="${1:?number of processes}"; workdir="${2:?workdir}"; shift 2
port="${PORT:-12355}"
pids=()
for ((i = 0; i < n; i++)); do
  cmd=(env JAX_PLATFORMS=cpu "${PYTHON:-python}" -m jaxcodec.train
    --config "${CONFIG:-configs/hfd.py:tiny}" --workdir "$workdir"
    --coordinator_address "localhost:$port" --num_processes "$n" --process_id "$i" "$@")
  if ((dry_run)); then
    printf '%q ' "${cmd[@]}" | sed 's/ $//'
    echo
    continue
  fi
  "${cmd[@]}" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
