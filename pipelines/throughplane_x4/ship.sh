#!/usr/bin/env bash
# Ship a through-plane x4 checkpoint in one command: export (EMA, fp16), calibrate per modality on the
# shared/DATA.md calibration split made thick, export again with that calibration, and re-score the model card.
#
#   pipelines/throughplane_x4/ship.sh /work/runs/throughplane_x4/last.pt
#
# Run from the checkout root (PYTHONPATH=$PWD). Copy a checkpoint that is still being written before using it.
# Writes medsr/weights/throughplane_x4.pt, medsr/weights/THROUGHPLANE_X4_CARD.md,
# pipelines/throughplane_x4/calibration.json and pipelines/throughplane_x4/card.json. About 20-40 min on a
# loaded 2-core CPU at these settings (sampling: the defaults of medsr.config.SamplingConfig, card included, so its coverage is measured at the calibration settings);
# raise --samples/--steps/--crop where there is time.
set -euo pipefail
ckpt=${1:?usage: ship.sh CHECKPOINT}
py=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$ckpt" "$work/checkpoint.pt"
export OMP_NUM_THREADS=1
"$py" -m pipelines.export_model "$work/checkpoint.pt" --name throughplane_x4 --out "$work/uncalibrated.pt"
"$py" -m pipelines.calibrate_default_model --model "$work/uncalibrated.pt" --cache "$work/cache" \
    --out "$work/study" --crop 64 --export pipelines/throughplane_x4/calibration.json
"$py" -m pipelines.export_model "$work/checkpoint.pt" --name throughplane_x4 \
    --calibration-json pipelines/throughplane_x4/calibration.json
"$py" -m pipelines.throughplane_card medsr/weights/throughplane_x4.pt --adapt 20 --crop 40 \
    --json pipelines/throughplane_x4/card.json
