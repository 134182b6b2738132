"""Load-time checks every scan passes before any compute: size, geometry, voxel type and intensity range.

One place for them, called by the loaders, so a NIfTI file and a DICOM series are held to the same rules and
a broken input fails in a second with a :class:`MedsrError` naming the file, never after minutes of sampling
(or as a MemoryError while decompressing a bomb). The size limit is read from the ``MEDSR_MAX_IMAGE_BYTES``
environment variable (bytes; default 2 GiB of stored voxels).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from medsr.errors import Category, MedsrError

__all__ = ["DEFAULT_MAX_IMAGE_BYTES", "MAX_ABS_INTENSITY", "max_image_bytes", "check_declared_size",
           "check_decoded_shape", "check_affine", "check_intensity", "check_dicom_frames", "check_nifti_header",
           "check_scan"]

DEFAULT_MAX_IMAGE_BYTES = 2 * 1024**3
# No scanner stores values near this; above it the percentile normaliser (float64 lo + 1) stops being invertible
# and float32 arithmetic overflows, which turned a constant 3e38 image into an all-NaN "result".
MAX_ABS_INTENSITY = 1e12
_MIN_VOXEL_MM = 1e-6
_MAX_VOXEL_MM = 1e6
_MIN_ORTHOGONALITY = 1e-3  # |det| / product of column lengths: 0 for parallel axes, 1 for orthogonal ones
_PERPENDICULAR_TOL = 1e-3  # |cos| between DICOM row and column directions


def max_image_bytes() -> int:
    """The largest image (declared voxels x bytes per voxel) medsr will decompress; see the module docstring."""
    raw = os.environ.get("MEDSR_MAX_IMAGE_BYTES", "")
    if not raw:
        return DEFAULT_MAX_IMAGE_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise MedsrError(f"MEDSR_MAX_IMAGE_BYTES must be a whole number of bytes, got {raw!r}") from None
    if value < 1:
        raise MedsrError(f"MEDSR_MAX_IMAGE_BYTES must be positive, got {value}")
    return value


def _gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def check_declared_size(shape: Sequence[int], itemsize: int, where: Any) -> None:
    """Refuse an image whose header declares more than :func:`max_image_bytes`, before anything is decoded."""
    dims = [int(s) for s in shape]
    if any(d < 0 for d in dims):
        raise MedsrError(f"{where}: header declares a negative image size {tuple(dims)}", Category.DAMAGED)
    total = int(np.prod(dims, dtype=object)) * max(1, int(itemsize))
    limit = max_image_bytes()
    if total > limit:
        raise MedsrError(f"{where}: header declares {tuple(dims)} voxels ({_gib(total)} decompressed), more than "
                         f"the limit of {_gib(limit)}; raise MEDSR_MAX_IMAGE_BYTES if this image is genuine",
                         Category.TOO_LARGE)


def check_decoded_shape(shape: Sequence[int], declared: Sequence[int], where: Any) -> None:
    """Decoded DICOM pixels must be exactly what the header declares (frames, rows, columns, samples): extra
    bytes after the image would otherwise become phantom frames or a reshape traceback."""
    if tuple(int(s) for s in shape) != tuple(int(d) for d in declared):
        raise MedsrError(f"{where}: pixel data decodes to {tuple(shape)} (frames, rows, columns, samples) but the "
                         f"header declares {tuple(declared)}; the file is damaged (PixelData longer or shorter "
                         "than Rows x Columns x NumberOfFrames)", Category.DAMAGED)


def check_affine(affine: np.ndarray, where: Any) -> None:
    """Refuse voxel-to-world matrices that are not finite, have a zero/absurd voxel size or (nearly) parallel axes."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise MedsrError(f"{where}: voxel-to-world matrix (NIfTI sform/qform, DICOM geometry) is not finite; "
                         "the image cannot be placed in space", Category.GEOMETRY)
    m = a[:3, :3]
    sizes = np.linalg.norm(m, axis=0)
    for axis, size in zip("XYZ", sizes):
        if not _MIN_VOXEL_MM <= size <= _MAX_VOXEL_MM:
            raise MedsrError(f"{where}: voxel size along {axis} is {size:.3g} mm (geometry {tuple(np.round(sizes, 6))}"
                             " mm); a zero or absurd spacing (NIfTI pixdim/sform, DICOM PixelSpacing or "
                             "SliceThickness) cannot be enhanced", Category.GEOMETRY)
    if abs(float(np.linalg.det(m))) / float(np.prod(sizes)) < _MIN_ORTHOGONALITY:
        raise MedsrError(f"{where}: voxel-to-world matrix is singular: two image axes point the same way "
                         "(damaged sform/qform or ImageOrientationPatient)", Category.GEOMETRY)


def check_intensity(array: np.ndarray, where: Any) -> None:
    """Refuse values so large that normalising them overflows (see :data:`MAX_ABS_INTENSITY`)."""
    if array.size == 0:
        return
    peak = float(np.max(np.abs(np.asarray(array, dtype=np.float64))))
    if peak > MAX_ABS_INTENSITY:
        raise MedsrError(f"{where}: intensities up to {peak:.3g} in magnitude; medsr accepts at most "
                         f"{MAX_ABS_INTENSITY:.0e} (rescale the image)", Category.UNSUPPORTED)


def check_dicom_frames(frames: Sequence[Any], thickness: float, where: Any) -> None:
    """DICOM tags that would silently distort the image: spacing <= 0, RescaleSlope 0, skewed or parallel axes.

    ``frames`` carry ``spacing`` (row, column mm or None), ``iop`` (6 floats or None) and ``slope``.
    """
    for f in frames:
        if f.spacing is not None and not (f.spacing[0] > 0 and f.spacing[1] > 0):
            raise MedsrError(f"{where}: PixelSpacing {f.spacing[0]:g}\\{f.spacing[1]:g} mm; spacing must be "
                             "positive", Category.GEOMETRY)
        if f.slope == 0:
            raise MedsrError(f"{where}: RescaleSlope is 0, which would turn every pixel into the same value",
                             Category.DAMAGED)
        if f.iop is not None:
            row, col = np.asarray(f.iop[:3], float), np.asarray(f.iop[3:], float)
            nr, nc = float(np.linalg.norm(row)), float(np.linalg.norm(col))
            if nr < 1e-6 or nc < 1e-6:
                raise MedsrError(f"{where}: ImageOrientationPatient has a zero-length direction", Category.GEOMETRY)
            cos = abs(float(row @ col)) / (nr * nc)
            if cos > 1 - 1e-6:
                raise MedsrError(f"{where}: ImageOrientationPatient row and column directions are parallel",
                                 Category.GEOMETRY)
            if cos > _PERPENDICULAR_TOL:
                angle = float(np.degrees(np.arccos(min(1.0, cos))))
                raise MedsrError(f"{where}: ImageOrientationPatient row and column directions are skewed "
                                 f"({angle:.2f} degrees apart, not 90); medsr needs an orthogonal grid",
                                 Category.GEOMETRY)
    if len(frames) == 1 and not thickness > 0:
        raise MedsrError(f"{where}: single slice with SliceThickness/SpacingBetweenSlices {thickness:g}; "
                         "the slice needs a positive thickness", Category.GEOMETRY)


def check_nifti_header(img: Any, where: Any) -> None:
    """Refuse what nibabel would read into something medsr cannot enhance faithfully, before reading voxels."""
    shape = tuple(int(s) for s in img.shape)
    dtype = np.dtype(img.get_data_dtype())
    if dtype.fields is not None or dtype.kind == "V":
        raise MedsrError(f"{where}: colour (RGB/RGBA) image; medsr enhances greyscale scans (convert it first)",
                         Category.UNSUPPORTED)
    if dtype.kind == "c":
        raise MedsrError(f"{where}: complex-valued image; medsr enhances real magnitudes (save abs() first)",
                         Category.UNSUPPORTED)
    if len(shape) > 4 and any(s > 1 for s in shape[4:]):
        raise MedsrError(f"{where}: {len(shape)}D image, shape {shape}; medsr reads 2D/3D images or one volume "
                         "of a 4D image (split it first)", Category.UNSUPPORTED)
    check_declared_size(shape, dtype.itemsize, where)
    header = img.header
    for name in ("sform", "qform"):  # a coded transform that is broken means a damaged header, whichever is used
        matrix, code = getattr(header, f"get_{name}")(coded=True)
        if code and matrix is not None:
            check_affine(matrix, where)


def check_scan(array: np.ndarray, affine: np.ndarray, where: Any) -> None:
    """Every loaded scan: one channel, placeable geometry, intensities that normalise without overflow."""
    if array.ndim == 4 and array.shape[0] != 1:
        raise MedsrError(f"{where}: {array.shape[0]} channels per voxel (colour image); medsr enhances "
                         "greyscale scans (convert it first)", Category.UNSUPPORTED)
    check_affine(affine, where)
    check_intensity(array, where)
