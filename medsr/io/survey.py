"""What DICOM files hold, from their headers alone: which are images, of which series, and which are damaged.

Both ``load_dicom`` (a folder) and the archive's discovery start here, so DICOM classification lives in one
place. Headers are read without pixel data, so a survey is quick even on large archives; a file whose pixel
data is cut short is still caught, because the pixel element's stated length runs past the end of the file.

Instances are deduplicated by SOPInstanceUID: archives often hold several copies of one image (a backup, a
re-export), and stacking both copies would give two slices at one position. The first readable copy in path
order is kept; damaged copies are reported on their own and never take the series down.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import UID, MediaStorageDirectoryStorage

__all__ = ["DicomHeader", "DicomSeries", "DicomSurvey", "read_header", "survey", "patient_identifiers",
           "int_or_none"]

_PIXEL_DATA = Tag(0x7FE0, 0x0010)
_UNDEFINED_LENGTH = 0xFFFFFFFF
_DEFER = 4096  # bytes: larger values (pixel data) are skipped over, not read
_PATIENT_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate",
                     "PatientAddress", "PatientTelephoneNumbers", "IssuerOfPatientID", "AccessionNumber",
                     "ReferringPhysicianName", "PatientMotherBirthName", "MedicalRecordLocator")


def int_or_none(value: Any) -> int | None:
    """An integer DICOM value (IS, US) or None where it is absent or not a number."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class DicomHeader:
    """What medsr keeps of one DICOM file's header (never patient data).

    Attributes:
        path: the file.
        kind: "image" (has Rows: pixel data follows), "non-image" (SR, RTSTRUCT, ...), "dicomdir" (an index)
            or "damaged" (a DICOM file cut short or corrupted).
        problem: for damaged files, what is wrong (one line, no patient data).
        series_uid, sop_instance_uid: SeriesInstanceUID and SOPInstanceUID ("" where absent).
        sop_class: the SOP class name, e.g. "CT Image Storage".
        rows, columns, frames: image size and NumberOfFrames (0, 0, 1 for non-images).
        pixel_spacing: PixelSpacing ``(row spacing, column spacing)`` in mm, None where absent.
        slice_spacing: SpacingBetweenSlices, else SliceThickness, in mm; None where absent.
        localizer: ImageType contains LOCALIZER (a scout image, not a diagnostic one).
    """

    path: Path
    kind: str
    problem: str = ""
    series_uid: str = ""
    sop_instance_uid: str = ""
    sop_class: str = "unknown SOP class"
    modality: str = ""
    series_number: int | None = None
    description: str = ""
    rows: int = 0
    columns: int = 0
    frames: int = 1
    pixel_spacing: tuple[float, float] | None = None
    slice_spacing: float | None = None
    localizer: bool = False


def _has_dicm_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _parse(path: Path) -> Dataset | DicomHeader | None:
    """The dataset without pixel values; a damaged header, or None for a file that is not DICOM at all."""
    try:
        return pydicom.dcmread(path, defer_size=_DEFER)
    except InvalidDicomError:  # no preamble: accept it only if it parses and names a SOP class
        try:
            ds = pydicom.dcmread(path, defer_size=_DEFER, force=True)
        except Exception:
            return None
        return ds if "SOPClassUID" in ds else None
    except Exception as exc:  # pydicom raises many types on damaged files
        if not _has_dicm_magic(path):
            return None
        return DicomHeader(path, "damaged", f"DICOM header unreadable ({type(exc).__name__}); the file is "
                                            "truncated or damaged")


def _pixel_shortfall(ds: Dataset, path: Path) -> str:
    """Why the pixel data is cut short ("" when it is complete or its length is not stated)."""
    raw = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED_LENGTH or raw.value_tell is None:
        return ""
    size = os.path.getsize(path)
    if raw.value_tell + raw.length <= size:
        return ""
    have = max(0, size - raw.value_tell)
    return f"pixel data cut short ({have} of {raw.length} bytes); the file is truncated or damaged"


def _spacing(ds: Dataset) -> tuple[tuple[float, float] | None, float | None]:
    """PixelSpacing and slice spacing, from the top level or the shared functional groups (enhanced files)."""
    item: Any = ds
    shared = ds.get("SharedFunctionalGroupsSequence")
    if "PixelSpacing" not in ds and shared and shared[0].get("PixelMeasuresSequence"):
        item = shared[0].PixelMeasuresSequence[0]
    ps = item.get("PixelSpacing") or item.get("ImagerPixelSpacing")
    pair = [_float_or_none(v) for v in ps] if ps is not None and len(ps) == 2 else []
    pixel = (pair[0], pair[1]) if len(pair) == 2 and None not in pair else None
    step = _float_or_none(item.get("SpacingBetweenSlices") or item.get("SliceThickness"))
    return pixel, step  # type: ignore[return-value]


def read_header(path: str | os.PathLike[str]) -> DicomHeader | None:
    """Classify one file from its header; None when it is not DICOM at all (text, PNG, NIfTI, ...)."""
    path = Path(path)
    parsed = _parse(path)
    if parsed is None or isinstance(parsed, DicomHeader):
        return parsed
    ds = parsed
    meta = getattr(ds, "file_meta", None)
    sop = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta is not None else ""))
    name = UID(sop).name if sop else "unknown SOP class"
    if sop == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds:
        return DicomHeader(path, "dicomdir", sop_class=name)
    image_type = ds.get("ImageType", [])
    image_type = [image_type] if isinstance(image_type, str) else list(image_type or [])
    pixel, step = _spacing(ds)
    fields: dict[str, Any] = dict(
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""), sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        sop_class=name, modality=str(ds.get("Modality", "") or ""),
        series_number=int_or_none(ds.get("SeriesNumber")), description=str(ds.get("SeriesDescription", "") or ""),
        rows=int_or_none(ds.get("Rows")) or 0, columns=int_or_none(ds.get("Columns")) or 0,
        frames=int_or_none(ds.get("NumberOfFrames")) or 1, pixel_spacing=pixel, slice_spacing=step,
        localizer="LOCALIZER" in [str(v).upper() for v in image_type])
    if "Rows" not in ds:
        # pydicom stops quietly where a file is cut: an image object without Rows is damaged, not a non-image one
        if "SOPClassUID" not in ds or "Image" in name:
            return DicomHeader(path, "damaged", f"{name}: DICOM header cut short; the file is truncated or damaged",
                               **fields)
        return DicomHeader(path, "non-image", **fields)
    short = _pixel_shortfall(ds, path)
    if short or "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return DicomHeader(path, "damaged", f"{name}: {short or 'no pixel data: the file is truncated or damaged'}",
                           **fields)
    return DicomHeader(path, "image", **fields)


@dataclass
class DicomSeries:
    """The readable objects of one series, one file per SOP instance, in path order.

    Attributes:
        key: the SeriesInstanceUID, or ``file:<path>`` for a file without one (each such file stands alone).
        files: image and non-image objects of the series (damaged files and duplicate copies are not here).
        copies: for each kept file with duplicates, the other readable copies in path order (fallbacks when the
            kept copy's pixel data turns out not to decode).
    """

    key: str
    files: list[DicomHeader]
    copies: dict[Path, list[Path]] = field(default_factory=dict)

    @property
    def uid(self) -> str:
        return self.files[0].series_uid

    @property
    def images(self) -> list[DicomHeader]:
        return [h for h in self.files if h.kind == "image"]

    @property
    def number(self) -> int | None:
        return self.files[0].series_number

    @property
    def description(self) -> str:
        return self.files[0].description

    @property
    def modality(self) -> str:
        return self.files[0].modality


@dataclass
class DicomSurvey:
    """Series found among some files, and the files left out (damaged, DICOMDIR, duplicates, non-DICOM)."""

    series: list[DicomSeries]
    damaged: list[DicomHeader]
    dicomdirs: list[DicomHeader]
    duplicates: list[DicomHeader]
    not_dicom: list[Path]

    def skipped_kinds(self) -> list[str]:
        """A short note per left-out file, for "nothing found (skipped: ...)" messages."""
        notes = ["non-DICOM"] * len(self.not_dicom) + ["DICOMDIR"] * len(self.dicomdirs)
        notes += ["damaged DICOM"] * len(self.damaged)
        notes += [f"{h.sop_class} (no pixel data)" for s in self.series for h in s.files if h.kind != "image"]
        return notes


def _dedup(headers: list[DicomHeader]) -> tuple[list[DicomHeader], list[DicomHeader], dict[Path, list[Path]]]:
    """One header per SOPInstanceUID (the first in path order); the rest are duplicates of it."""
    kept: dict[str, DicomHeader] = {}
    files, duplicates = [], []
    copies: dict[Path, list[Path]] = {}
    for h in sorted(headers, key=lambda h: str(h.path)):
        first = kept.get(h.sop_instance_uid) if h.sop_instance_uid else None
        if first is None:
            if h.sop_instance_uid:
                kept[h.sop_instance_uid] = h
            files.append(h)
        else:
            duplicates.append(h)
            copies.setdefault(first.path, []).append(h.path)
    return files, duplicates, copies


def survey(paths: Iterable[str | os.PathLike[str]]) -> DicomSurvey:
    """Read the headers of ``paths`` and group the DICOM objects by SeriesInstanceUID.

    Series are sorted by (SeriesNumber, UID); each holds one file per SOPInstanceUID. Files that are not DICOM
    are listed in ``not_dicom``, never raised on: callers decide whether that matters.
    """
    groups: dict[str, list[DicomHeader]] = {}
    out = DicomSurvey([], [], [], [], [])
    for p in sorted(Path(p) for p in paths):
        h = read_header(p)
        if h is None:
            out.not_dicom.append(p)
        elif h.kind == "damaged":
            out.damaged.append(h)
        elif h.kind == "dicomdir":
            out.dicomdirs.append(h)
        else:
            groups.setdefault(h.series_uid or f"file:{p}", []).append(h)
    for key, members in groups.items():
        files, duplicates, copies = _dedup(members)
        out.series.append(DicomSeries(key, files, copies))
        out.duplicates += duplicates
    out.series.sort(key=lambda s: (s.number is None, s.number or 0, s.key))
    return out


def patient_identifiers(path: str | os.PathLike[str]) -> list[str]:
    """Patient identifier values in a file's header (names also with spaces for ^), so they can be blanked
    from messages; empty when the file cannot be read. Never log what this returns."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:
        return []
    values = []
    for kw in _PATIENT_KEYWORDS:
        v = ds.get(kw)
        for x in (v if isinstance(v, (list, MultiValue)) else [v]):
            text = str(x or "").strip()
            if len(text) >= 3:
                values += [text, text.replace("^", " ")]
    return values
