"""Scan I/O: everything that touches the disk goes through here.

``load_scan`` reads NIfTI, single/multi-frame DICOM files and DICOM series folders into a :class:`Scan`;
``save_nifti`` and ``save_dicom_series`` write results; ``refined_affine`` gives the geometry of refined
grids; ``describe_scan`` (in :mod:`medsr.io.describe`) summarises a scan without patient data.
"""

from __future__ import annotations

from medsr.errors import MedsrError
from medsr.io.describe import describe_scan
from medsr.io.dicom_read import list_series, load_dicom
from medsr.io.dicom_write import save_dicom_series
from medsr.io.load import load_scan
from medsr.io.nifti import load_nifti, save_nifti
from medsr.io.paths import atomic_path, safe_join, sanitize_component
from medsr.io.scan import Scan, refined_affine, spacing_from_affine

__all__ = [
    "MedsrError",
    "Scan",
    "atomic_path",
    "describe_scan",
    "list_series",
    "load_dicom",
    "load_nifti",
    "load_scan",
    "refined_affine",
    "safe_join",
    "sanitize_component",
    "save_dicom_series",
    "save_nifti",
    "spacing_from_affine",
]
