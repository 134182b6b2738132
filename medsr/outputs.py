"""Write what ``medsr enhance`` produces for one scan into ``OUT/NAME/``, every file atomically.

``mean.nii.gz``, ``std.nii.gz``, ``q05.nii.gz``, ``q95.nii.gz`` on the refined grid; ``review.png``;
``report.json``; for DICOM output ``dicom_mean/`` and ``dicom_std/`` derived series; ``samples.nii.gz``
(4D, one volume per sample) on request. ``report.json`` is written last, so its presence marks a finished item.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from medsr import __version__
from medsr.enhance import EnhanceOptions, EnhanceResult
from medsr.io import Scan, atomic_path, safe_join, save_dicom_series, save_nifti
from medsr.model import LoadedModel
from medsr.review import review_figure

__all__ = ["write_outputs", "build_report"]

SCORE_MEANING = ("mean half-width of the calibrated 90% interval inside the body, in % of the intensity range "
                 "(CT: 2048 HU window, 1% = 20.48 HU; MR: 0.5-99.5 percentile range); rank scans by it")


def _units(scan: Scan) -> str:
    return "HU" if scan.modality.upper() == "CT" else "scan intensity"


def _review_title(result: EnhanceResult, options: EnhanceOptions) -> str:
    """What a reviewer should read off the figure: the interval's meaning and where its calibration came from."""
    cal = result.info.get("calibration", {})
    head = f"medsr x{'x'.join(map(str, result.factors))}, {options.samples} samples. "
    if cal.get("applied", "none") == "none":
        return head + "Heat: half-width of the raw 5-95% sample interval (NOT calibrated: read as relative)"
    where = (f"calibrated on {cal['n']} held-out {cal['applied']} scans" if cal.get("n") else
             "single v0.1 spread factor, no guarantee")
    fitted_at = int(cal.get("details", {}).get("samples") or 0)
    caveat = f" [fitted with {fitted_at} samples: not valid at {options.samples}]" if fitted_at not in (
        0, options.samples) else ""
    return (head + f"Heat: 90% of true values should lie within ± this ({where}); "
                   f"mean {result.score.halfwidth_pct:.2f}% of range{caveat}")


def build_report(scan: Scan, result: EnhanceResult, model: LoadedModel, options: EnhanceOptions) -> dict[str, Any]:
    """The JSON report: what was done, with which model, how long it took and how sure the model is."""
    return {
        "medsr_version": __version__,
        "model": {"path": model.path, "sha256": model.sha256, "step": model.step,
                  "degradation": model.config.degrade, "calibration": model.calibration.to_report()},
        "input": {"format": getattr(scan, "format", ""), "modality": scan.modality,
                  "shape": list(scan.spatial_shape), "spacing_mm": [round(s, 6) for s in scan.spacing]},
        "output": {"shape": list(result.mean.spatial_shape),
                   "spacing_mm": [round(s, 6) for s in result.mean.spacing],
                   "scale": list(result.factors)},
        "sampling": {"sampler": options.sampler, "steps": options.steps, "samples": options.samples,
                     "seed": options.seed, "data_consistency_projection": options.project,
                     "overlap": options.overlap, **{k: v for k, v in result.info.items() if k != "calibration"}},
        "calibration": result.info.get("calibration", {}),
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
        "score": {"value": result.score.value,
                  "meaning": SCORE_MEANING,
                  "halfwidth_scan_units": result.score.halfwidth,
                  "scan_units": _units(scan),
                  "mean_std_fraction_of_range": result.score.mean_std,
                  "body_voxels": result.score.body_voxels},
        "interval": {"low": 0.05, "high": 0.95, "method": result.interval_method},
        "data_consistency": result.consistency,
    }


def _write_series(image: Scan, reference: Scan, final: Path, description: str) -> None:
    """Write a derived series into a hidden temporary folder, then swap it in: never a half-written series."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_dicom_series(image, reference, tmp, description)
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_outputs(scan: Scan, result: EnhanceResult, model: LoadedModel, options: EnhanceOptions,
                  out_root: str | os.PathLike[str], name: str | None = None, formats: str = "nifti",
                  save_samples: bool = False) -> Path:
    """Write all outputs for ``scan`` into ``out_root/name`` (name sanitised); returns that folder."""
    if formats not in ("nifti", "dicom", "both"):
        raise ValueError(f"formats must be nifti, dicom or both, got {formats!r}")
    folder = safe_join(out_root, name or scan.name)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    if formats in ("nifti", "both"):
        for key in ("mean", "std", "q05", "q95"):
            save_nifti(getattr(result, key), folder / f"{key}.nii.gz")
            written.append(f"{key}.nii.gz")
    if formats in ("dicom", "both"):
        scale = "x".join(str(f) for f in result.factors)
        n = options.samples
        _write_series(result.mean, scan, folder / "dicom_mean", f"medsr SR3 {scale} enhanced (mean of {n})")
        _write_series(result.std, scan, folder / "dicom_std", f"medsr SR3 {scale} uncertainty (std of {n})")
        written += ["dicom_mean/", "dicom_std/"]
    if save_samples and result.samples is not None:
        samples = Scan(array=result.samples.astype(np.float32), affine=result.mean.affine,
                       modality=scan.modality, source=scan.source)
        save_nifti(samples, folder / "samples.nii.gz")
        written.append("samples.nii.gz")
    halfwidth = 0.5 * (result.q95.array[0] - result.q05.array[0])
    review_figure(scan.array[0], result.mean.array[0], halfwidth, result.factors, folder / "review.png",
                  title=_review_title(result, options), units=f"({_units(scan)})",
                  slice_axis=2 if result.info.get("slice_axis") is None else result.info["slice_axis"],
                  affine=scan.affine, heat_label="± half-width of 90% interval",
                  heat_title="uncertainty: ± half-width of the 90% interval")
    written.append("review.png")
    report = build_report(scan, result, model, options)
    report["files"] = written + ["report.json"]
    with atomic_path(folder / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return folder
