"""Export a training checkpoint as the model shipped in ``medsr/weights/`` (EMA, float16, calibration).

    python -m pipelines.export_default_model runs/default_model/last.pt [--calibration C]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medsr.model import export_model, file_sha256

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "medsr" / "weights" / "default_x4.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--calibration", type=float, default=1.0)
    parser.add_argument("--wall-hours", type=float, default=None)
    args = parser.parse_args()
    extra = {"command": "medsr train configs/default_model.yaml", "source": str(args.checkpoint)}
    if args.wall_hours is not None:
        extra["wall_hours"] = args.wall_hours
    out = export_model(args.checkpoint, args.out, args.calibration, extra)
    print(f"{out}  {out.stat().st_size / 1e6:.2f} MB  sha256 {file_sha256(out)}")


if __name__ == "__main__":
    main()
