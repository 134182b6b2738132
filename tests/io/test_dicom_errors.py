"""Every bad DICOM input gets a MedsrError naming the file or folder and the problem, never a traceback."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from iodata import DICOMDIR_TESTS, datafile, new_dataset, oblique_iop, write_ct_series
from pydicom.encaps import encapsulate
from pydicom.uid import BasicTextSRStorage, generate_uid

from medsr.errors import Category
from medsr.io import MedsrError, load_scan


@contextmanager
def raises(category: Category, match: str) -> Iterator[pytest.ExceptionInfo[MedsrError]]:
    """pytest.raises for a MedsrError that must also carry ``category`` (callers sort errors by it)."""
    with pytest.raises(MedsrError, match=match) as info:
        yield info
    assert info.value.category is category, (info.value.category, str(info.value))


def _edit(path: Path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path)


@pytest.mark.parametrize(("cut", "category"), [(100, Category.UNREADABLE), (1000, Category.DAMAGED),
                                               (20000, Category.DAMAGED)])
def test_truncated_file(tmp_path: Path, cut: int, category: Category):
    data = datafile("CT_small.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[:cut])
    with raises(category, match=r"cut\.dcm.*(truncated|not a DICOM)"):
        load_scan(path)


def test_text_file_is_not_dicom(tmp_path: Path):
    path = tmp_path / "notes.dcm"
    path.write_text("patient notes, not an image\n" * 50)
    with raises(Category.UNREADABLE, match="notes.dcm: not a DICOM file"):
        load_scan(path)


def test_structured_report_has_no_pixels(tmp_path: Path):
    ds = new_dataset(BasicTextSRStorage)
    ds.Modality, ds.PatientName, ds.ValueType = "SR", "Secret^Name", "CONTAINER"
    ds.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    with raises(Category.NOT_IMAGE, match="Basic Text SR Storage, modality SR") as info:
        load_scan(tmp_path / "report.dcm")
    assert "Secret" not in str(info.value)
    with raises(Category.NOT_IMAGE, match="RT Structure Set Storage, modality RTSTRUCT"):
        load_scan(datafile("rtstruct.dcm"))  # real file, no preamble


def test_undecodable_transfer_syntax_is_named(tmp_path: Path):
    ds = pydicom.dcmread(datafile("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder installed
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "mpeg.dcm")
    expected = r"mpeg\.dcm: cannot decode pixel data .*MPEG2.*1\.2\.840\.10008\.1\.2\.4\.100"
    with raises(Category.UNDECODABLE, match=expected):
        load_scan(tmp_path / "mpeg.dcm")


def test_missing_slice_names_the_position(ct_series):
    folder, paths, _, _ = ct_series
    gone = pydicom.dcmread(paths[3]).ImagePositionPatient
    paths[3].unlink()
    with raises(Category.GEOMETRY, match="1 slice\\(s\\) missing after slice 3 of 7") as info:
        load_scan(folder)
    assert f"{float(gone[0]):.2f}" in str(info.value)


def test_real_series_with_a_gap():
    with raises(Category.GEOMETRY, match="161 slice\\(s\\) missing"):
        load_scan(DICOMDIR_TESTS / "77654033" / "CT2")


def test_uneven_spacing(ct_series):
    folder, paths, _, _ = ct_series
    ipp = np.array([float(v) for v in pydicom.dcmread(paths[4]).ImagePositionPatient])
    normal = np.cross(oblique_iop()[:3], oblique_iop()[3:])
    _edit(paths[4], ImagePositionPatient=[f"{v:.6f}" for v in ipp + 0.4 * normal])
    with raises(Category.GEOMETRY, match="uneven slice spacing"):
        load_scan(folder)


def test_mixed_orientation(ct_series):
    folder, paths, _, _ = ct_series
    _edit(paths[2], ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    with raises(Category.GEOMETRY, match="mixed slice orientations"):
        load_scan(folder)
    with raises(Category.GEOMETRY, match="CT2N: mixed slice orientations"):  # real scout pair
        load_scan(DICOMDIR_TESTS / "98892001" / "CT2N")


def test_mixed_rows_columns(tmp_path: Path, ct_crop):
    write_ct_series(tmp_path, ct_crop[:3], series_uid="1.2.3.4")
    write_ct_series(tmp_path, ct_crop[3:5, :16], series_uid="1.2.3.4")
    with raises(Category.GEOMETRY, match="differ in Rows/Columns"):
        load_scan(tmp_path)


def test_several_series_are_listed_and_one_can_be_chosen(tmp_path: Path, ct_crop):
    write_ct_series(tmp_path / "a", ct_crop[:4], series_uid="1.2.826.0.1.1", description="first")
    write_ct_series(tmp_path / "b", ct_crop[4:], series_uid="1.2.826.0.1.2", description="second")
    with raises(Category.INVALID, match="holds 2 DICOM series") as info:
        load_scan(tmp_path)
    message = str(info.value)
    assert "1.2.826.0.1.1" in message and "1.2.826.0.1.2" in message and "4 file(s)" in message
    assert "Doe" not in message and "MEDSR-TEST-0042" not in message
    scan = load_scan(tmp_path, series_uid="1.2.826.0.1.2")
    assert scan.array.shape[-1] == 4 and scan.series_uid == "1.2.826.0.1.2"
    with raises(Category.NOT_FOUND, match="no series with SeriesInstanceUID 9.9"):
        load_scan(tmp_path, series_uid="9.9")


def test_folder_without_images(tmp_path: Path):
    shutil.copytree(DICOMDIR_TESTS / "TINY_ALPHA", tmp_path / "tiny")  # DICOMDIR + pixel-less CT objects
    with raises(Category.DAMAGED, match="no DICOM image files found.*DICOMDIR"):
        load_scan(tmp_path / "tiny")
    with raises(Category.NOT_IMAGE, match="DICOMDIR index"):
        load_scan(tmp_path / "tiny" / "DICOMDIR")


def test_nonexistent_path(tmp_path: Path):
    with raises(Category.NOT_FOUND, match="no such file or folder"):
        load_scan(tmp_path / "missing.dcm")


def test_repeated_position(ct_series):
    folder, paths, _, _ = ct_series
    echo = pydicom.dcmread(paths[2])  # another image (new SOPInstanceUID) at the same place: a second echo
    echo.SOPInstanceUID = echo.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    echo.save_as(folder / "echo_2")
    with raises(Category.GEOMETRY, match="share a position"):
        load_scan(folder)


def test_exact_copy_of_a_slice_is_read_once(ct_series):
    folder, paths, expected, affine = ct_series
    (folder / "copy_of_one").write_bytes(paths[2].read_bytes())  # same SOPInstanceUID: one image stored twice
    scan = load_scan(folder)
    np.testing.assert_array_equal(scan.array, expected)
    np.testing.assert_allclose(scan.affine, affine, atol=1e-6)


def test_gantry_tilt_is_refused(ct_series):
    folder, paths, _, _ = ct_series
    row = oblique_iop()[:3]
    for k, p in enumerate(paths):  # each slice shifted 0.3 mm further along the rows: a sheared stack
        ipp = np.array([float(v) for v in pydicom.dcmread(p).ImagePositionPatient])
        _edit(p, ImagePositionPatient=[f"{v:.6f}" for v in ipp + 0.3 * k * row])
    with raises(Category.GEOMETRY, match="gantry tilt"):
        load_scan(folder)
