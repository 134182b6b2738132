"""The uncertainty map as a DICOM Parametric Map, so viewers overlay it on the enhanced series as a quantity.

A per-voxel standard deviation is not anatomy: written as an ordinary CT image it would be shown with a
Hounsfield window as if it were tissue. The Parametric Map IOD (SOP class 1.2.840.10008.5.1.4.1.1.30) says
what the values are: float frames with a Real World Value Mapping in the scan's units (UCUM ``[hnsf'U]`` for
CT, arbitrary units otherwise) and the quantity "Standard Deviation" (DCM 113061). It is written with
``highdicom`` and derives from the enhanced series that medsr wrote next to it: same grid, same frame of
reference, each frame referencing the enhanced image at its position, so OHIF (3.9 and later) and
3D Slicer can overlay one on the other.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pydicom
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from medsr import __version__
from medsr.errors import MedsrError
from medsr.io.dicom_read import check_voxels
from medsr.io.dicom_write import RESEARCH_USE, grid, save_dicom_series
from medsr.io.paths import atomic_path
from medsr.io.scan import Scan

__all__ = ["save_parametric_map", "write_dicom", "STANDARD_DEVIATION", "unit_code"]

STANDARD_DEVIATION = Code("113061", "DCM", "Standard Deviation")
_POSITION_TOL_MM = 1e-3


def unit_code(modality: str) -> Code:
    """UCUM unit of the scan's values: Hounsfield units for CT, arbitrary units for anything else."""
    if modality.upper() == "CT":
        return Code("[hnsf'U]", "UCUM", "Hounsfield unit")
    return Code("[arb'U]", "UCUM", "arbitrary unit")


def save_parametric_map(values: Scan, image_files: Sequence[str | os.PathLike[str]],
                        path: str | os.PathLike[str], *, series_number: int, description: str,
                        quantity: Code = STANDARD_DEVIATION) -> Path:
    """Write ``values`` as one multi-frame Parametric Map at ``path``, derived from the images ``image_files``.

    Args:
        values: the map, ``(1, X, Y, Z)``, on exactly the grid of ``image_files`` (medsr's derived series
            written from the same affine).
        image_files: the enhanced series, one single-frame file per slice, in slice order.
        path: the file to write (atomically); its name never comes from DICOM text.
        series_number: SeriesNumber of the map's own series (distinct from the enhanced series').
        description: SeriesDescription and content description (64 characters kept).
        quantity: what the values are (default DCM 113061 "Standard Deviation").

    Raises:
        MedsrError: several channels, NaN/Inf values, or a grid that differs from ``image_files``.
    """
    import highdicom as hd  # about a second to import: only when a map is written, not for every medsr command

    path = Path(path)
    if values.array.ndim != 4 or values.array.shape[0] != 1:
        raise MedsrError(f"{path}: a parametric map needs one channel, got array shape {values.array.shape}")
    check_voxels(values.array, path)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in image_files]
    row, col, _, origins, order = grid(values.affine, values.spatial_shape)
    x, y, _ = values.spatial_shape
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in sources]) if sources else None
    if (positions is None or positions.shape != origins.shape or any((ds.Rows, ds.Columns) != (y, x) for ds in sources)
            or np.abs(positions - origins).max() > _POSITION_TOL_MM):
        raise MedsrError(f"{path}: the map's grid {values.spatial_shape} does not match the "
                         f"{len(sources)} images it should overlay")
    frames = np.stack([values.array[0][:, :, z].T for z in order]).astype(np.float32)  # (frames, rows, cols)
    modality = str(sources[0].get("Modality", ""))
    lo, hi = float(frames.min()), float(frames.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="MEDSR_STD"[:16], lut_explanation=description[:64], unit=unit_code(modality),
        value_range=(lo, hi if hi > lo else lo + 1.0), slope=1.0, intercept=0.0, quantity_definition=quantity)
    top = float(np.percentile(frames, 99.0)) or max(hi, 1.0)
    window = hd.VOILUTTransformation(window_center=top / 2, window_width=top, window_explanation="0-99 PERCENTILE")
    pmap = hd.pm.ParametricMap(
        source_images=sources, pixel_array=frames, series_instance_uid=generate_uid(),
        series_number=series_number, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="medsr", manufacturer_model_name="medsr SR3", software_versions=f"medsr {__version__}",
        device_serial_number="none", contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping], voi_lut_transformations=[window],
        content_description=description[:64], content_label="UNCERTAINTY", series_description=description[:64])
    if "Laterality" not in pmap:  # type 2C in General Series: the source's, else empty (unknown)
        pmap.Laterality = sources[0].get("Laterality", "")
    pmap.ImageComments = RESEARCH_USE
    pmap.BurnedInAnnotation = "NO"
    with atomic_path(path) as tmp:
        pmap.save_as(tmp, enforce_file_format=True)
    return path


class _Result(Protocol):
    mean: Scan
    std: Scan


def write_dicom(reference: Scan, result: _Result, folder: str | os.PathLike[str], label: str,
                samples: int) -> tuple[list[Path], Path]:
    """The DICOM outputs of one enhancement: ``dicom_mean/`` (image series) and ``dicom_std/PM000001.dcm``.

    The mean is a derived image series (SeriesNumber: the source's + 1000); the standard deviation is a
    Parametric Map on the same grid and frame of reference (the source's + 1001). No plain-image std series
    is written: as an ordinary CT/MR image it would be windowed and read as anatomy, and viewers that cannot
    show a Parametric Map still have ``std.nii.gz`` and ``review.png``.
    """
    folder = Path(folder)
    ref = reference.dicom_headers[0] if reference.dicom_headers else None
    number = (int(ref.get("SeriesNumber") or 0) if ref is not None else 0) + 1000
    images = save_dicom_series(result.mean, reference, folder / "dicom_mean", f"{label} enhanced (mean of {samples})",
                               series_number=number)
    (folder / "dicom_std").mkdir(exist_ok=True)
    pmap = save_parametric_map(result.std, images, folder / "dicom_std" / "PM000001.dcm", series_number=number + 1,
                               description=f"{label} uncertainty (std of {samples})")
    return images, pmap
