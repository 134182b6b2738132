"""Export a training checkpoint as the default shipped model (``pipelines.export_model --name default``).

    python -m pipelines.export_default_model runs/default_model/last.pt --calibration-json CAL.json

Kept as the name the default model's card and README cite; the logic is :mod:`pipelines.export_model`.
"""

from __future__ import annotations

from pipelines.export_model import main

if __name__ == "__main__":
    main("default")
