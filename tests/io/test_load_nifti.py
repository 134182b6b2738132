"""load_scan dispatch and NIfTI: exact round trips, 4D handling, NaN and empty images refused."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from iodata import NIBABEL_DATA, datafile, tree_hash

from medsr.io import MedsrError, load_scan, save_nifti


def test_nifti_round_trip_is_exact(tmp_path: Path):
    src = NIBABEL_DATA / "anatomical.nii"
    before = tree_hash(src)
    scan = load_scan(src)
    assert tree_hash(src) == before
    assert scan.format == "NIfTI" and scan.array.shape == (1, 33, 41, 25)
    save_nifti(scan, tmp_path / "copy.nii.gz")
    back = load_scan(tmp_path / "copy.nii.gz")
    np.testing.assert_array_equal(back.array, scan.array)
    np.testing.assert_array_equal(back.affine, scan.affine)
    np.testing.assert_array_equal(scan.affine, nib.load(src).affine)


def test_4d_needs_volume_index():
    path = NIBABEL_DATA / "example4d.nii.gz"
    with pytest.raises(MedsrError, match="4D image with 2 volumes"):
        load_scan(path)
    scan = load_scan(path, volume_index=1)
    assert scan.array.shape == (1, 128, 96, 24)
    np.testing.assert_array_equal(scan.array[0], np.asarray(nib.load(path).dataobj)[..., 1])


def test_nan_nifti_is_refused(tmp_path: Path):
    data = np.asarray(nib.load(NIBABEL_DATA / "anatomical.nii").dataobj, dtype=np.float32)
    data[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii")
    with pytest.raises(MedsrError, match=r"nan\.nii: 1 voxels are NaN or Inf"):
        load_scan(tmp_path / "nan.nii")


def test_empty_nifti_is_refused(tmp_path: Path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 0), np.float32), np.eye(4)), tmp_path / "empty.nii.gz")
    with pytest.raises(MedsrError, match="empty.nii.gz: empty image"):
        load_scan(tmp_path / "empty.nii.gz")


def test_options_that_do_not_apply_are_refused(tmp_path: Path):
    with pytest.raises(MedsrError, match="volume_index applies to 4D NIfTI"):
        load_scan(datafile("CT_small.dcm"), volume_index=0)
    with pytest.raises(MedsrError, match="series_uid applies to DICOM"):
        load_scan(NIBABEL_DATA / "anatomical.nii", series_uid="1.2.3")


def test_dicom_without_dcm_suffix_is_found_by_content(tmp_path: Path):
    path = tmp_path / "slice"
    path.write_bytes(datafile("MR_small.dcm").read_bytes())
    assert load_scan(path).modality == "MR"
