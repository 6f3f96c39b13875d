#!/usr/bin/env bash
# A Stable-Diffusion-shaped backbone trained on this CPU (configs/ldm.py:tiny: the autoencoder,
# then the latent UNet, exported as a diffusers folder), the SD-based methods' tiny variants on
# it (RDEIC, DiffCR, ResULIC), and the same methods on the random backbone their tiny variants use
# without one; then Kodak from real files beside JPEG, WebP and AVIF at the nearest bpp.
#   launch/cpu_backbone.sh [--dry-run] runs/backbone [extra flags for the backbone's training]
# On 2 CPU cores: the backbone about 45 minutes (autoencoder ≤ 25), each method ≤ 30 minutes per
# backbone, the evaluation about 20 minutes. Each step resumes (or is skipped when finished) if
# the script is run again with the same root.
#   DATA    training photos for every run (default: ../shared/data/photos, else scikit-image's)
#   KODAK   evaluation images (default: ../shared/data/kodak)
#   METHODS   the SD-based methods trained on both backbones (default "rdeic diffcr resulic";
#             ResULIC runs without captions on the trained backbone, which has no text tower)
#   RDEIC_STEPS1, RDEIC_STEPS2, DIFFCR_STEPS1, ..., RESULIC_STEPS2   steps per stage (default
#             2400, 300)
#   QUALITIES_JPEG, QUALITIES_WEBP, QUALITIES_AVIF   the classical sweeps (low-rate defaults)
# Results: ROOT/kodak/nearest_bpp.md, ROOT/kodak/side_by_side.png, ROOT/kodak/*/results.md,
# ROOT/kodak/ldm_losses.png (the backbone's training curves),
# ROOT/ldm/stage1/reconstructions.png, ROOT/ldm/stage2/samples.png.
set -euo pipefail
dry=0
if [[ "${1:-}" == --dry-run ]]; then dry=1; shift; fi
root="${1:?root directory for the runs}"; shift
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
python="${PYTHON:-python}"
kodak="${KODAK:-$here/../shared/data/kodak}"
photos="${DATA:-$here/../shared/data/photos}"
if [[ ! -d "$kodak" ]]; then echo "KODAK=$kodak is not a folder of evaluation images" >&2; exit 2; fi
run() { if ((dry)); then printf '%q ' "$@"; echo; else "$@"; fi; }

data=()
if [[ -d "$photos" ]]; then data=(--config.data.source=folder --config.data.path="$photos"); fi
if [[ -n "${DATA:-}" && ! -d "$DATA" ]]; then echo "DATA=$DATA is not a folder" >&2; exit 2; fi
eval_data=(--config.eval_data.source=folder --config.eval_data.path="$kodak"
  --config.eval_data.max_images=2)
read -r -a methods <<< "${METHODS:-rdeic diffcr resulic}"
for method in "${methods[@]}"; do
  case "$method" in
    rdeic | diffcr | resulic) ;;
    *) echo "METHODS: $method is not one of rdeic, diffcr, resulic" >&2; exit 2 ;;
  esac
done

# 1. The backbone: WORKDIR/stage2/backbone is the diffusers folder (unet/, vae/, text condition).
run "$python" -m jaxcodec.train --config configs/ldm.py:tiny --workdir "$root/ldm" "${data[@]}" "$@"
backbone="$root/ldm/stage2/backbone"

# 2. The methods, on the trained backbone and on the random one: stage 1, then stage 2 from it
# (RDEIC: fine-tuning through the 2-step sampler and the VAE decoder with LPIPS; DiffCR: FaSE
# through its two-step sampler, MSE + LPIPS; ResULIC: the compression-aware diffusion, then MSE +
# LPIPS on the decoded ẑ_0).
sd_method() {  # METHOD NAME [BACKBONE]
  local dir="$root/$2" spec="configs/$1.py:tiny${3:+,backbone=$3}" up="${1^^}"
  local steps1="${up}_STEPS1" steps2="${up}_STEPS2"
  local common=("${data[@]}" "${eval_data[@]}" --config.batch_size=8 --config.log_every=100
    --config.eval_every=0 --config.checkpoint_every=500)
  run "$python" -m jaxcodec.train --config "$spec,stage=1" --workdir "$dir/stage1" "${common[@]}" \
    --config.total_steps="${!steps1:-2400}" --config.real_file_eval=False
  run "$python" -m jaxcodec.train --config "$spec,stage=2" --workdir "$dir/stage2" "${common[@]}" \
    --config.init_from="$dir/stage1" --config.total_steps="${!steps2:-300}"
}
models=()
for method in "${methods[@]}"; do
  sd_method "$method" "${method}_ldm" "$backbone"
  sd_method "$method" "${method}_random"
  models+=("$method-tiny-ldm=$root/${method}_ldm/stage2")
  models+=("$method-tiny-random=$root/${method}_random/stage2")
done

# 3. Kodak from real files: every model, then the classical sweeps, then the nearest-bpp table.
evaluate=("$python" -m jaxcodec.evaluate --data "$kodak" --metrics psnr,lpips,dists)
for m in "${models[@]}"; do
  run "${evaluate[@]}" --checkpoint "${m#*=}" --name "${m%%=*}" --out "$root/kodak/${m%%=*}"
done
run "${evaluate[@]}" --codec jpeg --qualities "${QUALITIES_JPEG:-1,2,3,5,8}" --out "$root/kodak/jpeg"
run "${evaluate[@]}" --codec webp --qualities "${QUALITIES_WEBP:-0,2,5,10}" --out "$root/kodak/webp"
run "${evaluate[@]}" --codec avif --qualities "${QUALITIES_AVIF:-0,5,10,15,20}" \
  --out "$root/kodak/avif"
run "$python" launch/backbone_report.py "$root/kodak" --models "${models[@]}" \
  --image "$kodak/kodim23.png" --ldm "$root/ldm"
