"""The headers-only DICOM survey, loading an explicit file list, duplicate and damaged copies of one instance,
and the acquisition plane a 2D model works in."""

from __future__ import annotations

import dataclasses
import pickle
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from enhance_fixtures import tiny_model
from iodata import DICOMDIR_TESTS, NIBABEL_DATA, datafile, write_ct_series
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from medsr.enhance import EnhanceOptions, choose_slice_axis, enhance_scan
from medsr.errors import Category
from medsr.io import MedsrError, load_dicom_files, load_scan, read_header, survey


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_header_fields_without_pixels(tmp_path: Path) -> None:
    ct = read_header(datafile("CT_small.dcm"))
    assert ct is not None and ct.kind == "image" and ct.modality == "CT" and ct.sop_class == "CT Image Storage"
    assert (ct.rows, ct.columns, ct.frames) == (128, 128, 1)
    assert ct.pixel_spacing == pytest.approx((0.661468, 0.661468)) and ct.slice_spacing == 5.0
    assert ct.sop_instance_uid == str(pydicom.dcmread(datafile("CT_small.dcm")).SOPInstanceUID)
    multi = read_header(datafile("eCT_Supplemental.dcm"))  # enhanced CT: spacing in the shared functional groups
    assert multi is not None and multi.frames == 2 and multi.pixel_spacing is not None and multi.rows == 512
    (tmp_path / "notes.txt").write_text("not an image\n")
    assert read_header(tmp_path / "notes.txt") is None
    index = read_header(DICOMDIR_TESTS / "DICOMDIR")
    assert index is not None and index.kind == "dicomdir"


def _damaged_copy_layout(root: Path, damaged_first: bool) -> tuple[Path, Path]:
    """``siteA/study1/ct.dcm`` and, elsewhere, a copy of the same instance cut inside its pixel data."""
    good = root / "siteA" / "study1" / "ct.dcm"
    good.parent.mkdir(parents=True)
    shutil.copy(datafile("CT_small.dcm"), good)
    cut = root / ("0_backup" if damaged_first else "zz_backup") / "ct_copy.dcm"
    cut.parent.mkdir(parents=True)
    cut.write_bytes(good.read_bytes()[:20000])  # header intact (same SOPInstanceUID), pixel data cut short
    return good, cut


@pytest.mark.parametrize("damaged_first", [True, False])
def test_truncated_copy_is_skipped_alone_and_the_good_copy_is_read(tmp_path: Path, damaged_first: bool) -> None:
    good, cut = _damaged_copy_layout(tmp_path, damaged_first)
    found = survey(_files(tmp_path))
    assert [[h.path for h in s.files] for s in found.series] == [[good]]
    assert [h.path for h in found.damaged] == [cut]
    assert "pixel data cut short (13700 of 32768 bytes)" in found.damaged[0].problem
    expected = load_scan(good)
    for scan in (load_scan(tmp_path), load_dicom_files([cut, good]), load_dicom_files([good, cut])):
        np.testing.assert_array_equal(scan.array, expected.array)
        np.testing.assert_allclose(scan.affine, expected.affine)
    with pytest.raises(MedsrError, match=r"ct_copy\.dcm.*cut short") as info:  # no readable copy given: refused
        load_dicom_files([cut])
    assert info.value.category is Category.DAMAGED


def test_undecodable_copy_gives_way_to_a_decodable_one(tmp_path: Path) -> None:
    """A copy whose header is fine but whose pixels do not decode (found only when decoding) is passed over."""
    good = tmp_path / "b" / "ct.dcm"
    good.parent.mkdir()
    shutil.copy(datafile("CT_small.dcm"), good)
    ds = pydicom.dcmread(good)  # same SOPInstanceUID, re-stored as MPEG2, for which no decoder is installed
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    (tmp_path / "a").mkdir()
    ds.save_as(tmp_path / "a" / "ct.dcm")
    found = survey(_files(tmp_path))
    assert [h.path for h in found.series[0].files] == [tmp_path / "a" / "ct.dcm"]  # first in path order kept
    assert [h.path for h in found.duplicates] == [good]
    np.testing.assert_array_equal(load_scan(tmp_path).array, load_scan(good).array)
    with pytest.raises(MedsrError, match="cannot decode") as info:
        load_scan(tmp_path / "a" / "ct.dcm")
    assert info.value.category is Category.UNDECODABLE


def test_load_dicom_files_reads_exactly_the_files_given(tmp_path: Path, ct_crop: np.ndarray) -> None:
    """Two series in one folder: the file list picks one without a UID; a non-DICOM file in the list is an error."""
    first, affine = write_ct_series(tmp_path, ct_crop[:4], description="first")
    write_ct_series(tmp_path, ct_crop[4:], description="second")
    scan = load_dicom_files(first[::-1])
    np.testing.assert_array_equal(scan.array, np.transpose(ct_crop[:4], (2, 1, 0))[None].astype(np.float32))
    np.testing.assert_allclose(scan.affine, affine, atol=1e-6)
    assert scan.format == "DICOM series" and scan.source == str(tmp_path) and scan.acquisition_axis == 2
    (tmp_path / "notes.txt").write_text("not an image\n")
    with pytest.raises(MedsrError, match=r"notes\.txt: not a DICOM file") as info:
        load_dicom_files([*first, tmp_path / "notes.txt"])
    assert info.value.category is Category.UNREADABLE
    with pytest.raises(MedsrError, match="no such file") as info:
        load_dicom_files([*first, tmp_path / "gone.dcm"])
    assert info.value.category is Category.NOT_FOUND


def test_error_category_survives_pickling() -> None:
    """Worker processes hand errors across a process boundary; the category must come along."""
    err = pickle.loads(pickle.dumps(MedsrError("x.dcm: cut short", Category.DAMAGED)))
    assert err.category is Category.DAMAGED and str(err) == "x.dcm: cut short"
    assert MedsrError("a plain error").category is Category.INVALID


def test_coarse_in_plane_series_is_sliced_in_its_acquisition_plane(tmp_path: Path, ct_crop: np.ndarray) -> None:
    """32 x 32 slices of 8 mm pixels, 3 mm apart: the 2D model works on the DICOM rows x columns plane."""
    hu = np.concatenate([ct_crop, ct_crop[:, :, :8]], axis=2)  # (8, 32, 32) real head CT
    write_ct_series(tmp_path / "s", hu, pixel_spacing=(8.0, 8.0), thickness=3.0)
    scan = load_scan(tmp_path / "s")
    assert scan.spatial_shape == (32, 32, 8) and scan.spacing == pytest.approx((8.0, 8.0, 3.0))
    assert scan.acquisition_axis == 2 and choose_slice_axis(scan) == 2
    assert choose_slice_axis(dataclasses.replace(scan, acquisition_axis=None)) != 2  # spacing alone says X
    model = tiny_model(tmp_path / "m.pt")  # 2D, block 2x2
    result = enhance_scan(scan, model, EnhanceOptions(samples=1, steps=1, device="cpu", amp="none"))
    assert result.info["slice_axis"] == 2 and result.factors == (2, 2, 1)
    assert result.mean.spatial_shape == (64, 64, 8)
    given = enhance_scan(scan, model, EnhanceOptions(samples=1, steps=1, device="cpu", amp="none", slice_axis=0))
    assert given.info["slice_axis"] == 0 and given.factors == (1, 2, 2)  # the user's choice still wins


def test_acquisition_axis_of_multiframe_single_file_and_nifti() -> None:
    assert load_scan(datafile("eCT_Supplemental.dcm")).acquisition_axis == 2
    assert load_scan(datafile("CT_small.dcm")).acquisition_axis == 2
    assert load_scan(NIBABEL_DATA / "anatomical.nii").acquisition_axis is None
