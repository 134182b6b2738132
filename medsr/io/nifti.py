"""NIfTI in and out with nibabel, affine kept exactly."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medsr.errors import Category, MedsrError
from medsr.io.paths import atomic_path
from medsr.io.scan import Scan
from medsr.io.validate import check_nifti_header

__all__ = ["load_nifti", "save_nifti"]


def load_nifti(path: str | os.PathLike[str], volume_index: int | None = None) -> Scan:
    """Read a 2D/3D NIfTI (or one volume of a 4D one) into a :class:`Scan` ``(1, X, Y, Z)``."""
    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for truncated or foreign files
        raise MedsrError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})",
                          Category.UNREADABLE) from None
    check_nifti_header(img, path)  # size, 5D, RGB, complex: refused before any voxel is decompressed
    try:
        data = np.asanyarray(img.dataobj)  # type: ignore[attr-defined]
    except Exception as exc:
        raise MedsrError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})",
                          Category.DAMAGED) from None
    data = np.squeeze(data, axis=tuple(range(4, data.ndim))) if data.ndim > 4 else data
    if data.ndim == 4:
        if volume_index is None:
            raise MedsrError(
                f"{path}: 4D image with {data.shape[3]} volumes; "
                f"choose one with --volume-index (0..{data.shape[3]-1})", Category.UNSUPPORTED
            )
        if not 0 <= volume_index < data.shape[3]:
            raise MedsrError(f"{path}: volume_index {volume_index} outside 0..{data.shape[3]-1}")
        data = data[..., volume_index]
    elif volume_index not in (None, 0):
        raise MedsrError(f"{path}: volume_index {volume_index} given but the image is {data.ndim}D")
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise MedsrError(f"{path}: expected a 2D or 3D image, got shape {data.shape}", Category.UNSUPPORTED)
    array = np.asarray(data, dtype=np.float32)[None]
    affine = np.asarray(img.affine, dtype=np.float64)  # type: ignore[attr-defined]
    return Scan(array=array, affine=affine, modality=_modality_hint(img), source=str(path))


def _modality_hint(img: Any) -> str:
    """NIfTI has no modality field; medsr writes one into ``descrip`` ("medsr modality=CT"), reads it back."""
    try:
        descrip = img.header["descrip"].tobytes().decode("ascii", "ignore")
    except Exception:
        return ""
    for token in descrip.split():
        if token.startswith("modality="):
            return token.split("=", 1)[1].strip("\x00")
    return ""


def save_nifti(scan: Scan, path: str | os.PathLike[str]) -> Path:
    """Write ``scan`` as NIfTI (float32, sform and qform set to its affine), atomically."""
    path = Path(path)
    data = np.asarray(scan.array, dtype=np.float32)
    data = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)
    img = nib.Nifti1Image(data, scan.affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(scan.affine, code=1)
    img.set_qform(scan.affine, code=1)
    if scan.modality:
        img.header["descrip"] = f"medsr modality={scan.modality}"[:79].encode("ascii", "ignore")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path
