"""DICOM out: a derived series, one single-frame file per slice, that PACS and viewers file with its study.

Everything the source says about the patient, the study, the equipment, the acquisition and the contrast is
copied verbatim from the reference header (so the series lands beside the original and validators such as
dicom3tools' ``dcentvfy`` find one consistent study); only what the derivation changes is replaced: the
image pixel, plane, rescale and window attributes, UIDs, series identity, ImageType (DERIVED, SECONDARY and
the source's value 3) and the derivation record. Each image references the source image (or frame) nearest to
it in SourceImageSequence, with DerivationCodeSequence DCM 113085 "Spatial resampling", so a viewer can link
the two. Private tags, overlays and multi-frame functional groups are not copied: they describe the source's
own encoding. Geometry comes from the written scan's affine (often a refined grid), converted from RAS+ to
DICOM's LPS. Pixels are stored as int16 with Rescale Slope/Intercept chosen from the data, so float results
survive to within half a rescale step.
"""

from __future__ import annotations

import copy
import datetime
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from medsr import __version__
from medsr.errors import MedsrError
from medsr.io.dicom_read import LPS_TO_RAS, _functional, _plane, check_voxels
from medsr.io.paths import atomic_path
from medsr.io.scan import Scan

__all__ = ["save_dicom_series", "grid", "RESEARCH_USE", "software_versions", "code_item", "source_images"]

RESEARCH_USE = "medsr research output, not for diagnostic use"
_SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}
_OUR_FILES = re.compile(r"IM\d{6}\.dcm")
# Replaced or meaningless after the derivation; everything else of the source's top level is kept verbatim.
_NOT_COPIED = frozenset({
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "SeriesDate",
    "SeriesTime", "InstanceNumber", "ImageType", "ImagePositionPatient", "ImageOrientationPatient",
    "PatientOrientation", "SliceThickness", "SpacingBetweenSlices", "SliceLocation", "ContentDate", "ContentTime",
    "InstanceCreationDate", "InstanceCreationTime", "InstanceCreatorUID", "DerivationDescription",
    "DerivationCodeSequence", "SourceImageSequence", "SourceImageEvidenceSequence", "ImageComments",
    "IconImageSequence", "NumberOfFrames", "FrameIncrementPointer", "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence", "DimensionOrganizationSequence", "DimensionIndexSequence",
    "DimensionOrganizationType", "ContentQualification", "PresentationLUTShape", "VolumetricProperties",
    "VolumeBasedCalculationTechnique", "PixelPresentation", "ComplexImageComponent", "AcquisitionContrast",
    "ConcatenationUID", "ConcatenationFrameOffsetNumber", "InConcatenationNumber", "InConcatenationTotalNumber",
    "DataSetTrailingPadding", "BurnedInAnnotation", "RecognizableVisualFeatures", "ImagesInAcquisition",
})
_KEEP_0028 = frozenset({"LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"})
# Type 2 attributes of the IODs written here: present (empty when the source has no value).
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber", "Manufacturer", "PositionReferenceIndicator",
          "AcquisitionNumber")
_TYPE2_BY_MODALITY = {"CT": ("KVP",), "MR": ("ScanOptions", "MRAcquisitionType", "RepetitionTime", "EchoTime",
                                                   "EchoTrainLength")}
# Attributes an enhanced (multi-frame) source keeps in its functional groups that a single-frame image holds
# at the top level; lifted from the shared (else first per-frame) group when the top level lacks them.
_LIFTED = ("KVP", "RepetitionTime", "FlipAngle", "EchoTrainLength", "AnatomicRegionSequence")
_CT_WINDOW = (40.0, 400.0, "SOFT TISSUE")  # the usual CT default: centre 40 HU, width 400 HU


def _ds(value: float) -> str:
    """A DS string (at most 16 characters); callers quantise with the parsed value so rounding is exact."""
    return format_number_as_ds(float(value))


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """A code sequence item (Code Value, Coding Scheme Designator, Code Meaning)."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def software_versions(reference: Dataset | None) -> list[str]:
    """The source's software versions followed by medsr's, so both the scanner and the processing show."""
    found = reference.get("SoftwareVersions", "") if reference is not None else ""
    theirs = [found] if isinstance(found, str) else [str(v) for v in found]
    return [*[v for v in theirs if v], f"medsr {__version__}"]


def _rescale(values: np.ndarray, modality: str) -> tuple[float, float]:
    """(slope, intercept) so that ``values`` fit int16: exact for integer data that fits, else 65000 steps.

    MR is stored as integers with no rescale when its range spans at least 256 units (rounding error at most
    half a unit, under 0.2 % of the range): the MR image IOD has no Modality LUT and many viewers ignore one.
    """
    lo, hi = float(values.min()), float(values.max())
    fits = lo >= -32768 and hi <= 32767
    if fits and (np.array_equal(values, np.round(values)) or (modality == "MR" and hi - lo >= 256)):
        return 1.0, 0.0
    slope = float(_ds((hi - lo) / 65000.0)) if hi - lo > 1e-9 else 1.0
    return slope, float(_ds((hi + lo) / 2.0))


def grid(affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
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


def _orientation(direction: np.ndarray) -> str:
    """PatientOrientation letters of an LPS direction: its main components (|c| >= 0.1), largest first."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    order = np.argsort(-np.abs(direction), kind="stable")
    return "".join(letters[i][0 if direction[i] > 0 else 1] for i in order if abs(direction[i]) >= 0.1)


def source_images(reference: Scan) -> list[tuple[Dataset, int | None]]:
    """The reference's images in its Z order: (header, frame number or None for a single-frame file).

    A multi-frame file's frames are ordered as the reader orders them: by position along the slice normal
    when the per-frame functional groups give positions, else in stored order.
    """
    headers = reference.dicom_headers
    if len(headers) != 1 or int(headers[0].get("NumberOfFrames") or 1) <= 1:
        return [(h, None) for h in headers]
    ds = headers[0]
    n = int(ds.NumberOfFrames)
    positions, normal = [], None
    for k in range(n):
        pos, ori = _functional(ds, k, "PlanePositionSequence"), _functional(ds, k, "PlaneOrientationSequence")
        ipp = _plane(pos)[0] if pos is not None else None
        iop = _plane(ori)[1] if ori is not None else None
        if ipp is None or iop is None:
            return [(ds, k + 1) for k in range(n)]
        normal = np.cross(iop[:3], iop[3:]) if normal is None else normal
        positions.append(float(ipp @ normal))
    return [(ds, int(k) + 1) for k in np.argsort(positions, kind="stable")]


def _source_item(ds: Dataset, frame: int | None) -> Dataset:
    """One SourceImageSequence item: the source SOP instance (and frame), purpose DCM 121322."""
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    item.PurposeOfReferenceCodeSequence = DicomSequence(
        [code_item("121322", "DCM", "Source image for image processing operation")])
    return item


def _nearest_sources(reference: Scan, affine: np.ndarray, origins_lps: np.ndarray) -> list[int]:
    """For each written slice, the index (reference Z order) of the source slice nearest to it."""
    count = len(source_images(reference))
    if count == 0:
        return []
    centre_index = np.linalg.inv(np.asarray(reference.affine, np.float64))
    ras = (LPS_TO_RAS[:3, :3] @ origins_lps.T).T  # slice origins in RAS; Z index does not depend on X, Y
    z = (centre_index[:3, :3] @ ras.T).T[:, 2] + centre_index[2, 3]
    return [int(v) for v in np.clip(np.round(z), 0, count - 1)]


def _copied(ref: Dataset) -> Dataset:
    """The source header's top level minus what the derivation replaces (see ``_NOT_COPIED``)."""
    ds = Dataset()
    for elem in ref:
        group = elem.tag.group
        if (elem.tag.is_private or group in (0x0002, 0x7FE0) or 0x5000 <= group <= 0x60FF
                or elem.keyword in _NOT_COPIED or (group == 0x0028 and elem.keyword not in _KEEP_0028)):
            continue
        ds.add(copy.deepcopy(elem))
    return ds


def _lift_functional(ds: Dataset, ref: Dataset) -> None:
    """Copy acquisition and anatomy attributes out of an enhanced source's functional groups (see ``_LIFTED``).

    FrameLaterality becomes ImageLaterality (same values), which keeps the series-level Laterality optional.
    """
    groups = [g[0] for g in (ref.get("SharedFunctionalGroupsSequence"), ref.get("PerFrameFunctionalGroupsSequence"))
              if g]
    for group in groups:
        for outer in group:
            if outer.VR != "SQ" or not outer.value:
                continue
            for elem in outer.value[0]:
                if elem.keyword in _LIFTED and elem.keyword not in ds:
                    ds.add(copy.deepcopy(elem))
                elif elem.keyword == "FrameLaterality" and "ImageLaterality" not in ds and elem.value:
                    ds.ImageLaterality = elem.value


def _window(values: np.ndarray, ref: Dataset | None, modality: str) -> tuple[list[str], list[str], list[str]]:
    """(centres, widths, explanations): the source's own window, else a standard one for the modality.

    The VOI window applies to rescaled values, so the source's window (chosen for this anatomy by the
    scanner or the reader) stays valid on the derived image. Without one: CT soft tissue (40/400 HU); other
    modalities, whose units are arbitrary, the 1st to 99th percentile.
    """
    if ref is not None and "WindowCenter" in ref and "WindowWidth" in ref:
        centres, widths = ref["WindowCenter"].value, ref["WindowWidth"].value
        centres = list(centres) if isinstance(centres, Sequence) and not isinstance(centres, str) else [centres]
        widths = list(widths) if isinstance(widths, Sequence) and not isinstance(widths, str) else [widths]
        if centres and len(centres) == len(widths) and all(float(w) >= 1 for w in widths):
            names = ref.get("WindowCenterWidthExplanation") or []
            names = [names] if isinstance(names, str) else list(names)
            return ([_ds(c) for c in centres], [_ds(w) for w in widths],
                    names if len(names) == len(centres) else [])
    if modality == "CT":
        return [_ds(_CT_WINDOW[0])], [_ds(_CT_WINDOW[1])], [_CT_WINDOW[2]]
    lo, hi = (float(v) for v in np.percentile(values, [1.0, 99.0]))
    return [_ds((lo + hi) / 2)], [_ds(max(hi - lo, 1.0))], ["1-99 PERCENTILE"]


def _image_type(ref: Dataset | None, modality: str) -> list[str]:
    """DERIVED, SECONDARY and value 3: the source's (CT allows AXIAL or LOCALIZER), else AXIAL / OTHER."""
    values = list(ref.get("ImageType") or []) if ref is not None else []
    third = str(values[2]) if len(values) > 2 and values[2] else ""
    if modality == "CT" and third not in ("AXIAL", "LOCALIZER"):
        third = "AXIAL"
    return ["DERIVED", "SECONDARY", third or "OTHER"]


def _base(reference: Scan, modality: str, description: str, series_number: int | None) -> Dataset:
    """Tags shared by every file: the source's, verbatim, then a new derived series."""
    ref = reference.dicom_headers[0] if reference.dicom_headers else None
    ds = _copied(ref) if ref is not None else Dataset()
    if ref is not None:
        _lift_functional(ds, ref)
    if ref is None:
        ds.PatientName, ds.PatientID = "ANONYMOUS^", "ANONYMOUS"
    if not {"Laterality", "ImageLaterality", "BodyPartExamined"} & set(ds.dir()):
        ds.Laterality = ""  # type 2C, needed for a paired body part: the part and its side are unknown
    for kw in ("StudyInstanceUID", "FrameOfReferenceUID"):
        if not ds.get(kw):
            setattr(ds, kw, generate_uid())
    for kw in (*_TYPE2, *_TYPE2_BY_MODALITY.get(modality, ())):
        if kw not in ds:
            setattr(ds, kw, "" if kw != "AcquisitionNumber" else None)
    now = datetime.datetime.now()
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ref_number = int(ref.get("SeriesNumber") or 0) if ref is not None else 0
    ds.SeriesNumber = series_number if series_number is not None else ref_number + 1000
    ds.SeriesDescription = description[:64]
    ds.ImageType = _image_type(ref, modality)
    ds.DerivationDescription = f"{description}; {RESEARCH_USE}"[:1024]
    ds.DerivationCodeSequence = DicomSequence([code_item("113085", "DCM", "Spatial resampling")])
    ds.ImageComments = RESEARCH_USE
    ds.BurnedInAnnotation = "NO"
    ds.SoftwareVersions = software_versions(ref)
    ds.SOPClassUID = _SOP_CLASS.get(modality, SecondaryCaptureImageStorage)
    if ds.SOPClassUID == SecondaryCaptureImageStorage:
        ds.ConversionType = "WSD"  # workstation; the SC IOD has no image plane module, so PatientOrientation
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
        reference: the scan the result derives from; its DICOM headers supply every patient, study,
            equipment and acquisition attribute, and the source images each written image references.
            Without headers, minimal tags are made (Patient ID "ANONYMOUS", new Study UID).
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
    row, col, sizes, origins, order = grid(scan.affine, scan.spatial_shape)
    ref = reference.dicom_headers[0] if reference.dicom_headers else None
    modality = scan.modality or (str(ref.get("Modality", "")) if ref is not None else "") or "OT"
    base = _base(reference, modality, description, series_number)
    slope, intercept = _rescale(values, modality)
    stored = np.clip(np.round((values - intercept) / slope), -32768, 32767).astype("<i2")
    if modality != "MR" or (slope, intercept) != (1.0, 0.0):  # MR image IOD: no Modality LUT unless needed
        base.RescaleSlope, base.RescaleIntercept = _ds(slope), _ds(intercept)
    if modality != "MR":
        base.RescaleType = "HU" if modality == "CT" else "US"
    centres, widths, names = _window(values, ref, modality)
    base.WindowCenter, base.WindowWidth = centres, widths
    if names:
        base.WindowCenterWidthExplanation = names
    base.Rows, base.Columns = int(values.shape[1]), int(values.shape[0])
    base.PixelSpacing = [_ds(sizes[1]), _ds(sizes[0])]  # [row spacing (along Y), column spacing (along X)]
    base.SliceThickness = base.SpacingBetweenSlices = _ds(sizes[2])
    base.ImageOrientationPatient = [_ds(v) for v in (*row, *col)]
    if base.SOPClassUID == SecondaryCaptureImageStorage:
        base.PatientOrientation = [_orientation(row), _orientation(col)]
    normal = np.cross(row, col)
    sources = source_images(reference)
    nearest = _nearest_sources(reference, scan.affine, origins)
    paths = []
    for n, (z, ipp) in enumerate(zip(order, origins, strict=True), start=1):
        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = n
        ds.ImagePositionPatient = [_ds(v) for v in ipp]
        ds.SliceLocation = _ds(ipp @ normal)
        if sources:
            ds.SourceImageSequence = DicomSequence([_source_item(*sources[nearest[n - 1]])])
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
