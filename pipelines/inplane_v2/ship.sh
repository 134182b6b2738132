#!/usr/bin/env bash
# Ship an in-plane v2 checkpoint as the named model `inplane_v2` in one command: export (EMA, fp16), calibrate per
# modality on the shared/DATA.md calibration split (issue 12's method, the same held-out crops as the default),
# export again with that calibration, and write its card beside the weights (side by side with the default).
#
#   pipelines/inplane_v2/ship.sh /work/runs/inplane_v2/last.pt
#
# Run from the checkout root (PYTHONPATH=$PWD). DEFAULT_CACHE: an existing calibration cache of the default model
# (pipelines.calibrate_default_model's; made here when unset). Writes medsr/weights/inplane_v2_x4.pt,
# medsr/weights/INPLANE_V2_CARD.md and pipelines/inplane_v2/calibration.json. About 10-15 min on this 2-core CPU.
set -euo pipefail
ckpt=${1:?usage: ship.sh CHECKPOINT}
py=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$ckpt" "$work/checkpoint.pt"
export OMP_NUM_THREADS=1
default_cache=${DEFAULT_CACHE:-$work/default_cache}
"$py" -m pipelines.export_model "$work/checkpoint.pt" --name inplane_v2 --out "$work/uncalibrated.pt"
"$py" -m pipelines.calibrate_default_model --model "$work/uncalibrated.pt" --cache "$work/cache" \
    --out "$work/study" --export pipelines/inplane_v2/calibration.json
"$py" -m pipelines.export_model "$work/checkpoint.pt" --name inplane_v2 \
    --calibration-json pipelines/inplane_v2/calibration.json
"$py" -m pipelines.calibrate_default_model --model medsr/weights/default_x4.pt --cache "$default_cache" \
    --out "$work/default_study" --only-cache
"$py" -m pipelines.inplane_v2_card --study "$work/study/calibration_study.json" --cache "$work/cache" \
    --default-cache "$default_cache"
