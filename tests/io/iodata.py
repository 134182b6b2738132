"""Helpers for medsr.io tests: real pydicom / pydicom-data / nibabel files and a CT series from a real CT.

Nothing is downloaded. The multi-file series is cut from the InVesalius head CT (Debian
``invesalius-examples``), falling back to nibabel's real T1 when that package is absent, and written here with
plain pydicom (not medsr's writer) so the reader is checked against an independent encoder.
"""

from __future__ import annotations

import hashlib
import plistlib
import secrets
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
DICOMDIR_TESTS = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent / "dicomdirtests"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def datafile(name: str) -> Path:
    """A pydicom (or pydicom-data) test file by name."""
    found = pydicom.data.get_testdata_file(name)
    if found is None:
        pytest.skip(f"{name} not installed (pydicom-data missing)")
    return Path(str(found))


def load_cranium_crop() -> np.ndarray:
    """A real head-CT block in HU, ``(Z, rows, cols)`` int16 = 8 x 32 x 24 (rows != cols catches swaps)."""
    if CRANIUM.exists():
        with tarfile.open(CRANIUM) as tf:
            members = {Path(m.name).name: m for m in tf.getmembers()}
            meta = plistlib.loads(tf.extractfile(members["main.plist"]).read())  # type: ignore[union-attr]
            raw = tf.extractfile(members["matrix.dat"]).read()  # type: ignore[union-attr]
        vol = np.frombuffer(raw, dtype=meta["matrix"]["dtype"]).reshape(meta["matrix"]["shape"])
        return np.array(vol[50:58, 100:132, 110:134], dtype=np.int16)
    t1 = np.asarray(nib.load(NIBABEL_DATA / "anatomical.nii").dataobj)  # (x, y, z), real T1
    return np.array(np.transpose(t1[4:28, 4:36, 8:16], (2, 1, 0)), dtype=np.int16)


def tree_hash(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of ``path`` itself), to prove loads do not modify inputs."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def oblique_iop() -> np.ndarray:
    """Row and column direction cosines of a plane rotated 15 degrees about z and 10 about x."""
    a, b = np.radians(15.0), np.radians(10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    r = rx @ rz
    return np.concatenate([r[:, 0], r[:, 1]])


def new_dataset(sop_class: str) -> Dataset:
    """An empty explicit-VR little-endian dataset of ``sop_class`` with file meta and a fresh SOP instance UID."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    return ds


def write_ct_series(folder: Path, hu: np.ndarray, *, series_uid: str | None = None,
                    description: str = "real CT crop", pixel_spacing: tuple[float, float] = (0.9, 0.8),
                    thickness: float = 1.5) -> tuple[list[Path], np.ndarray]:
    """Write ``hu`` (Z, rows, cols) as CT slices under shuffled names; return paths in Z order and RAS affine.

    ``pixel_spacing`` is DICOM's (row spacing, column spacing) in mm; ``thickness`` the slice step in mm.

    Stored values are ``(HU + 1024) * 2`` (uint16) with RescaleSlope 0.5 / Intercept -1024, so a reader
    that ignores the slope fails. InstanceNumber runs backwards so a reader sorting by it fails too.
    """
    folder.mkdir(parents=True, exist_ok=True)
    iop = oblique_iop()
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    row_spacing, col_spacing = pixel_spacing
    origin = np.array([-30.25, 12.5, 40.0])
    series_uid = series_uid or generate_uid()
    study, frame = generate_uid(), generate_uid()
    names = [secrets.token_hex(5) for _ in range(hu.shape[0])]  # random, so name order means nothing
    paths = []
    for k, plane in enumerate(hu):
        ds = new_dataset(CTImageStorage)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "MEDSR-TEST-0042", "19700101"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series_uid, frame
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber = "CT", description, 3
        ds.InstanceNumber = hu.shape[0] - k
        ds.ImageOrientationPatient = [f"{v:.10f}" for v in iop]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin + k * thickness * normal]
        ds.PixelSpacing = [row_spacing, col_spacing]
        ds.SliceThickness = thickness
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1024"
        ds.PixelData = ((plane.astype(np.int32) + 1024) * 2).astype("<u2").tobytes()
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * col_spacing, col * row_spacing, normal * thickness
    lps[:3, 3] = origin
    return paths, LPS_TO_RAS @ lps


