"""One entry point for reading any scan medsr accepts, so callers never branch on file formats."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import nibabel as nib

from medsr.errors import Category, MedsrError
from medsr.io.dicom_read import check_voxels, load_dicom
from medsr.io.nifti import load_nifti
from medsr.io.scan import Scan
from medsr.io.validate import check_scan

__all__ = ["load_scan"]


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _header_shape(path: Path) -> tuple[int, ...] | None:
    """Shape from the NIfTI header alone: nibabel turns a gzipped empty image into shape (0,)."""
    try:
        return tuple(nib.load(str(path)).shape)  # type: ignore[attr-defined]
    except Exception:  # load_nifti reports unreadable files
        return None


def load_scan(path: str | os.PathLike[str], series_uid: str | None = None,
              volume_index: int | None = None) -> Scan:
    """Read a NIfTI file, a DICOM file or a folder holding a DICOM series into a checked :class:`Scan`.

    Dispatch is by what the path is: ``.nii``/``.nii.gz`` → NIfTI, a folder → DICOM series, any other file →
    DICOM (with or without the 128-byte preamble). Every result is checked for emptiness and NaN/Inf voxels
    so that later stages can trust the array.

    Args:
        path: file or folder to read. It is opened read-only and never modified.
        series_uid: which SeriesInstanceUID to read when a folder holds several series (DICOM only).
        volume_index: which volume of a 4D NIfTI to read (NIfTI only).

    Raises:
        MedsrError: the path is missing, unreadable, ambiguous, or holds an unusable image.
    """
    path = Path(path)
    if not path.exists():
        raise MedsrError(f"{path}: no such file or folder", Category.NOT_FOUND)
    if _is_nifti(path) and path.is_file():
        if series_uid is not None:
            raise MedsrError(f"{path}: series_uid applies to DICOM folders, not to NIfTI files")
        shape = _header_shape(path)
        if shape is not None and 0 in shape:
            raise MedsrError(f"{path}: empty image (shape {shape})", Category.EMPTY)
        scan = dataclasses.replace(load_nifti(path, volume_index=volume_index), format="NIfTI")
    else:
        if volume_index is not None:
            raise MedsrError(f"{path}: volume_index applies to 4D NIfTI files, not to DICOM")
        scan = load_dicom(path, series_uid=series_uid)
    check_voxels(scan.array, path)
    check_scan(scan.array, scan.affine, path)
    return scan
