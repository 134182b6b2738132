"""DICOM out: a derived series, one single-frame file per slice, that PACS and viewers file with its study.

Patient and study tags come from the reference scan so the result lands beside the original; geometry comes
from the written scan's own affine (it is often on a refined grid), converted back from RAS+ to DICOM's LPS.
Pixels are stored as int16 with Rescale Slope/Intercept chosen from the data, so float results (a super-
resolved CT in HU, an uncertainty map) survive to within half a rescale step.
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from medsr.errors import MedsrError
from medsr.io.dicom_read import LPS_TO_RAS, check_voxels
from medsr.io.paths import atomic_path
from medsr.io.scan import Scan

__all__ = ["save_dicom_series"]

_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                  "ReferringPhysicianName", "StudyID", "AccessionNumber")  # type 2: present, maybe empty
_OPTIONAL = ("SpecificCharacterSet", "PatientAge", "StudyDescription", "PositionReferenceIndicator",
             "BodyPartExamined", "PatientPosition", "PatientIdentityRemoved", "DeidentificationMethod",
             "KVP", "ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType",
             "RepetitionTime", "EchoTime", "EchoTrainLength", "MagneticFieldStrength")
_SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}
_OUR_FILES = re.compile(r"IM\d{6}\.dcm")


def _ds(value: float) -> str:
    """A DS string (at most 16 characters); callers quantise with the parsed value so rounding is exact."""
    return format_number_as_ds(float(value))


def _rescale(values: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) so that ``values`` fit int16: exact for integer data that fits, else 65000 steps."""
    lo, hi = float(values.min()), float(values.max())
    if lo >= -32768 and hi <= 32767 and np.array_equal(values, np.round(values)):
        return 1.0, 0.0
    slope = float(_ds((hi - lo) / 65000.0)) if hi - lo > 1e-9 else 1.0
    return slope, float(_ds((hi + lo) / 2.0))


def _grid(affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
    """Row/column directions, spacings, slice origins (LPS) and Z order of a RAS affine, as DICOM needs them.

    DICOM can only describe an orthogonal grid whose slices step along the row x column normal; a scan whose
    Z axis points the other way is written in reverse order (same world positions, Z flipped on reading).
    """
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    m = lps[:3, :3]
    sizes = np.linalg.norm(m, axis=0)
    if np.any(sizes < 1e-9):
        raise MedsrError(f"affine has a zero-length axis: {sizes}")
    row, col, step = m[:, 0] / sizes[0], m[:, 1] / sizes[1], m[:, 2]
    normal = np.cross(row, col)
    if abs(row @ col) > 1e-4 or abs(abs(step @ normal) / sizes[2] - 1.0) > 1e-6:
        raise MedsrError("affine is sheared (axes not orthogonal); DICOM image planes cannot represent it")
    order = np.arange(shape[2])[:: -1 if step @ normal < 0 else 1]
    origins = lps[:3, 3][None] + order[:, None] * step[None]
    return row, col, sizes, origins, order


def _base(reference: Scan, modality: str, description: str, series_number: int | None) -> Dataset:
    """Tags shared by every file: patient/study from the reference, a new derived series."""
    ref = reference.dicom_headers[0] if reference.dicom_headers else None
    ds = Dataset()
    if ref is None:
        ds.PatientName, ds.PatientID = "ANONYMOUS", "ANONYMOUS"
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid()
    else:
        for kw in ("StudyInstanceUID", "FrameOfReferenceUID"):
            setattr(ds, kw, ref.get(kw) or generate_uid())
        for kw in _OPTIONAL:
            if kw in ref:
                ds[kw] = ref[kw]
    for kw in _PATIENT_STUDY:
        if kw not in ds:
            setattr(ds, kw, ref.get(kw, "") if ref is not None else "")
    now = datetime.datetime.now()
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ref_number = int(ref.get("SeriesNumber") or 0) if ref is not None else 0
    ds.SeriesNumber = series_number if series_number is not None else ref_number + 1000
    ds.SeriesDescription = description[:64]
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = f"medsr: {description}"[:1024]
    ds.SoftwareVersions = "medsr"
    ds.Manufacturer = ""
    ds.SOPClassUID = _SOP_CLASS.get(modality, SecondaryCaptureImageStorage)
    if ds.SOPClassUID == SecondaryCaptureImageStorage:
        ds.ConversionType = "WSD"  # workstation
    elif modality == "MR":
        ds.ScanningSequence = ds.get("ScanningSequence") or "RM"  # type 1: research mode when unknown
        ds.SequenceVariant = ds.get("SequenceVariant") or "NONE"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def save_dicom_series(scan: Scan, reference: Scan, out_dir: str | os.PathLike[str], description: str, *,
                      series_number: int | None = None, overwrite: bool = False) -> list[Path]:
    """Write ``scan`` as a new derived DICOM series in ``out_dir`` (``IM000001.dcm``, ...).

    Args:
        scan: the result, ``(1, X, Y, Z)``; its affine gives the geometry (it may be a refined grid).
        reference: the scan the result derives from; its DICOM headers supply patient and study tags. Without
            headers, minimal tags are made (Patient ID "ANONYMOUS", new Study UID).
        out_dir: folder to create; file names never come from DICOM text.
        description: SeriesDescription (64 characters kept) and DerivationDescription.
        series_number: SeriesNumber; default the reference's plus 1000.
        overwrite: replace an earlier medsr series in ``out_dir`` instead of refusing.

    Returns:
        The written files, in slice order along the normal.

    Raises:
        MedsrError: several channels, NaN/Inf or empty data, a sheared affine, or an occupied ``out_dir``.
    """
    out_dir = Path(out_dir)
    if scan.array.ndim != 4 or scan.array.shape[0] != 1:
        raise MedsrError(f"{out_dir}: DICOM output needs one channel, got array shape {scan.array.shape}")
    check_voxels(scan.array, out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MedsrError(f"{out_dir}: exists and is not a folder")
    old = [p for p in out_dir.glob("IM*.dcm") if _OUR_FILES.fullmatch(p.name)] if out_dir.is_dir() else []
    if old and not overwrite:
        raise MedsrError(f"{out_dir}: already holds a DICOM series ({len(old)} files); "
                         "choose an empty folder or pass overwrite=True")
    for p in old:
        p.unlink()
    values = np.asarray(scan.array[0], dtype=np.float64)  # (X, Y, Z)
    row, col, sizes, origins, order = _grid(scan.affine, scan.spatial_shape)
    modality = scan.modality or (str(reference.dicom_headers[0].get("Modality", ""))
                                 if reference.dicom_headers else "") or "OT"
    base = _base(reference, modality, description, series_number)
    slope, intercept = _rescale(values)
    stored = np.clip(np.round((values - intercept) / slope), -32768, 32767).astype("<i2")
    lo, hi = float(values.min()), float(values.max())
    base.RescaleSlope, base.RescaleIntercept = _ds(slope), _ds(intercept)
    base.RescaleType = "HU" if modality == "CT" else "US"
    base.WindowCenter, base.WindowWidth = _ds((lo + hi) / 2), _ds(max(hi - lo, 1.0))
    base.Rows, base.Columns = int(values.shape[1]), int(values.shape[0])
    base.PixelSpacing = [_ds(sizes[1]), _ds(sizes[0])]  # [row spacing (along Y), column spacing (along X)]
    base.SliceThickness = base.SpacingBetweenSlices = _ds(sizes[2])
    base.ImageOrientationPatient = [_ds(v) for v in (*row, *col)]
    normal = np.cross(row, col)
    paths = []
    for n, (z, ipp) in enumerate(zip(order, origins, strict=True), start=1):
        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = n
        ds.ImagePositionPatient = [_ds(v) for v in ipp]
        ds.SliceLocation = _ds(ipp @ normal)
        ds.PixelData = np.ascontiguousarray(stored[:, :, z].T).tobytes()  # (rows, columns)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = out_dir / f"IM{n:06d}.dcm"
        with atomic_path(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        paths.append(path)
    return paths
