#!/usr/bin/env bash
# A Stable-Diffusion-shaped backbone trained on this CPU (configs/ldm.py:tiny: the autoencoder,
# then the latent UNet, exported as a diffusers folder), the SD-based methods' tiny variants on
# it, and the same methods on the random backbone their tiny variants use without one; then
# Kodak from real files beside JPEG, WebP and AVIF at the nearest bpp.
#   launch/cpu_backbone.sh [--dry-run] runs/backbone [extra flags for the backbone's training]
# On 2 CPU cores: the backbone about 45 minutes (autoencoder ≤ 25), each method ≤ 30 minutes per
# backbone, the evaluation about 20 minutes. Each step resumes (or is skipped when finished) if
# the script is run again with the same root.
#   DATA    training photos for every run (default: ../shared/data/photos, else scikit-image's)
#   KODAK   evaluation images (default: ../shared/data/kodak)
#   RDEIC_STEPS1, RDEIC_STEPS2   RDEIC's steps per stage (default 2400, 300)
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

# 1. The backbone: WORKDIR/stage2/backbone is the diffusers folder (unet/, vae/, text condition).
run "$python" -m jaxcodec.train --config configs/ldm.py:tiny --workdir "$root/ldm" "${data[@]}" "$@"
backbone="$root/ldm/stage2/backbone"

# 2. The methods, on the trained backbone and on the random one. RDEIC: stage 1 (independent
# timesteps), then stage 2 (fine-tuning through the 2-step sampler and the VAE decoder, LPIPS).
rdeic() {  # NAME [BACKBONE]
  local dir="$root/$1" spec="configs/rdeic.py:tiny${2:+,backbone=$2}"
  local common=("${data[@]}" "${eval_data[@]}" --config.batch_size=8 --config.log_every=100
    --config.eval_every=0 --config.checkpoint_every=500)
  run "$python" -m jaxcodec.train --config "$spec,stage=1" --workdir "$dir/stage1" "${common[@]}" \
    --config.total_steps="${RDEIC_STEPS1:-2400}" --config.real_file_eval=False
  run "$python" -m jaxcodec.train --config "$spec,stage=2" --workdir "$dir/stage2" "${common[@]}" \
    --config.init_from="$dir/stage1" --config.total_steps="${RDEIC_STEPS2:-300}"
}
rdeic rdeic_ldm "$backbone"
rdeic rdeic_random
models=(rdeic-tiny-ldm="$root/rdeic_ldm/stage2" rdeic-tiny-random="$root/rdeic_random/stage2")
# DiffCR and ResULIC (tiny, backbone=DIR) go here once they land, e.g.
#   diffcr diffcr_ldm "$backbone"; diffcr diffcr_random
#   models+=(diffcr-tiny-ldm="$root/diffcr_ldm/stage2" diffcr-tiny-random=...)

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
