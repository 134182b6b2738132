"""Scan I/O: everything that touches the disk goes through here.

``load_scan`` reads NIfTI, single/multi-frame DICOM files and DICOM series folders into a :class:`Scan`;
``load_dicom_files`` reads an explicit list of DICOM files; ``survey`` and ``read_header`` say what DICOM
files hold from their headers alone (series, damaged files, duplicates); ``save_nifti`` and
``save_dicom_series`` write results; ``refined_affine``, ``coarse_affine``, ``crop_scan`` and
``crop_to_factors`` change a scan's grid with its affine; ``describe_scan`` summarises a scan without patient
data.
"""

from __future__ import annotations

from medsr.errors import MedsrError
from medsr.io.describe import describe_scan
from medsr.io.dicom_read import list_series, load_dicom, load_dicom_files
from medsr.io.dicom_write import save_dicom_series
from medsr.io.load import load_scan
from medsr.io.nifti import load_nifti, save_nifti
from medsr.io.paths import atomic_path, safe_join, sanitize_component
from medsr.io.scan import Scan, coarse_affine, crop_scan, crop_to_factors, refined_affine, spacing_from_affine
from medsr.io.survey import DicomHeader, DicomSeries, DicomSurvey, patient_identifiers, read_header, survey

__all__ = [
    "DicomHeader",
    "DicomSeries",
    "DicomSurvey",
    "MedsrError",
    "Scan",
    "atomic_path",
    "coarse_affine",
    "crop_scan",
    "crop_to_factors",
    "describe_scan",
    "list_series",
    "load_dicom",
    "load_dicom_files",
    "load_nifti",
    "load_scan",
    "patient_identifiers",
    "read_header",
    "refined_affine",
    "safe_join",
    "sanitize_component",
    "save_dicom_series",
    "save_nifti",
    "spacing_from_affine",
    "survey",
]
