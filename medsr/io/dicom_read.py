"""DICOM in: single-frame files, multi-frame files (enhanced, legacy) and series folders, as a :class:`Scan`.

Geometry follows the DICOM Image Plane module (PS3.3 C.7.6.2). Slices are ordered by ImagePositionPatient
projected on the slice normal (row x column direction of ImageOrientationPatient), never by file name or
InstanceNumber, which scanners and archives do not keep consistent. The affine is built in DICOM's LPS
patient frame, then flipped to the RAS+ frame nibabel and MONAI use. Anything that would give a wrong grid
(missing slice, uneven spacing, mixed orientations) is refused with a :class:`MedsrError` rather than guessed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, MediaStorageDirectoryStorage

from medsr.errors import Category, MedsrError
from medsr.io.scan import Scan
from medsr.io.survey import DicomHeader, DicomSeries, DicomSurvey, survey
from medsr.io.validate import check_declared_size, check_decoded_shape, check_dicom_frames

__all__ = ["load_dicom", "load_dicom_files", "list_series", "check_voxels", "LPS_TO_RAS"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_REL_TOL = 0.01  # relative tolerance on slice gaps and stack shear
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def check_voxels(array: np.ndarray, where: str | os.PathLike[str]) -> None:
    """Refuse empty arrays and NaN/Inf voxels, which would silently poison every later stage."""
    if array.size == 0:
        raise MedsrError(f"{where}: empty image (shape {tuple(array.shape)})", Category.EMPTY)
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise MedsrError(f"{where}: {bad} voxels are NaN or Inf", Category.NON_FINITE)


def _read(path: Path) -> Dataset:
    """Read one file; files without the 128-byte preamble are accepted when they look like DICOM."""
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass
    except Exception as exc:  # pydicom raises many types on truncated files
        problem = f"unreadable DICOM file, truncated or corrupted ({type(exc).__name__})"
        raise MedsrError(f"{path}: {problem}", Category.DAMAGED) from None
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception:
        ds = None
    if ds is None or "SOPClassUID" not in ds:
        raise MedsrError(f"{path}: not a DICOM file", Category.UNREADABLE)
    return ds


def _sop_name(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta is not None else "")
    return UID(str(uid)).name if uid else "unknown SOP class"


@dataclass
class _Frame:
    """What one slice contributes: stored pixels ``(rows, cols, samples)`` and its plane geometry."""

    pixels: np.ndarray
    ipp: np.ndarray | None
    iop: np.ndarray | None
    spacing: tuple[float, float] | None  # PixelSpacing: (row spacing, column spacing)
    slope: float
    intercept: float


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def _num(value: Any, default: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if np.isfinite(out) else default


def _plane(item: Dataset) -> tuple[np.ndarray | None, np.ndarray | None, tuple[float, float] | None]:
    """IPP, IOP and PixelSpacing of a dataset or functional-group item (None where absent)."""
    spacing = _floats(item.get("PixelSpacing") or item.get("ImagerPixelSpacing"), 2)
    return (_floats(item.get("ImagePositionPatient"), 3), _floats(item.get("ImageOrientationPatient"), 6),
            None if spacing is None else (float(spacing[0]), float(spacing[1])))


def _pixels(ds: Dataset, path: Path) -> np.ndarray:
    """Stored values as ``(frames, rows, cols, samples)``; decoding failures name the transfer syntax."""
    meta = getattr(ds, "file_meta", None)
    ts = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
    frames = int(ds.get("NumberOfFrames") or 1)
    check_declared_size((frames, int(ds.get("Rows") or 0), int(ds.get("Columns") or 0),
                         int(ds.get("SamplesPerPixel") or 1)), (int(ds.get("BitsAllocated") or 8) + 7) // 8, path)
    stored = ds.get("PixelData")
    if stored is not None and ts.is_transfer_syntax and not ts.is_compressed and "BitsAllocated" in ds:
        need = (int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0) * int(ds.get("NumberOfFrames") or 1)
                * int(ds.get("SamplesPerPixel") or 1) * int(ds.BitsAllocated) + 7) // 8
        if len(stored) < need:
            raise MedsrError(f"{path}: pixel data cut short ({len(stored)} of {need} bytes); the file is truncated "
                             "or damaged", Category.DAMAGED)
    try:
        arr = np.asarray(ds.pixel_array)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MedsrError(f"{path}: cannot decode pixel data (transfer syntax {ts.name or 'unknown'} "
                         f"{ts}): {first}", Category.UNDECODABLE) from None
    if int(ds.get("NumberOfFrames") or 1) == 1:
        arr = arr[None]
    if int(ds.get("SamplesPerPixel") or 1) == 1:
        arr = arr[..., None]
    check_decoded_shape(arr.shape, (frames, int(ds.get("Rows") or 0), int(ds.get("Columns") or 0),
                                    int(ds.get("SamplesPerPixel") or 1)), path)
    return arr


def _functional(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """First item of ``sequence`` for frame ``index``: per-frame group first, then the shared group."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        groups_seq = ds.get(groups)
        inner = groups_seq[i].get(sequence) if groups_seq is not None and len(groups_seq) > i else None
        if inner:
            return inner[0]
    return None


def _file_frames(ds: Dataset, path: Path) -> tuple[list[_Frame], float]:
    """Frames of one file and the slice spacing to use when the file holds a single slice."""
    pixels = _pixels(ds, path)
    thickness = _num(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness"), 1.0)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    if not enhanced:  # single-frame, or legacy multi-frame: one plane, frames stepped along its normal
        ipp, iop, spacing = _plane(ds)
        slope, intercept = _num(ds.get("RescaleSlope"), 1.0), _num(ds.get("RescaleIntercept"), 0.0)
        frames = [_Frame(p, ipp, iop, spacing, slope, intercept) for p in pixels]
        if len(frames) > 1 and ipp is not None and iop is not None:
            normal = np.cross(_unit(iop[:3], path), _unit(iop[3:], path))
            for k, f in enumerate(frames):
                f.ipp = ipp + k * thickness * normal
        return frames, thickness
    frames = []
    for k, p in enumerate(pixels):
        pos, ori, meas = (_functional(ds, k, s) for s in
                          ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"))
        value = _functional(ds, k, "PixelValueTransformationSequence") or ds
        ipp = _plane(pos)[0] if pos is not None else None
        iop = _plane(ori)[1] if ori is not None else None
        spacing = _plane(meas)[2] if meas is not None else _plane(ds)[2]
        frames.append(_Frame(p, ipp, iop, spacing, _num(value.get("RescaleSlope"), 1.0),
                             _num(value.get("RescaleIntercept"), 0.0)))
        if meas is not None and k == 0:
            thickness = _num(meas.get("SpacingBetweenSlices") or meas.get("SliceThickness"), thickness)
    return frames, thickness


def _unit(v: np.ndarray, where: Path) -> np.ndarray:
    n = float(np.linalg.norm(v))
    if n < 1e-6:
        raise MedsrError(f"{where}: ImageOrientationPatient has a zero-length direction {tuple(v)}",
                          Category.GEOMETRY)
    return v / n


def _assemble(frames: list[_Frame], thickness: float, where: Path) -> tuple[np.ndarray, ...]:
    """Array ``(C, X, Y, Z)``, RAS affine and the Z order (indices into ``frames``)."""
    check_dicom_frames(frames, thickness, where)
    shapes = {f.pixels.shape for f in frames}
    if len(shapes) > 1:
        raise MedsrError(f"{where}: slices differ in size (rows, columns, samples): {sorted(shapes)}",
                          Category.GEOMETRY)
    if any(f.ipp is None or f.iop is None for f in frames):
        if len(frames) > 1 and any(f.ipp is not None for f in frames):
            raise MedsrError(f"{where}: some slices lack ImagePositionPatient/ImageOrientationPatient",
                              Category.GEOMETRY)
        warnings.warn(f"{where}: no patient geometry (ImagePositionPatient/ImageOrientationPatient); "
                      "assuming axial slices at the origin in stored order", UserWarning, stacklevel=3)
        for k, f in enumerate(frames):
            f.ipp, f.iop = np.array([0.0, 0.0, k * thickness]), np.array([1.0, 0, 0, 0, 1.0, 0])
    iop0 = frames[0].iop
    assert iop0 is not None
    if any(not np.allclose(f.iop, iop0, atol=1e-3) for f in frames):  # type: ignore[arg-type]
        n = len({tuple(np.round(f.iop, 3)) for f in frames})  # type: ignore[arg-type]
        raise MedsrError(f"{where}: mixed slice orientations ({n} different ImageOrientationPatient values); "
                         "a volume needs one orientation", Category.GEOMETRY)
    spacings = {f.spacing for f in frames}
    if len(spacings) > 1:
        raise MedsrError(f"{where}: mixed PixelSpacing values {sorted(s for s in spacings if s)}",
                          Category.GEOMETRY)
    spacing = frames[0].spacing
    if spacing is None:
        warnings.warn(f"{where}: no PixelSpacing; assuming 1 mm pixels", UserWarning, stacklevel=3)
        spacing = (1.0, 1.0)
    row, col = _unit(iop0[:3], where), _unit(iop0[3:], where)
    normal = np.cross(row, col)
    ipps = np.stack([f.ipp for f in frames])  # type: ignore[misc]
    order = np.argsort(ipps @ normal, kind="stable")
    step = _slice_step(ipps[order], normal, where) if len(frames) > 1 else thickness
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * spacing[1], col * spacing[0], normal * step
    lps[:3, 3] = ipps[order[0]]
    rows, cols, channels = frames[0].pixels.shape
    array = np.empty((channels, cols, rows, len(frames)), dtype=np.float32)  # (C, X = columns, Y = rows, Z)
    for z, i in enumerate(order):
        f = frames[i]
        array[..., z] = np.transpose(f.pixels.astype(np.float32) * f.slope + f.intercept, (2, 1, 0))
    return array, LPS_TO_RAS @ lps, order


def _slice_step(ipps: np.ndarray, normal: np.ndarray, where: Path) -> float:
    """Regular slice spacing along the normal of sorted positions; refuses gaps, repeats, shear."""
    pos = ipps @ normal
    gaps = np.diff(pos)
    if np.any(gaps < 1e-3):
        i = int(np.argmax(gaps < 1e-3))
        raise MedsrError(f"{where}: {int(np.sum(gaps < 1e-3)) + 1} or more slices share a position "
                         f"({pos[i]:.3f} mm along the slice normal); several volumes, echoes or time points "
                         "in one series are not supported", Category.GEOMETRY)
    step = float(gaps.min())
    bad = np.abs(gaps - step) > _REL_TOL * step
    if bad.any():
        i = int(np.argmax(bad))
        k = int(round(gaps[i] / step))
        if k >= 2 and abs(gaps[i] - k * step) <= _REL_TOL * step * k:
            first = ", ".join(f"{v:.2f}" for v in ipps[i] + step * normal)
            raise MedsrError(f"{where}: {k - 1} slice(s) missing after slice {i + 1} of {len(pos)} in "
                             f"position order: expected a slice at ImagePositionPatient ({first}) mm "
                             f"(spacing {step:.3f} mm, gap {gaps[i]:.3f} mm)", Category.GEOMETRY)
        raise MedsrError(f"{where}: uneven slice spacing: gaps from {step:.3f} to {gaps.max():.3f} mm along "
                         f"the slice normal (first irregular gap after slice {i + 1} of {len(pos)}, "
                         f"{gaps[i]:.3f} mm); medsr needs a regular grid", Category.GEOMETRY)
    step = float((pos[-1] - pos[0]) / (len(pos) - 1))
    d = np.diff(ipps, axis=0)
    shear = np.linalg.norm(d - np.outer(d @ normal, normal), axis=1)
    if shear.max() > _REL_TOL * step:
        raise MedsrError(f"{where}: slice positions are not stacked along the slice normal (in-plane shift "
                         f"{shear.max():.3f} mm per slice: gantry tilt?); medsr needs an orthogonal grid",
                         Category.GEOMETRY)
    return step


def _headers(datasets: Sequence[Dataset]) -> list[Dataset]:
    for ds in datasets:
        for kw in _PIXEL_KEYWORDS:
            if kw in ds:
                delattr(ds, kw)
    return list(datasets)


def _require_pixels(ds: Dataset, path: Path) -> None:
    """Refuse objects without pixels, telling a truncated image apart from an SR/RTSTRUCT-like object."""
    if any(kw in ds for kw in _PIXEL_KEYWORDS):
        return
    sop = _sop_name(ds)
    if "Rows" in ds or "Image" in sop or "SOPClassUID" not in ds:  # pydicom stops quietly at a cut
        raise MedsrError(f"{path}: {sop} without pixel data: the file is truncated or damaged", Category.DAMAGED)
    raise MedsrError(f"{path}: no image pixel data ({sop}, modality {ds.get('Modality', '') or 'unknown'}); "
                     "medsr reads image objects only", Category.NOT_IMAGE)


def _decoded(candidates: Sequence[Path]) -> tuple[Path, Dataset, list[_Frame], float]:
    """The first copy among ``candidates`` (copies of one SOP instance) whose pixels decode.

    A damaged or undecodable copy gives way to the next one; when none decodes, the first copy's error stands.
    """
    first: MedsrError | None = None
    for path in candidates:
        try:
            ds = _read(path)
            if ds.get("SOPClassUID", "") == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds:
                raise MedsrError(f"{path}: a DICOMDIR index, not an image; give the folder holding the series",
                                 Category.NOT_IMAGE)
            _require_pixels(ds, path)
            frames, thickness = _file_frames(ds, path)
            return path, ds, frames, thickness
        except MedsrError as exc:
            if exc.category not in (Category.DAMAGED, Category.UNDECODABLE):
                raise
            first = first or exc
    assert first is not None
    raise first


def _load_file(path: Path, copies: Sequence[Path] = ()) -> Scan:
    path, ds, frames, thickness = _decoded([path, *copies])
    array, affine, _ = _assemble(frames, thickness, path)
    check_voxels(array, path)
    multi = len(frames) > 1 or "PerFrameFunctionalGroupsSequence" in ds
    return Scan(array=array, affine=affine, modality=str(ds.get("Modality", "")), source=str(path),
                dicom_headers=_headers([ds]), series_uid=str(ds.get("SeriesInstanceUID", "")),
                format="DICOM multi-frame" if multi else "DICOM file", acquisition_axis=2)


def _files_under(folder: Path) -> list[Path]:
    """Every file under ``folder``, hidden files and folders left out."""
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _summary(s: DicomSeries) -> dict[str, Any]:
    return {"uid": s.uid, "description": s.description, "modality": s.modality, "number": s.number,
            "n_files": len(s.images), "files": [h.path for h in s.images]}


def list_series(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The image series under ``folder``: dicts with uid, description, modality, number, n_files, files.

    Reads headers only (:func:`medsr.io.survey.survey`), so it is quick on large archives. Non-DICOM files,
    DICOMDIR indexes, damaged files and objects without pixels (SR, RTSTRUCT) are left out; a SOP instance
    stored twice counts once.
    """
    return [_summary(s) for s in survey(_files_under(Path(folder))).series if s.images]


def _describe(series: list[DicomSeries]) -> str:
    return "\n".join(f"  {s.uid}  \"{s.description}\"  {s.modality}  {len(s.images)} file(s)" for s in series)


def load_dicom(path: str | os.PathLike[str], series_uid: str | None = None) -> Scan:
    """Read a DICOM file (single- or multi-frame) or a folder holding one series into a :class:`Scan`.

    Args:
        path: a DICOM file, or a folder searched recursively (non-DICOM files and DICOMDIR are skipped,
            damaged files and duplicate copies of a SOP instance too).
        series_uid: the SeriesInstanceUID to read when the folder holds several series.

    Returns:
        A scan ``(C, X, Y, Z)`` float32 in physical units (Rescale Slope/Intercept applied; CT in HU),
        with a RAS+ affine and ``acquisition_axis`` 2; ``dicom_headers`` holds the datasets without pixel
        data, in Z order.

    Raises:
        MedsrError: unreadable or non-image files, undecodable pixel data, several series without a
            choice, or a stack that is not a regular grid (missing slice, uneven gaps, mixed orientation).
    """
    path = Path(path)
    if not path.exists():
        raise MedsrError(f"{path}: no such file or folder", Category.NOT_FOUND)
    if path.is_file():
        return _load_file(path)
    return _load_chosen(path, survey(_files_under(path)), series_uid)


def load_dicom_files(paths: Sequence[str | os.PathLike[str]], series_uid: str | None = None,
                     source: str | os.PathLike[str] | None = None) -> Scan:
    """Read exactly ``paths`` as one scan: one (multi-frame) file, or the slices of one series.

    For callers that already know which files make the item (the archive's discovery): no folder is searched
    and no links are needed. Copies of one SOP instance are read once, from the first copy that decodes; a
    damaged file is refused only when no readable copy of its instance is among ``paths``.

    Args:
        paths: the files; order does not matter (slices are ordered by position).
        series_uid: the series to read when the files hold several.
        source: what the scan's ``source`` (and error messages) name; default: the file, or the folder the
            files have in common.

    Raises:
        MedsrError: as :func:`load_dicom`; a file that is missing or not DICOM is an error here, not skipped.
    """
    files = [Path(p) for p in paths]
    if not files:
        raise MedsrError("load_dicom_files: no files given")
    for p in files:
        if not p.is_file():
            raise MedsrError(f"{p}: no such file", Category.NOT_FOUND)
    where = Path(source) if source is not None else (
        files[0] if len(files) == 1 else Path(os.path.commonpath([p.absolute() for p in files])))
    if len(files) == 1:
        scan = _load_file(files[0])
        scan.source = str(where)
        return scan
    found = survey(files)
    if found.not_dicom:
        raise MedsrError(f"{found.not_dicom[0]}: not a DICOM file", Category.UNREADABLE)
    if found.dicomdirs:
        raise MedsrError(f"{found.dicomdirs[0].path}: a DICOMDIR index, not an image", Category.NOT_IMAGE)
    kept = {h.sop_instance_uid for s in found.series for h in s.files if h.sop_instance_uid}
    for h in found.damaged:
        if not h.sop_instance_uid or h.sop_instance_uid not in kept:
            raise MedsrError(f"{h.path}: {h.problem}", Category.DAMAGED)
    return _load_chosen(where, found, series_uid)


def _load_chosen(where: Path, found: DicomSurvey, series_uid: str | None) -> Scan:
    """The one series of ``found`` asked for (or the only one), read into a scan."""
    series = [s for s in found.series if s.images]
    if not series:
        notes = found.skipped_kinds()
        kinds = ", ".join(sorted(set(notes)))
        category = (Category.NOT_IMAGE if found.series else Category.DAMAGED if found.damaged
                    else Category.UNREADABLE)
        raise MedsrError(f"{where}: no DICOM image files found" + (f" (skipped: {kinds})" if kinds else ""),
                         category)
    if series_uid is not None:
        chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            raise MedsrError(f"{where}: no series with SeriesInstanceUID {series_uid}; found:\n"
                             f"{_describe(series)}", Category.NOT_FOUND)
        return _load_series(where, chosen[0])
    if len(series) > 1:
        raise MedsrError(f"{where}: holds {len(series)} DICOM series; choose one with series_uid= "
                         f"(--series-uid on the command line):\n{_describe(series)}")
    return _load_series(where, series[0])


def _load_series(where: Path, series: DicomSeries) -> Scan:
    items: list[DicomHeader] = series.images
    if len(items) == 1:
        scan = _load_file(items[0].path, series.copies.get(items[0].path, []))
        scan.source = str(where)
        return scan
    sizes = {(h.rows, h.columns) for h in items}
    if len(sizes) > 1:
        raise MedsrError(f"{where}: slices of one series differ in Rows/Columns: {sorted(sizes)}", Category.GEOMETRY)
    if any(h.frames > 1 for h in items):
        raise MedsrError(f"{where}: series made of several multi-frame files; load each file on its own",
                         Category.UNSUPPORTED)
    datasets, frames = [], []
    for h in items:
        p, ds, frame, thickness = _decoded([h.path, *series.copies.get(h.path, [])])
        if frame[0].ipp is None or frame[0].iop is None:
            raise MedsrError(f"{p}: no ImagePositionPatient/ImageOrientationPatient; cannot place the slice",
                             Category.GEOMETRY)
        datasets.append(ds)
        frames.extend(frame)
    array, affine, order = _assemble(frames, thickness, where)
    check_voxels(array, where)
    first = datasets[0]
    return Scan(array=array, affine=affine, modality=str(first.get("Modality", "")), source=str(where),
                dicom_headers=_headers([datasets[i] for i in order]),
                series_uid=str(first.get("SeriesInstanceUID", "")), format="DICOM series", acquisition_axis=2)
