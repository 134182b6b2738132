"""Export a training checkpoint as a model shipped in ``medsr/weights/`` (EMA, float16, calibration).

    python -m pipelines.export_model CHECKPOINT --name default --calibration-json CAL.json
    python -m pipelines.export_model CHECKPOINT --name lowdose_ct --calibration-json CAL.json
    python -m pipelines.export_model CHECKPOINT --name throughplane_x4 --calibration-json CAL.json

``--name`` is an entry of :data:`medsr.runtime.SHIPPED_MODELS`: the file written is that entry's (unless
``--out``) and the provenance records its training recipe. ``CAL.json`` is a per-modality calibration as
``ModelCalibration.to_checkpoint`` writes it (``pipelines.calibrate_default_model --export``,
``pipelines.lowdose_card``); ``--calibration C`` stores a v0.1-style single factor instead.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from medsr.model import export_model, file_sha256
from medsr.runtime import shipped_model
from medsr.uncertainty import ModelCalibration

# the training recipe of each shipped model (what its card's "exact command" says)
RECIPES = {"default": "medsr train configs/default_model.yaml", "lowdose_ct": "medsr train configs/lowdose_ct.yaml",
           "throughplane_x4": "medsr train configs/throughplane_x4.yaml",
           "inplane_v2": "medsr train configs/inplane_v2.yaml"}


def export_shipped(checkpoint: str | os.PathLike[str], name: str, calibration: float | dict[str, Any] |
                   ModelCalibration = 1.0, out: str | os.PathLike[str] | None = None,
                   extra: dict[str, Any] | None = None) -> Path:
    """Export ``checkpoint`` as shipped model ``name`` (its registry file unless ``out``), with provenance."""
    entry = shipped_model(name)
    provenance: dict[str, Any] = {"command": RECIPES.get(name, ""), "source": str(checkpoint), **(extra or {})}
    return export_model(checkpoint, out if out is not None else entry.path, calibration, provenance)


def main(default_name: str = "default") -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--name", default=default_name, help="shipped model name (medsr models)")
    parser.add_argument("--out", default=None, help="default: the shipped model's own file")
    parser.add_argument("--calibration", type=float, default=1.0, help="v0.1 single spread factor")
    parser.add_argument("--calibration-json", default=None, help="per-modality calibration (overrides --calibration)")
    parser.add_argument("--wall-hours", type=float, default=None)
    args = parser.parse_args()
    extra: dict[str, Any] = {} if args.wall_hours is None else {"wall_hours": args.wall_hours}
    calibration = (ModelCalibration.from_checkpoint(json.loads(Path(args.calibration_json).read_text()),
                                                    args.calibration_json)
                   if args.calibration_json else ModelCalibration.from_checkpoint(args.calibration))
    out = export_shipped(args.checkpoint, args.name, calibration, args.out, extra)
    print(f"{out}  {out.stat().st_size / 1e6:.2f} MB  sha256 {file_sha256(out)}")


if __name__ == "__main__":
    main()
