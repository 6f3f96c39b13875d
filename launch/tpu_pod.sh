#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a pod slice) from nothing: put the code on every
# worker, create its virtual environment with the TPU build of JAX, then run the same training
# command on every host. jax.distributed.initialize() (--distributed) finds the other hosts and
# this host's process id itself: one process per host, all of the host's chips.
#
#   TPU_NAME=my-v5e ZONE=us-west4-a PROJECT=my-project ACCELERATOR_TYPE=v5litepod-16 CREATE=1 \
#   WORKDIR=gs://my-bucket/runs/hfd launch/tpu_pod.sh [--dry-run] [extra train flags]
#
# Required: TPU_NAME, ZONE, WORKDIR. WORKDIR must be storage every host sees: gs://BUCKET/PATH
# (mounted with gcsfuse on every worker at GCS_MOUNT/BUCKET; the training sees that path) or a
# path on a shared filesystem (NFS / Filestore) mounted on every worker.
# Optional (defaults in brackets):
#   PROJECT            gcloud project [gcloud's configured one]
#   CREATE=1           create the TPU VM first, with ACCELERATOR_TYPE (e.g. v5litepod-16,
#                      v4-32, v5p-64, v6e-16) and RUNTIME_VERSION [chosen from the type];
#                      TPU_CREATE_FLAGS adds flags to the create command (e.g. --spot)
#   REVISION           clone REPO_URL at this commit/branch/tag on every worker instead of
#                      copying this working tree (uncommitted edits included) [copy]
#   REPO_URL           [this checkout's `origin`]
#   CONFIG             [configs/hfd.py:full]
#   REMOTE_DIR         the code's folder on each worker, relative to its home [jaxcodec]
#   JAX_SPEC           what pip installs for the accelerator ['jax[tpu]']
#   GCS_MOUNT          gcsfuse mount root on the workers [/tmp/gcs]
#   GCS_DIRECT=1       pass a gs:// WORKDIR unchanged (no gcsfuse), for a train loop that
#                      opens bucket paths itself
#   DETACH=1           run the training under nohup (log: ~/REMOTE_DIR/train-HOST.log on
#                      each worker) so that it survives the end of this ssh session
#   INTERNAL_IP=1      ssh/scp to the workers' internal addresses (from a VM in their VPC)
# --dry-run prints every command (local and remote) instead of running it.
set -euo pipefail

dry_run=0
extra=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) extra+=("$arg") ;;
  esac
done

: "${TPU_NAME:?set TPU_NAME (the name of the TPU VM)}" "${ZONE:?set ZONE (e.g. us-west4-a)}"
: "${WORKDIR:?set WORKDIR to gs://BUCKET/PATH or a path every worker mounts}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config="${CONFIG:-configs/hfd.py:full}"
remote_dir="${REMOTE_DIR:-jaxcodec}"
jax_spec="${JAX_SPEC:-jax[tpu]}"
gcs_mount="${GCS_MOUNT:-/tmp/gcs}"

# A word as the shell reads it back: bare when it has no special characters, else in single
# quotes. Every command below is printed (--dry-run) or run from exactly these words.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    local sq="'" esc="'\\''"
    printf "'%s'" "${1//$sq/$esc}"
  fi
}
join() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(quote "$w")"; done
  printf '%s' "$out"
}
run() {  # a local command, as words
  if ((dry_run)); then join "$@"; echo; else "$@"; fi
}
run_sh() {  # a local pipeline, as one shell string
  if ((dry_run)); then echo "$1"; else bash -o pipefail -c "$1"; fi
}

# One process per host: how many hosts the accelerator type has (for the summary line only;
# --worker=all reaches however many the slice really has).
hosts_of() {
  local type="$1" n="${1##*-}"
  [[ "$n" =~ ^[0-9]+$ ]] || { echo "?"; return; }
  case "$type" in
    v5litepod-* | v5e-* | v6e-*) ((n <= 8)) && echo 1 || echo $((n / 4)) ;;  # chips, 4 a host
    v4-* | v5p-*) ((n <= 8)) && echo 1 || echo $((n / 8)) ;;  # TensorCores, 8 a host
    v2-* | v3-*) echo $(((n + 7) / 8)) ;;  # TensorCores, 8 a host
    *) echo "?" ;;
  esac
}
runtime_of() {
  case "$1" in
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

gcloud_flags=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && gcloud_flags+=(--project="$PROJECT")
ssh_flags=("${gcloud_flags[@]}" --worker=all)
[[ -n "${INTERNAL_IP:-}" && "${INTERNAL_IP}" != 0 ]] && ssh_flags+=(--internal-ip)

# --- The workdir the training sees ------------------------------------------------------------
mount_step=""
train_workdir="$WORKDIR"
if [[ "$WORKDIR" == gs://* && "${GCS_DIRECT:-0}" == 0 ]]; then
  bucket="${WORKDIR#gs://}"
  bucket="${bucket%%/*}"
  train_workdir="$gcs_mount/${WORKDIR#gs://}"
  # gcsfuse: --rename-dir-limit lets orbax commit a checkpoint by renaming its temporary
  # folder; no metadata cache, so that every host sees what the others wrote at once.
  mount_step="{ command -v gcsfuse >/dev/null || { echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] \
https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" \
| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null \
&& curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
| sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null \
&& sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcsfuse; }; } \
&& mkdir -p $(quote "$gcs_mount/$bucket") && { mountpoint -q $(quote "$gcs_mount/$bucket") \
|| gcsfuse --implicit-dirs --rename-dir-limit=1000000 --metadata-cache-ttl-secs=0 \
$(quote "$bucket") $(quote "$gcs_mount/$bucket"); } && mkdir -p $(quote "$train_workdir")"
fi

# --- Remote steps (one line each, run by every worker's login shell) ---------------------------
dir="\"\$HOME\"/$(quote "$remote_dir")"
if [[ -n "${REVISION:-}" ]]; then
  repo_url="${REPO_URL:-$(git -C "$root" remote get-url origin 2>/dev/null || true)}"
  : "${repo_url:?set REPO_URL (this checkout has no origin remote) to clone REVISION}"
  code_step="mkdir -p $dir && cd $dir && { [ -d .git ] || git init -q; } \
&& { git remote set-url origin $(quote "$repo_url") 2>/dev/null || git remote add origin $(quote "$repo_url"); } \
&& git fetch -q --depth=1 origin $(quote "$REVISION") && git checkout -q --force FETCH_HEAD \
&& git clean -q -fdx -e .venv"
else
  tarball="jaxcodec-src.tar.gz"
  # The working tree as git sees it: tracked and untracked files, without ignored ones
  # (.venv, runs/, caches) and other virtual environments (.venv-cuda); files deleted but still
  # tracked are left out.
  pack="git -C $(quote "$root") ls-files -z --cached --others --exclude-standard -x '.venv*' \
| tar -czf $(quote "${TMPDIR:-/tmp}/$tarball") -C $(quote "$root") --null --ignore-failed-read -T -"
  code_step="mkdir -p $dir && cd $dir && find . -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} + \
&& tar -xzf \"\$HOME\"/$tarball && rm -f \"\$HOME\"/$tarball"
fi
# Python >= 3.11 (jaxcodec's floor); older TPU images have 3.10: install 3.11 from the distro.
env_step="cd $dir && py=\$(command -v python3.13 || command -v python3.12 || command -v python3.11 || true) \
&& if [ -z \"\$py\" ]; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive \
apt-get install -y -qq python3.11 python3.11-venv && py=python3.11; fi \
&& { [ -x .venv/bin/python ] || \"\$py\" -m venv .venv || { sudo DEBIAN_FRONTEND=noninteractive \
apt-get install -y -qq \"\$(basename \"\$py\")-venv\" && \"\$py\" -m venv .venv; }; } \
&& .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e . \"$jax_spec\" \
&& .venv/bin/python -c \"import jax, jaxlib, socket; print(socket.gethostname(), jax.__version__, \
jaxlib.__version__)\""

train=(.venv/bin/python -m jaxcodec.train --config "$config" --workdir "$train_workdir"
  --distributed "${extra[@]}")
if [[ -n "${DETACH:-}" && "${DETACH}" != 0 ]]; then
  train_step="cd $dir && nohup $(join "${train[@]}") > train-\$(hostname).log 2>&1 < /dev/null & \
echo \"training in the background on \$(hostname): $remote_dir/train-\$(hostname).log\""
else
  train_step="cd $dir && exec $(join "${train[@]}")"
fi

# --- Run ---------------------------------------------------------------------------------------
hosts="?"
[[ -n "${ACCELERATOR_TYPE:-}" ]] && hosts="$(hosts_of "$ACCELERATOR_TYPE")"
echo "# $TPU_NAME${ACCELERATOR_TYPE:+ ($ACCELERATOR_TYPE)}: $hosts hosts, one process per host;" \
  "jax.distributed.initialize() numbers them 0..N-1 by TPU worker id"
echo "# workdir: $WORKDIR${mount_step:+ (gcsfuse on every worker: $train_workdir)}"
if [[ -n "${CREATE:-}" && "${CREATE}" != 0 ]]; then
  : "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE (e.g. v5litepod-16) to create the TPU VM}"
  read -r -a create_flags <<<"${TPU_CREATE_FLAGS:-}"
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${gcloud_flags[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" \
    --version="${RUNTIME_VERSION:-$(runtime_of "$ACCELERATOR_TYPE")}" "${create_flags[@]}"
fi
if [[ -z "${REVISION:-}" ]]; then
  run_sh "$pack"
  scp_flags=("${gcloud_flags[@]}" --worker=all)
  [[ -n "${INTERNAL_IP:-}" && "${INTERNAL_IP}" != 0 ]] && scp_flags+=(--internal-ip)
  run gcloud compute tpus tpu-vm scp "${TMPDIR:-/tmp}/$tarball" "$TPU_NAME:$tarball" \
    "${scp_flags[@]}"
  run rm -f "${TMPDIR:-/tmp}/$tarball"
fi
for step in "$code_step" "$env_step" ${mount_step:+"$mount_step"} "$train_step"; do
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${ssh_flags[@]}" --command "$step"
done
