"""A patient-free summary of a scan for ``medsr info``: enough to check geometry and units before a run.

It reports only what the array and affine say plus Modality and SeriesInstanceUID; no names, IDs or dates
ever go in, so the output can be pasted into a ticket or a log.
"""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np

from medsr.io.scan import Scan

__all__ = ["describe_scan"]


def _format(scan: Scan) -> str:
    if scan.format:
        return scan.format
    if scan.dicom_headers:
        return "DICOM series" if len(scan.dicom_headers) > 1 else "DICOM file"
    return "NIfTI" if scan.source.lower().endswith((".nii", ".nii.gz")) else "in memory"


def describe_scan(scan: Scan) -> dict[str, Any]:
    """Summarise ``scan`` as a flat, JSON-ready dict.

    Keys: format, modality, shape ``[X, Y, Z]``, channels, spacing_mm (rounded to 4 decimals), orientation
    (nibabel axis codes of the RAS+ affine, e.g. "LPS"), intensity_min / intensity_max / intensity_units
    ("HU" for CT), series_uid, slices. Patient identifiers are never included.
    """
    array = np.asarray(scan.array)
    finite = array[np.isfinite(array)] if array.size else array
    return {
        "format": _format(scan),
        "modality": scan.modality or "unknown",
        "shape": list(scan.spatial_shape),
        "channels": int(array.shape[0]),
        "spacing_mm": [round(s, 4) for s in scan.spacing],
        "orientation": "".join(str(c) for c in nib.aff2axcodes(scan.affine)),
        "intensity_min": round(float(finite.min()), 4) if finite.size else None,
        "intensity_max": round(float(finite.max()), 4) if finite.size else None,
        "intensity_units": "HU" if scan.modality == "CT" else "arbitrary units",
        "series_uid": scan.series_uid or "",
        "slices": int(scan.spatial_shape[2]),
    }
