"""The in-memory scan every medsr stage passes around, and the grid geometry that follows its array.

Refining, coarsening and cropping change the voxel grid; the helpers here move the affine with it, so world
millimetres stay right. Every crop in medsr goes through :func:`crop_scan`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from medsr.errors import Category, MedsrError
from medsr.io.paths import output_name

__all__ = ["Scan", "spacing_from_affine", "refined_affine", "coarse_affine", "crop_scan", "crop_to_factors"]


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis: the lengths of the affine's first three columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))  # type: ignore[return-value]


@dataclass
class Scan:
    """A scan as medsr sees it.

    Attributes:
        array: float32, channel first, always 3 spatial axes: ``(C, X, Y, Z)``. A single 2D slice has Z = 1.
            Intensities are in physical units where the source defines them (CT: Hounsfield units).
        affine: 4x4 float64, voxel index ``(x, y, z)`` to world millimetres in RAS+ (nibabel / MONAI
            convention).
            For DICOM input, axis X runs along the image columns (first ImageOrientationPatient vector),
            Y along the rows, Z along the slice normal, in the order of increasing position.
        modality: "CT", "MR", or another DICOM modality code; "" when unknown (NIfTI without a hint).
        source: where it was read from (file or folder); used in error messages, never in output names.
        dicom_headers: per-slice pydicom Datasets without pixel data, in Z order (empty for NIfTI); the
            reference for writing a derived series.
        series_uid: SeriesInstanceUID for DICOM, "" otherwise.
        format: how it was stored: "NIfTI", "DICOM file", "DICOM multi-frame" or "DICOM series"; "" when
            made in memory. Reported by ``medsr info``; never used to pick output names.
        acquisition_axis: the array axis normal to the plane the images were acquired in (DICOM: 2, the
            slice normal; rows and columns span X and Y), or None where the file does not say (NIfTI). A 2D
            model works in that plane (:func:`medsr.enhance.choose_slice_axis`).
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str = ""
    source: str = ""
    dicom_headers: list[Any] = field(default_factory=list)
    series_uid: str = ""
    format: str = ""
    acquisition_axis: int | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_from_affine(self.affine)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[1:])  # type: ignore[return-value]

    @property
    def name(self) -> str:
        """A file-system-safe name for outputs: the file stem or folder name (never DICOM text)."""
        return output_name(self.source)

    def with_array(self, array: np.ndarray, affine: np.ndarray | None = None) -> Scan:
        """A copy carrying another array (and optionally another affine), same metadata."""
        return replace(self, array=np.asarray(array, dtype=np.float32),
                       affine=self.affine.copy() if affine is None else np.asarray(affine, dtype=np.float64))


def refined_affine(affine: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Affine of a grid refined by integer ``factors`` per axis, fine-voxel blocks centred on coarse voxels.

    Coarse voxel i covers fine voxels ``f*i .. f*i+f-1``; their mean index ``f*i + (f-1)/2`` must map to the
    coarse centre. So the fine affine is ``A @ S @ T`` with S = diag(1/f) and a shift of ``-(f-1)/(2f)``
    coarse voxels: world(fine j) = A @ ((j - (f-1)/2) / f). Omitting the shift is the classic half-voxel bug.
    """
    a = np.asarray(affine, dtype=np.float64)
    f = np.asarray([int(v) for v in factors], dtype=np.float64)
    if f.shape != (3,) or np.any(f < 1):
        raise ValueError(f"refinement factors must be three positive integers, got {tuple(factors)}")
    scale = np.eye(4)
    scale[:3, :3] = np.diag(1.0 / f)
    scale[:3, 3] = -(f - 1.0) / (2.0 * f)
    return a @ scale


def coarse_affine(fine_affine: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`refined_affine`: the grid whose voxel i is the fine block ``f*i .. f*i+f-1``."""
    f = np.asarray([int(v) for v in factors], dtype=np.float64)
    if f.shape != (3,) or np.any(f < 1):
        raise ValueError(f"coarsening factors must be three positive integers, got {tuple(factors)}")
    scale = np.eye(4)
    scale[:3, :3] = np.diag(1.0 / f)
    scale[:3, 3] = -(f - 1.0) / (2.0 * f)
    return np.asarray(fine_affine, dtype=np.float64) @ np.linalg.inv(scale)


def crop_scan(scan: Scan, start: Sequence[int], size: Sequence[int]) -> Scan:
    """Voxels ``start .. start + size`` of each spatial axis; the affine origin moves to the new first voxel.

    Sizes are clipped at the array's end, so asking for more than there is keeps what there is.
    """
    if len(start) != 3 or len(size) != 3 or any(int(a) < 0 for a in start) or any(int(k) < 1 for k in size):
        raise ValueError(f"crop needs three start indices >= 0 and three sizes >= 1, got {start}, {size}")
    region = tuple(slice(int(a), int(a) + int(k)) for a, k in zip(start, size))
    affine = np.asarray(scan.affine, np.float64).copy()
    affine[:3, 3] = affine[:3, :3] @ np.asarray([int(a) for a in start], np.float64) + affine[:3, 3]
    return scan.with_array(scan.array[(slice(None), *region)], affine)


def crop_to_factors(scan: Scan, factors: Sequence[int]) -> Scan:
    """Centred crop so that each axis divides by its factor (block operators need whole blocks)."""
    shape = scan.spatial_shape
    keep = [s - s % int(f) for s, f in zip(shape, factors)]
    if any(k == 0 for k in keep):
        raise MedsrError(f"{scan.source}: shape {shape} is smaller than the factors {tuple(factors)}",
                         Category.TOO_SMALL)
    return crop_scan(scan, [(s - k) // 2 for s, k in zip(shape, keep)], keep)
