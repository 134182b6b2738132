"""Writing a derived DICOM series: geometry, tags and values survive a read back, and dcm2niix agrees."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from iodata import datafile

from medsr.io import MedsrError, Scan, load_dicom, refined_affine, save_dicom_series


@pytest.fixture
def refined_ct(ct_series) -> tuple[Scan, Scan]:
    """(reference series as read, a float 'super-resolved' scan on a (2, 2, 3)-refined grid of it)."""
    reference = load_dicom(ct_series[0])
    fine = np.repeat(np.repeat(np.repeat(reference.array, 2, 1), 2, 2), 3, 3)
    fine = fine + np.random.default_rng(0).normal(0, 3, fine.shape).astype(np.float32)
    return reference, reference.with_array(fine, refined_affine(reference.affine, (2, 2, 3)))


def test_ct_small_round_trip_is_exact(tmp_path: Path):
    ref = load_dicom(datafile("CT_small.dcm"))
    paths = save_dicom_series(ref, ref, tmp_path / "out", "copy")
    assert [p.name for p in paths] == ["IM000001.dcm"]
    back = load_dicom(tmp_path / "out")
    np.testing.assert_array_equal(back.array, ref.array)
    np.testing.assert_allclose(back.affine, ref.affine, atol=1e-4)


def test_refined_float_series_round_trip(refined_ct, tmp_path: Path):
    reference, fine = refined_ct
    paths = save_dicom_series(fine, reference, tmp_path / "sr", "medsr SR x2x2x3", series_number=42)
    assert [p.name for p in paths[:2]] == ["IM000001.dcm", "IM000002.dcm"] and len(paths) == 24
    back = load_dicom(tmp_path / "sr")
    np.testing.assert_allclose(back.affine, fine.affine, atol=1e-4)
    step = float(back.dicom_headers[0].RescaleSlope)
    assert np.abs(back.array - fine.array).max() <= step / 2 + 1e-6
    assert step < 0.1  # a float result keeps sub-HU precision


def test_tags_copied_and_new_uids(refined_ct, tmp_path: Path):
    reference, fine = refined_ct
    save_dicom_series(fine, reference, tmp_path / "sr", "medsr SR")
    ref = reference.dicom_headers[0]
    files = sorted((tmp_path / "sr").glob("*.dcm"))
    out = [pydicom.dcmread(p) for p in files]
    first = out[0]
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "FrameOfReferenceUID",
               "Modality"):
        assert first[kw].value == ref[kw].value, kw
    assert first.SeriesInstanceUID != ref.SeriesInstanceUID
    assert len({d.SOPInstanceUID for d in out}) == len(out) and len({d.SeriesInstanceUID for d in out}) == 1
    assert first.SOPClassUID == pydicom.uid.CTImageStorage and first.RescaleType == "HU"
    assert list(first.ImageType) == ["DERIVED", "SECONDARY"] and first.SeriesDescription == "medsr SR"
    assert "medsr SR" in first.DerivationDescription
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    assert first.pixel_array.dtype == np.int16 and first.Rows == 64 and first.Columns == 48
    assert float(first.SliceThickness) == pytest.approx(0.5) and [d.InstanceNumber for d in out] == list(
        range(1, 25))


def test_reference_without_dicom_gets_anonymous_tags(tmp_path: Path):
    data = np.random.default_rng(1).gamma(2.0, 0.01, (1, 6, 5, 3)).astype(np.float32)  # a std-map-like float
    scan = Scan(array=data, affine=np.diag([1.5, 1.5, 2.0, 1.0]), modality="")
    save_dicom_series(scan, scan, tmp_path / "std", "uncertainty")
    ds = pydicom.dcmread(tmp_path / "std" / "IM000001.dcm")
    assert ds.PatientID == "ANONYMOUS" and ds.StudyInstanceUID and ds.Modality == "OT"
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    back = load_dicom(tmp_path / "std")
    assert np.abs(back.array - data).max() <= float(ds.RescaleSlope) / 2 + 1e-9
    np.testing.assert_allclose(back.affine, scan.affine, atol=1e-4)


def test_z_flipped_affine_keeps_world_positions(refined_ct, tmp_path: Path):
    reference, _ = refined_ct
    flipped = reference.with_array(reference.array[..., ::-1].copy(),
                                   reference.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 7],
                                                                [0, 0, 0, 1]]))
    save_dicom_series(flipped, reference, tmp_path / "f", "flipped")
    back = load_dicom(tmp_path / "f")
    np.testing.assert_allclose(back.affine, reference.affine, atol=1e-4)
    np.testing.assert_array_equal(back.array, reference.array)


def test_refuses_bad_requests(refined_ct, tmp_path: Path):
    reference, fine = refined_ct
    save_dicom_series(reference, reference, tmp_path / "o", "first")
    with pytest.raises(MedsrError, match="already holds a DICOM series"):
        save_dicom_series(reference, reference, tmp_path / "o", "second")
    assert len(save_dicom_series(fine, reference, tmp_path / "o", "again", overwrite=True)) == 24
    assert len(list((tmp_path / "o").iterdir())) == 24
    sheared = fine.affine.copy()
    sheared[:3, 2] += sheared[:3, 0]
    with pytest.raises(MedsrError, match="sheared"):
        save_dicom_series(fine.with_array(fine.array, sheared), reference, tmp_path / "s", "x")
    bad = fine.array.copy()
    bad[0, 1, 1, 1] = np.inf
    with pytest.raises(MedsrError, match="NaN or Inf"):
        save_dicom_series(fine.with_array(bad), reference, tmp_path / "n", "x")


def test_names_never_come_from_dicom_text(refined_ct, tmp_path: Path):
    reference, _ = refined_ct
    paths = save_dicom_series(reference, reference, tmp_path / "d", "../../escape")
    assert all(p.parent == tmp_path / "d" for p in paths)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [p.name for p in paths]


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix is not installed")
def test_dcm2niix_agrees_on_geometry(refined_ct, tmp_path: Path):
    reference, fine = refined_ct
    save_dicom_series(fine, reference, tmp_path / "sr", "medsr SR")
    (tmp_path / "nii").mkdir()
    subprocess.run(["dcm2niix", "-z", "n", "-f", "out", "-o", str(tmp_path / "nii"), str(tmp_path / "sr")],
                   check=True, capture_output=True)
    theirs = nib.as_closest_canonical(nib.load(tmp_path / "nii" / "out.nii"))
    back = load_dicom(tmp_path / "sr")
    ours = nib.as_closest_canonical(nib.Nifti1Image(back.array[0], back.affine))
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-3)
    np.testing.assert_allclose(theirs.get_fdata(), ours.get_fdata(), atol=1e-3)
