"""Enhance one archive item, in whichever process runs it; the outcome goes back as a plain dict.

An item is written into its own staging folder (``OUT/.medsr-archive/staging/<key>/``) by ``write_outputs`` and
renamed into place only once complete, so a folder in the mirrored tree is always a finished output, whatever
moment the run is killed at. Worker processes load each model once (:func:`init_worker`, a
:class:`medsr.model_picker.ModelPicker`) and never open the manifest; the main process of the rank records what
comes back. The model of an item is chosen as ``medsr enhance`` chooses it: ``auto`` from the item's geometry
(thick slices → the through-plane model), else the one given; report.json says which ran and why.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medsr.enhance import EnhanceOptions
from medsr.errors import Category, MedsrError
from medsr.io import Scan, load_dicom_files, load_scan, patient_identifiers
from medsr.model import LoadedModel
from medsr.model_choice import ModelChoice
from medsr.model_picker import ModelPicker
from medsr.outputs import write_outputs
from medsr.through_plane import enhance_with_choice

__all__ = ["WorkerSettings", "init_worker", "process", "categorise", "CATEGORY_LABELS"]

# MedsrError category -> the archive's short reason (the failures-by-reason table groups on it). Every input
# category means the item cannot be enhanced (skipped); Category.INVALID is not about the input (a failure).
CATEGORY_LABELS = {
    Category.NOT_FOUND: "unreadable file",
    Category.UNREADABLE: "unreadable file",
    Category.DAMAGED: "truncated or damaged DICOM",
    Category.NOT_IMAGE: "non-image DICOM",
    Category.UNDECODABLE: "undecodable pixel data",
    Category.GEOMETRY: "irregular geometry",
    Category.UNSUPPORTED: "unsupported layout",
    Category.EMPTY: "empty image",
    Category.NON_FINITE: "NaN/Inf voxels",
    Category.TOO_SMALL: "too small",
    Category.TOO_LARGE: "too large",
}


def categorise(error: MedsrError) -> str:
    """The archive's short reason for an error about the input; "" when the error is not about the input."""
    return CATEGORY_LABELS.get(error.category, "")


@dataclass
class WorkerSettings:
    """What every worker needs besides the item: the model and how to sample and write."""

    model_path: str  # "auto" (chosen per item from its geometry), or a checkpoint path
    options: EnhanceOptions
    formats: str = "auto"  # auto: both for DICOM input, nifti for NIfTI
    min_size: int = 8
    threads: int = 0  # torch CPU threads in this process; 0 = leave as is


_STATE: dict[str, Any] = {}


def init_worker(settings: WorkerSettings, model: LoadedModel | ModelPicker | None = None) -> None:
    """Set up this process's model picker (models load on first use, once each), or take the main process's
    (a picker, or one model already loaded for ``settings.model_path``)."""
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    if model is None:  # a pool worker: end with the main process, even when that one is killed with -9
        _die_with_parent()
        picker = ModelPicker(settings.model_path, settings.options.device)
        picker.check()
    elif isinstance(model, ModelPicker):
        picker = model
    else:
        picker = ModelPicker(settings.model_path, settings.options.device, {settings.model_path: model})
    _STATE.update(settings=settings, picker=picker)


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def _load(task: dict[str, Any]) -> Scan:
    """The item as a Scan: a NIfTI file, or exactly the DICOM files discovery gave it."""
    root = Path(task["root"])
    sources = [root / rel for rel in task["sources"]]
    if task["kind"] != "dicom":
        return load_scan(sources[0])
    return load_dicom_files(sources, series_uid=task["series_uid"] or None)


def _too_small(scan: Scan, model: LoadedModel, choice: ModelChoice, min_size: int) -> str:
    """In-plane jobs need planes of ``min_size``; through-plane jobs planes across the thick axis that large (the
    thick axis itself may be short: it is the one refined)."""
    shape = scan.spatial_shape
    if choice.task == "throughplane" or model.degradation.spatial_dims == 2:
        dims = tuple(shape[a] for a in range(3) if a != choice.axis)
    else:
        dims = shape
    if min(dims) < min_size:
        return f"image too small to enhance: {dims} voxels per plane, fewer than min_size {min_size}"
    return ""


def _patient_values(task: dict[str, Any]) -> list[str]:
    """Patient identifiers of a DICOM item, so they can be blanked from error messages."""
    return patient_identifiers(Path(task["root"]) / task["sources"][0]) if task["kind"] == "dicom" else []


def _clean(message: str, task: dict[str, Any], staging: Path) -> str:
    """One line, with paths made relative to the archive and any patient identifier blanked."""
    first = (message.strip().splitlines() or [""])[0]
    first = first.replace(str(staging), "<staging>").replace(str(Path(task["root"])) + os.sep, "")
    for value in _patient_values(task):
        first = first.replace(value, "<redacted>")
    return first[:500]


def _publish(folder: Path, final: Path, staging: Path) -> None:
    """Rename the finished folder into place; a stale folder without report.json there is moved aside first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        os.replace(final, staging / "stale")
    os.rename(folder, final)


def process(task: dict[str, Any]) -> dict[str, Any]:
    """Enhance one item end to end; never raises (one bad item never stops the run).

    Args:
        task: id, kind, root (archive folder), sources (relative), series_uid, label (for messages),
            out_dir (absolute final folder), staging (absolute, private to this item).

    Returns:
        ``{"state": done|skipped|failed, "category", "reason", "seconds", "score", "pid"}``.
    """
    settings: WorkerSettings = _STATE["settings"]
    picker: ModelPicker = _STATE["picker"]
    t0 = time.perf_counter()
    staging = Path(task["staging"])
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    def outcome(state: str, category: str = "", reason: str = "", score: float | None = None) -> dict[str, Any]:
        return {"state": state, "category": category, "reason": reason, "score": score,
                "seconds": round(time.perf_counter() - t0, 3), "pid": os.getpid()}

    try:
        try:  # any problem reading the input means it cannot be enhanced: skipped, with the reason
            scan = _load(task)
            model, choice = picker.pick_for(scan)
            small = _too_small(scan, model, choice, settings.min_size)
            if small:
                raise MedsrError(small, Category.TOO_SMALL)
        except MedsrError as exc:
            return outcome("skipped", categorise(exc) or "unusable input", _clean(str(exc), task, staging))
        try:
            result = enhance_with_choice(scan, model, choice, settings.options)
        except MedsrError as exc:  # a problem of the input (too small, say) skips it; anything else is a failure
            category = categorise(exc)
            state = "skipped" if category else "failed"
            return outcome(state, category or "enhance error", _clean(str(exc), task, staging))
        formats = settings.formats
        if not scan.dicom_headers:
            formats = "nifti"  # a derived DICOM series needs DICOM reference headers
        elif formats == "auto":
            formats = "both"
        final = Path(task["out_dir"])
        folder = write_outputs(scan, result, model, settings.options, staging / "out", name=final.name,
                               formats=formats)
        _publish(folder, final, staging)
        return outcome("done", score=float(result.score.value))
    except Exception as exc:  # anything else is a failure of this item only
        return outcome("failed", f"error: {type(exc).__name__}", _clean(f"{type(exc).__name__}: {exc}", task, staging))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
