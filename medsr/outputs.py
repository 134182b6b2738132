"""Write what ``medsr enhance`` produces for one scan into ``OUT/NAME/``, every file atomically.

``mean.nii.gz``, ``std.nii.gz``, ``q05.nii.gz``, ``q95.nii.gz`` on the refined grid; ``review.png``;
``report.json``; for DICOM output ``dicom_mean/`` (derived image series) and ``dicom_std/`` (the
uncertainty as one Parametric Map, see :mod:`medsr.io.dicom_pmap`); ``samples.nii.gz``
(4D, one volume per sample) on request. ``report.json`` is written last, so its presence marks a finished item.
The whole folder is built privately and renamed into place (see :func:`write_outputs`), and
:func:`plan_destinations` gives every input of a run its own folder, never on or around an input.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsr import __version__
from medsr.enhance import EnhanceOptions, EnhanceResult
from medsr.errors import MedsrError
from medsr.io import Scan, atomic_path, safe_join, sanitize_component, save_nifti
from medsr.io.dicom_pmap import write_dicom
from medsr.io.paths import output_name
from medsr.model import LoadedModel
from medsr.review import review_figure

__all__ = ["write_outputs", "build_report", "plan_destinations", "Destination"]

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
    caveat = f" [{cal['mismatch']}]" if cal.get("mismatch") else ""
    return (head + f"Heat: 90% of true values should lie within ± this ({where}); "
                   f"mean {result.score.halfwidth_pct:.2f}% of range{caveat}")


def build_report(scan: Scan, result: EnhanceResult, model: LoadedModel, options: EnhanceOptions) -> dict[str, Any]:
    """The JSON report: what was done, with which model, how long it took and how sure the model is."""
    return {
        "medsr_version": __version__,
        "model": {"path": model.path, "sha256": model.sha256, "step": model.step,
                  "degradation": model.config.degrade, "calibration": model.calibration.to_report(),
                  "choice": result.info.get("model_choice")},  # which model ran and why (--model auto)
        "input": {"source": str(Path(scan.source).resolve()) if scan.source else "",
                  "format": getattr(scan, "format", ""), "modality": scan.modality,
                  "shape": list(scan.spatial_shape), "spacing_mm": [round(s, 6) for s in scan.spacing]},
        "output": {"shape": list(result.mean.spatial_shape),
                   "spacing_mm": [round(s, 6) for s in result.mean.spacing],
                   "scale": list(result.factors)},
        "sampling": {"sampler": options.sampler, "steps": options.steps, "samples": options.samples,
                     "seed": options.seed, "data_consistency_projection": options.project,
                     "overlap": options.overlap,
                     **{k: v for k, v in result.info.items() if k not in ("calibration", "model_choice")}},
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


def _overlap(folder: Path, source: Path) -> bool:
    """True when replacing ``folder`` would touch ``source``: the same path, one inside the other."""
    return folder == source or folder in source.parents or source in folder.parents


def _medsr_output(folder: Path) -> bool:
    """A folder medsr may replace as a whole: missing, empty, or holding a report.json that medsr wrote."""
    if not os.path.lexists(folder):
        return True
    if folder.is_symlink() or not folder.is_dir():
        return False
    if not any(folder.iterdir()):
        return True
    try:
        return "medsr_version" in json.loads((folder / "report.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _conflict(folder: Path, inputs: Sequence[Path]) -> str:
    """Why ``folder`` cannot receive outputs ("" when it can)."""
    for src in inputs:
        if _overlap(folder, src):
            return f"it would overwrite the input {src}"
    if os.path.lexists(folder) and (folder.is_symlink() or not folder.is_dir()):
        return "a link or file medsr did not make is there"
    if not _medsr_output(folder):
        return "it holds files medsr did not write"
    return ""


@dataclass
class Destination:
    """Where one input (as given) goes; ``note`` says why the plain name was not used ("" when it was)."""

    source: Path
    folder: Path
    note: str = ""


def plan_destinations(sources: Sequence[str | os.PathLike[str]],
                      out_root: str | os.PathLike[str]) -> list[Destination]:
    """One output folder per distinct input, unique within the run, never on or around any input.

    The plain name is the input's (``output_name``); when another input of the run already took it, when it
    would land on an input, or when it holds files medsr did not write, a short hash of the input's resolved
    path is appended (stable across runs) and the note says why. Listing one input twice enhances it once.
    """
    root = Path(out_root).resolve()
    inputs = [Path(s).resolve() for s in sources]
    given: dict[Path, str | os.PathLike[str]] = {}
    for src, spelled in zip(inputs, sources):
        given.setdefault(src, spelled)  # the first spelling of each distinct input names its folder
    taken: dict[Path, Path] = {}
    plan: list[Destination] = []
    for src, spelled in given.items():
        base = output_name(spelled)
        digest = hashlib.sha1(str(src).encode("utf-8")).hexdigest()
        reasons = []
        for name in (base, f"{base[:55]}_{digest[:8]}", f"{base[:47]}_{digest[:16]}"):
            folder = root / name
            why = (f"{taken[folder]} has the same name" if folder in taken else _conflict(folder, inputs))
            if not why:
                break
            reasons.append(why)
        else:
            raise MedsrError(f"{src}: no free output folder under {root} ({'; '.join(reasons)})")
        taken[folder] = src
        note = f"{src}: outputs go to {folder} instead of {root / base} ({reasons[0]})" if reasons else ""
        plan.append(Destination(Path(spelled), folder, note))
    return plan


def _finite(value: Any) -> Any:
    """Non-finite floats as null: report.json stays strict JSON (a bare NaN breaks every JSON reader)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _swap_in(build: Path, folder: Path) -> None:
    """Put the finished ``build`` folder at ``folder``; an older output there is removed only afterwards."""
    old_holder = None
    if os.path.lexists(folder):
        old_holder = Path(tempfile.mkdtemp(prefix=f".old-{folder.name}-", dir=folder.parent))
        os.rename(folder, old_holder / "old")  # renames a link itself; never follows it
    try:
        os.rename(build, folder)
    except BaseException:
        if old_holder is not None:
            os.rename(old_holder / "old", folder)
        raise
    finally:
        if old_holder is not None:
            shutil.rmtree(old_holder, ignore_errors=True)


def write_outputs(scan: Scan, result: EnhanceResult, model: LoadedModel, options: EnhanceOptions,
                  out_root: str | os.PathLike[str], name: str | None = None, formats: str = "nifti",
                  save_samples: bool = False, inputs: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """Write all outputs for ``scan`` into ``out_root/name`` (name sanitised); returns that folder.

    Everything is built in a private ``tempfile.mkdtemp`` folder inside ``out_root`` and renamed into place
    when complete, so ``out_root/name`` is always one run's whole output (a rerun replaces it, leaving nothing
    of the earlier run) and never half-written. Refused (:class:`MedsrError`): a folder that is or holds
    ``scan.source`` or any of ``inputs``, a link or file planted at the name, a folder medsr did not write.
    """
    if formats not in ("nifti", "dicom", "both"):
        raise ValueError(f"formats must be nifti, dicom or both, got {formats!r}")
    root = safe_join(out_root)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / sanitize_component(name or scan.name)
    protected = [Path(p).resolve() for p in [*inputs, *([scan.source] if scan.source else [])]]
    why = _conflict(folder, protected)
    if why:
        raise MedsrError(f"refusing to write {folder}: {why}")
    build = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=root))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(build, 0o777 & ~umask)  # mkdtemp makes 0700; a finished output gets the usual permissions
        _write_all(scan, result, model, options, build, formats, save_samples)
        _swap_in(build, folder)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return folder


def _write_all(scan: Scan, result: EnhanceResult, model: LoadedModel, options: EnhanceOptions, folder: Path,
               formats: str, save_samples: bool) -> None:
    """Every output file into ``folder`` (private, fresh); report.json last."""
    written: list[str] = []
    if formats in ("nifti", "both"):
        for key in ("mean", "std", "q05", "q95"):
            save_nifti(getattr(result, key), folder / f"{key}.nii.gz")
            written.append(f"{key}.nii.gz")
    if formats in ("dicom", "both"):
        scale = "x".join(str(f) for f in result.factors)
        n = options.samples
        denoise = result.info.get("model_choice", {}).get("task") == "denoise"
        write_dicom(scan, result, folder, "medsr SR3 denoise" if denoise else f"medsr SR3 {scale}", n)
        written += ["dicom_mean/", "dicom_std/"]
    if save_samples and result.samples is not None:
        samples = Scan(array=result.samples.astype(np.float32), affine=result.mean.affine,
                       modality=scan.modality, source=scan.source)
        save_nifti(samples, folder / "samples.nii.gz")
        written.append("samples.nii.gz")
    if result.info.get("task") == "throughplane":  # a reformatted plane: where thick slices show
        _through_plane_review(scan, result, folder / "review.png", options, _units(scan))
    else:
        halfwidth = 0.5 * (result.q95.array[0] - result.q05.array[0])
        review_figure(scan.array[0], result.mean.array[0], halfwidth, result.factors, folder / "review.png",
                      title=_review_title(result, options), units=f"({_units(scan)})",
                      slice_axis=2 if result.info.get("slice_axis") is None else result.info["slice_axis"],
                      affine=scan.affine, heat_label="± half-width of 90% interval",
                      heat_title="uncertainty: ± half-width of the 90% interval")
    written.append("review.png")
    report = _finite(build_report(scan, result, model, options))
    report["files"] = written + ["report.json"]
    with atomic_path(folder / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, allow_nan=False))


def _through_plane_review(scan: Scan, result: EnhanceResult, path: Path, options: EnhanceOptions, units: str) -> None:
    from medsr.review import through_plane_figure
    from medsr.through_plane import cubic_along

    axis = int(result.info["thick_axis"])
    factor = int(result.factors[axis])
    through_plane_figure(scan.array[0], cubic_along(scan.array[0], axis, factor), result.mean.array[0],
                         result.std.array[0], axis, factor, path,
                         title=f"medsr through-plane x{factor} along axis {axis}, {options.samples} samples; "
                               f"90% interval ±{result.score.halfwidth:.3g} {units} on average "
                               f"({result.score.value:.2f}% of range)", units=units, affine=scan.affine)
