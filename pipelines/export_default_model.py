"""Export a training checkpoint as a model shipped in ``medsr/weights/`` (EMA, float16, calibration).

    python -m pipelines.export_default_model runs/default_model/last.pt --calibration-json CAL.json
    python -m pipelines.export_default_model runs/throughplane_x4/last.pt --name throughplane_x4 \\
        --command "medsr train configs/throughplane_x4.yaml"

``--name`` is the shipped model's name in ``medsr.runtime.SHIPPED_MODELS``: the file is written where that
entry says (``--out`` overrides). ``CAL.json`` is what ``python -m pipelines.calibrate_default_model --export
CAL.json`` writes: λ per modality with α, δ, the guarantee and the calibration scans (see
:mod:`medsr.uncertainty`). ``--calibration C`` stores a v0.1-style single factor instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medsr.model import export_model, file_sha256
from medsr.runtime import DEFAULT_MODEL_NAME, shipped_model
from medsr.uncertainty import ModelCalibration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--name", default=DEFAULT_MODEL_NAME, help="shipped model name (decides the default --out)")
    parser.add_argument("--out", default=None, help="output file (default: the shipped model's file)")
    parser.add_argument("--command", default="medsr train configs/default_model.yaml",
                        help="the training command, kept as provenance")
    parser.add_argument("--calibration", type=float, default=1.0, help="v0.1 single spread factor")
    parser.add_argument("--calibration-json", default=None, help="per-modality calibration (overrides --calibration)")
    parser.add_argument("--wall-hours", type=float, default=None)
    args = parser.parse_args()
    extra: dict[str, object] = {"command": args.command, "source": str(args.checkpoint)}
    if args.wall_hours is not None:
        extra["wall_hours"] = args.wall_hours
    calibration = (ModelCalibration.from_checkpoint(json.loads(Path(args.calibration_json).read_text()),
                                                    args.calibration_json)
                   if args.calibration_json else ModelCalibration.from_checkpoint(args.calibration))
    out = export_model(args.checkpoint, args.out or shipped_model(args.name).path, calibration, extra)
    print(f"{out}  {out.stat().st_size / 1e6:.2f} MB  sha256 {file_sha256(out)}")


if __name__ == "__main__":
    main()
