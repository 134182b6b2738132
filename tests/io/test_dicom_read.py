"""Reading real DICOM: single slices, compressed slices, multi-frame files and series folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from iodata import DICOMDIR_TESTS, NIBABEL_DATA, datafile, tree_hash

from medsr.io import list_series, load_dicom, load_scan


def test_ct_small_is_hounsfield_with_real_geometry():
    before = tree_hash(datafile("CT_small.dcm"))
    scan = load_dicom(datafile("CT_small.dcm"))
    assert tree_hash(datafile("CT_small.dcm")) == before
    ds = pydicom.dcmread(datafile("CT_small.dcm"))
    assert scan.format == "DICOM file" and scan.modality == "CT"
    assert scan.array.shape == (1, 128, 128, 1) and scan.array.dtype == np.float32
    assert scan.spacing == pytest.approx((0.661468, 0.661468, 5.0))
    assert -1100 < scan.array.min() < -800 and 500 < scan.array.max() < 3000  # air .. bone in HU
    # X runs along columns: voxel (i, j) is pixel_array[j, i] after the rescale.
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(scan.array[0, :, :, 0], hu.T)
    # voxel (0, 0, 0) sits at ImagePositionPatient, flipped from LPS to RAS
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(scan.affine[:3, 3], ipp * [-1, -1, 1])
    assert scan.series_uid == ds.SeriesInstanceUID
    assert len(scan.dicom_headers) == 1 and "PixelData" not in scan.dicom_headers[0]


def test_mr_small():
    scan = load_dicom(datafile("MR_small.dcm"))
    assert scan.modality == "MR" and scan.array.shape == (1, 64, 64, 1)
    assert scan.spacing == pytest.approx((0.3125, 0.3125, 0.8))  # no SpacingBetweenSlices: SliceThickness


def test_jpeg2000_ct_slice_decodes():
    lossy = load_dicom(datafile("693_J2KI.dcm"))  # bundled with pydicom: JPEG 2000 (lossy) CT
    assert lossy.modality == "CT" and lossy.array.shape == (1, 512, 512, 1)
    assert lossy.spacing[:2] == pytest.approx((0.478516, 0.478516))
    lossless, plain = load_dicom(datafile("693_J2KR.dcm")), load_dicom(datafile("693_UNCR.dcm"))
    np.testing.assert_array_equal(lossless.array, plain.array)
    np.testing.assert_array_equal(lossless.affine, lossy.affine)
    assert np.median(np.abs(lossy.array - plain.array)) < 50  # same image, lossy coding error only


def test_legacy_multiframe_emri_small_warns_about_missing_geometry():
    path = datafile("emri_small.dcm")  # Enhanced MR stripped of its functional groups: no geometry at all
    with pytest.warns(UserWarning) as caught:
        scan = load_dicom(path)
    assert {"geometry", "PixelSpacing"} <= {w for c in caught for w in ("geometry", "PixelSpacing")
                                            if w in str(c.message)}
    assert scan.format == "DICOM multi-frame" and scan.modality == "MR"
    assert scan.array.shape == (1, 64, 64, 10)
    assert scan.spacing == pytest.approx((1.0, 1.0, 1.2))  # frames step by SpacingBetweenSlices
    frames = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(scan.array[0], np.transpose(frames, (2, 1, 0)))
    assert len(scan.dicom_headers) == 1


def test_enhanced_ct_uses_per_frame_geometry():
    path = datafile("eCT_Supplemental.dcm")  # 2 frames, 10 mm apart, IOP (-1,0,0 / 0,1,0)
    scan = load_dicom(path)
    ds = pydicom.dcmread(path)
    assert scan.format == "DICOM multi-frame" and scan.modality == "CT"
    assert scan.array.shape == (1, 512, 512, 2)
    assert scan.spacing == pytest.approx((0.388672, 0.388672, 10.0))
    # normal = (-1,0,0) x (0,1,0) = (0,0,-1): frame at z=-149 comes first, then z=-159
    np.testing.assert_allclose(scan.affine[:3, 3], [-99.5, 301.5, -149.0])
    np.testing.assert_allclose(scan.affine[:3, 2], [0, 0, -10.0])
    np.testing.assert_array_equal(scan.array[0, :, :, 0], ds.pixel_array[1].T - 1024.0)


def test_real_series_folder_sorted_by_position(tmp_path: Path):
    folder = DICOMDIR_TESTS / "98892001" / "CT5N"  # 5 CT slices, InstanceNumber opposite to position
    before = tree_hash(folder)
    scan = load_dicom(folder)
    assert tree_hash(folder) == before
    assert scan.format == "DICOM series" and scan.array.shape == (1, 16, 16, 5)
    assert scan.spacing == pytest.approx((0.488281, 0.488281, 2.5))
    zs = [float(h.ImagePositionPatient[2]) for h in scan.dicom_headers]
    assert zs == sorted(zs) and scan.affine[2, 3] == pytest.approx(zs[0])
    assert all("PixelData" not in h for h in scan.dicom_headers)


def test_real_oblique_pair_from_nibabel(tmp_path: Path):
    for name in ("0.dcm", "1.dcm"):  # two real MR slices, 3 mm apart, slightly oblique
        shutil.copy(NIBABEL_DATA / name, tmp_path / name)
    scan = load_scan(tmp_path)
    assert scan.array.shape == (1, 256, 256, 2)
    assert scan.spacing[2] == pytest.approx(3.0, abs=1e-3)


def test_written_series_shuffled_names_gives_exact_array_and_affine(ct_series):
    folder, paths, expected, affine = ct_series
    for p in paths:  # the names were already random; shuffle them again for good measure
        p.rename(p.with_name(f"x{hash(p.name) & 0xFFFF:05d}_{p.name}"))
    scan = load_dicom(folder)
    np.testing.assert_array_equal(scan.array, expected)
    np.testing.assert_allclose(scan.affine, affine, atol=1e-5)
    assert scan.modality == "CT" and scan.format == "DICOM series"


def test_recursive_folder_skips_dicomdir_and_text(ct_series, tmp_path: Path):
    folder, _, expected, _ = ct_series
    shutil.copy(DICOMDIR_TESTS / "DICOMDIR", folder / "DICOMDIR")
    (folder / "README.txt").write_text("not dicom\n")
    nested = tmp_path / "outer"
    shutil.move(str(folder), nested / "inner")
    np.testing.assert_array_equal(load_dicom(nested).array, expected)


def test_list_series_reads_headers_only():
    found = list_series(DICOMDIR_TESTS / "98892001")
    assert [(s["description"], s["modality"], s["n_files"]) for s in found] == [
        ("Scout", "CT", 2), ("SmartScore - Gated 0.5 sec", "CT", 5)]
    assert all(len(s["uid"]) > 10 and len(s["files"]) == s["n_files"] for s in found)


def test_series_uid_picks_one_of_several():
    folder = DICOMDIR_TESTS / "98892001"
    uid = next(s["uid"] for s in list_series(folder) if s["n_files"] == 5)
    scan = load_dicom(folder, series_uid=uid)
    assert scan.series_uid == uid and scan.array.shape == (1, 16, 16, 5)
