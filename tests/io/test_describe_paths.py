"""describe_scan and ``medsr info`` (no patient data), safe output paths, refined-grid geometry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from iodata import datafile
from typer.testing import CliRunner

from medsr.cli import app
from medsr.errors import Category
from medsr.io import (
    MedsrError,
    Scan,
    crop_scan,
    crop_to_factors,
    load_scan,
    refined_affine,
    safe_join,
    sanitize_component,
)
from medsr.io.describe import describe_scan


def test_describe_ct_small():
    info = describe_scan(load_scan(datafile("CT_small.dcm")))
    assert info["format"] == "DICOM file" and info["modality"] == "CT"
    assert info["shape"] == [128, 128, 1] and info["slices"] == 1
    assert info["spacing_mm"] == [0.6615, 0.6615, 5.0] and info["orientation"] == "LPS"
    assert info["intensity_units"] == "HU" and info["intensity_min"] < -800
    json.dumps(info)


def test_describe_multiframe_has_no_patient_data():
    path = datafile("eCT_Supplemental.dcm")
    text = json.dumps(describe_scan(load_scan(path)))
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert "DICOM multi-frame" in text
    for kw in ("PatientName", "PatientID", "PatientBirthDate"):
        assert str(ds[kw].value) not in text


def test_cli_info_prints_modality_and_spacing_but_no_identifiers():
    path = datafile("CT_small.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    result = CliRunner().invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "CT" in result.output and "0.6615" in result.output and "HU" in result.output
    assert str(ds.PatientName) not in result.output and str(ds.PatientID) not in result.output


def test_safe_paths_refuse_escapes(tmp_path: Path):
    assert sanitize_component("../../etc/passwd") == "etc_passwd"
    assert sanitize_component("..") == "unnamed"
    assert safe_join(tmp_path, "../x", "..").parent.parent == tmp_path.resolve()
    assert tmp_path.resolve() in safe_join(tmp_path, "/abs/../../path").parents
    link = tmp_path / "link"
    link.symlink_to(tmp_path.parent)
    with pytest.raises(MedsrError, match="outside"):
        safe_join(tmp_path, "link", "x")


def test_refined_affine_centres_fine_blocks_on_coarse_voxels():
    th = np.radians(20.0)
    rot = np.array([[np.cos(th), 0, np.sin(th)], [0, 1, 0], [-np.sin(th), 0, np.cos(th)]])
    coarse = np.eye(4)
    coarse[:3, :3] = rot @ np.diag([0.8, 1.1, 3.0])
    coarse[:3, 3] = [12.0, -40.0, 7.5]
    factors = np.array([2, 3, 4])
    fine = refined_affine(coarse, factors)
    for i in ([0, 0, 0], [3, 1, 2], [5, 7, 1]):
        block = np.stack(np.meshgrid(*[np.arange(f * c, f * c + f) for f, c in zip(factors, i, strict=True)],
                                     indexing="ij"), -1).reshape(-1, 3)
        centre = (fine[:3, :3] @ block.T).T.mean(0) + fine[:3, 3]
        np.testing.assert_allclose(centre, coarse[:3, :3] @ i + coarse[:3, 3], atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(fine[:3, :3], axis=0), [0.4, 1.1 / 3, 0.75])


def test_crop_keeps_every_voxel_at_its_world_position():
    th = np.radians(30.0)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]]) @ np.diag(
        [0.7, 0.9, 2.5])
    affine[:3, 3] = [-20.0, 35.0, 4.0]
    scan = Scan(np.arange(9 * 7 * 5, dtype=np.float32).reshape(1, 9, 7, 5), affine)
    crop = crop_scan(scan, (2, 1, 3), (4, 5, 9))  # Z asks for more than there is: clipped at the end
    assert crop.spatial_shape == (4, 5, 2)
    for i in ([0, 0, 0], [3, 4, 1], [1, 2, 0]):
        src = np.array(i) + [2, 1, 3]
        assert crop.array[(0, *i)] == scan.array[(0, *src)]
        np.testing.assert_allclose(crop.affine[:3, :3] @ i + crop.affine[:3, 3],
                                   affine[:3, :3] @ src + affine[:3, 3], atol=1e-12)
    even = crop_to_factors(scan, (2, 3, 4))  # 9 -> 8 from voxel 0, 7 -> 6 from 0, 5 -> 4 from 0 (centred: (s-k)//2)
    assert even.spatial_shape == (8, 6, 4)
    with pytest.raises(MedsrError, match="smaller than the factors") as info:
        crop_to_factors(scan, (10, 1, 1))
    assert info.value.category is Category.TOO_SMALL
