#!/usr/bin/env bash
# One check of a GPU or TPU machine, under 8 minutes once the environment is there; ends with
# one JSON line on stdout (progress on stderr, logs in the output folder):
#   parity       the parity tests (UNet, attention, VAE, ControlNet-XS, CLIP, metrics) on the
#                accelerator, float32 matmuls at full precision (JAX_DEFAULT_MATMUL_PRECISION)
#   unet_speed   benchmarks/unet_speed.py: SD 2.1-base UNet and VAE decoder, jaxcodec vs PyTorch
#                on the same device when PyTorch sees it (else PyTorch on the CPU: no ratios)
#   decode_*     HFD, RDEIC and DiffO decoding a 768x512 file at full configuration, random
#                weights (benchmarks/accelerator_check.py decode)
#   train_mfu    a few steps of HFD full stage 1 in the train loop: step time, TFLOP/s per
#                device, MFU (benchmarks/accelerator_check.py train-mfu)
#
#   benchmarks/accelerator_check.sh [--out DIR] [--no-install] [--dry-run] [--allow-cpu]
#
# Without a GPU (nvidia-smi) or TPU (/dev/accel*, Google PCI devices) it refuses with exit code 2,
# unless --allow-cpu: a smoke run of the same parts with tiny settings (a parity test file,
# tiny configs at 128x128, no SD-size speed benchmark), a few minutes on a small CPU. When the
# hardware is there but the environment's JAX is a CPU build, the accelerator's JAX of the same
# version is installed into it first (jax[cuda12] / jax[tpu]; --no-install refuses instead).
# PYTHON [.venv/bin/python] is the environment; ACCELERATOR=gpu|tpu|none overrides detection;
# BUDGET_S [465] bounds the parts (each also has its own cap); --dry-run prints the commands.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
allow_cpu=0 dry_run=0 install=1 out=""
while (($#)); do
  case "$1" in
    --allow-cpu) allow_cpu=1 ;;
    --dry-run) dry_run=1 ;;
    --no-install) install=0 ;;
    --out) out="${2:?--out DIR}"; shift ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "accelerator_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
py="${PYTHON:-$root/.venv/bin/python}"
helper=(benchmarks/accelerator_check.py)
say() { echo "accelerator_check: $*" >&2; }

# --- What hardware is here (whatever JAX build is installed) -----------------------------------
hw="${ACCELERATOR:-}"
if [[ -z "$hw" ]]; then
  hw=none
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    hw=gpu
  elif compgen -G '/dev/accel[0-9]*' >/dev/null ||
    grep -qs 0x1ae0 /sys/bus/pci/devices/*/vendor; then  # Google: TPU chips
    hw=tpu
  fi
fi
case "$hw" in
  gpu) jax_platform=cuda jax_extra=cuda12 ;;
  tpu) jax_platform=tpu jax_extra=tpu ;;
  none)
    if ((!allow_cpu)); then
      say "no GPU or TPU on this machine (nvidia-smi lists none, no TPU device); this check" \
        "measures an accelerator. --allow-cpu runs a CPU smoke version with tiny settings."
      exit 2
    fi
    jax_platform=cpu jax_extra="" ;;
  *) say "ACCELERATOR must be gpu, tpu or none, not $hw"; exit 2 ;;
esac
if [[ ! -x "$py" ]] && ((!dry_run)); then
  say "no Python environment at $py: create it first (README: pip install -e '.[test]'), or set PYTHON"
  exit 2
fi

# --- JAX must see it ---------------------------------------------------------------------------
if ((dry_run)); then
  [[ -n "$jax_extra" ]] && echo "# if JAX does not see the $hw: $py -m pip install jax[$jax_extra]==<installed jax version>"
  platform="$jax_platform"
else
  detected="$("$py" "${helper[@]}" detect 2>/dev/null | tail -1)"
  platform="$(sed -n 's/.*"platform": "\([a-z]*\)".*/\1/p' <<<"$detected")"
  if [[ "$hw" != none && "$platform" != "$hw" ]]; then
    version="$("$py" -c 'import jax; print(jax.__version__)' 2>/dev/null)"
    if ((!install)); then
      say "this machine has a $hw but JAX sees '$platform' (a CPU build of jax $version):" \
        "$py -m pip install 'jax[$jax_extra]==$version'  (or run without --no-install)"
      exit 2
    fi
    say "JAX sees '$platform' on a $hw machine: installing jax[$jax_extra]==$version"
    "$py" -m pip install -q "jax[$jax_extra]==$version" >&2 || { say "pip install failed"; exit 2; }
    detected="$("$py" "${helper[@]}" detect 2>/dev/null | tail -1)"
    platform="$(sed -n 's/.*"platform": "\([a-z]*\)".*/\1/p' <<<"$detected")"
    if [[ "$platform" != "$hw" ]]; then
      say "JAX still does not see the $hw (platform '$platform'): check the driver (nvidia-smi)" \
        "or the TPU runtime, then run again"
      exit 2
    fi
  fi
  [[ -n "$detected" ]] || { say "could not start $py (jax import failed?)"; exit 2; }
fi

# --- The parts ---------------------------------------------------------------------------------
out="${out:-$root/runs/accelerator_check/$(date +%Y%m%d-%H%M%S)}"
budget="${BUDGET_S:-465}"
parity_files=(tests/test_unet.py tests/test_unet_attention.py tests/test_vae.py
  tests/test_control.py tests/test_clip.py tests/test_metrics_perceptual.py
  tests/test_metrics_psnr_msssim.py tests/test_metrics_fid.py)
if [[ "$hw" == none ]]; then
  mode=cpu-smoke variant=tiny size=128x128 repeats=1
  parity_files=(tests/test_unet_attention.py)
  mfu=(--config configs/hfd.py:tiny --stage 1 --steps 4 --batch-per-device 2)
else
  mode=accelerator variant=full size=768x512 repeats=2
  mfu=(--config configs/hfd.py:full --stage 1 --steps 6 --batch-per-device 8)
fi
# Parity at full float32 precision on the device (TF32 / bf16 passes would miss the tolerances
# set on a CPU); every other part runs with the platform's defaults.
parity_env=(env "JAX_PLATFORMS=$jax_platform" XLA_FLAGS= JAX_DEFAULT_MATMUL_PRECISION=highest)

start=$SECONDS
if ((!dry_run)); then
  mkdir -p "$out"
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/jaxcodec/jax}"
  say "$mode check on $hw ($platform); logs in $out"
fi

# part NAME CAP_SECONDS COMMAND...: runs COMMAND with the time left (at most CAP), its output in
# OUT/NAME.log, its last JSON line in OUT/NAME.json, 'rc seconds' in OUT/NAME.status.
part() {
  local name="$1" cap="$2" left t0 rc
  shift 2
  if ((dry_run)); then
    printf '%s (at most %ss):' "$name" "$cap"
    printf ' %q' "$@"
    echo
    return
  fi
  left=$((budget - (SECONDS - start)))
  if ((left < 30)); then
    echo "skipped: the time budget (${budget}s) was spent" >"$out/$name.status"
    say "$name skipped (time budget spent)"
    return
  fi
  ((cap > left - 5)) && cap=$((left - 5))
  say "$name (at most ${cap}s) ..."
  t0=$SECONDS
  timeout --kill-after=10 "$cap" "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "$rc $((SECONDS - t0))" >"$out/$name.status"
  grep '^{' "$out/$name.log" | tail -1 >"$out/$name.json"
  say "$name: rc $rc in $((SECONDS - t0))s"
}

part parity 170 "${parity_env[@]}" "$py" -m pytest -q -p no:cacheprovider "${parity_files[@]}"
if ((!dry_run)) && [[ -f "$out/parity.log" ]]; then
  "$py" "${helper[@]}" pytest-summary "$out/parity.log" >"$out/parity.json"
fi
if [[ "$hw" == none ]]; then
  if ((!dry_run)); then
    echo "skipped: SD-size models (minutes on a CPU; run benchmarks/unet_speed.py by hand)" \
      >"$out/unet_speed.status"
  fi
else
  part unet_speed 130 "$py" benchmarks/unet_speed.py --repeats 3 --device auto
fi
for method in hfd rdeic diffo; do
  part "decode_$method" 100 "$py" "${helper[@]}" decode --method "$method" --variant "$variant" \
    --size "$size" --repeats "$repeats"
done
part train_mfu 110 "$py" "${helper[@]}" train-mfu "${mfu[@]}" --workdir "$out/train_mfu_run"

if ((dry_run)); then
  exit 0
fi
"$py" "${helper[@]}" report "$out" --set "mode=\"$mode\"" --set "hardware=\"$hw\"" \
  --set "total_s=$((SECONDS - start))" --set "detected=$detected" --set "out=\"$out\""
