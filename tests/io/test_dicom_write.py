"""Writing derived DICOM: geometry, tags and values survive a read back; dcm2niix, dciodvfy and dcentvfy agree.

The derived image series and the uncertainty Parametric Map are checked against dicom3tools (Debian
``dicom3tools``): no validator error beyond those the source itself has, and one consistent study.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from iodata import datafile

from medsr import __version__
from medsr.io import MedsrError, Scan, load_dicom, refined_affine, save_dicom_series
from medsr.io.dicom_pmap import save_parametric_map, write_dicom

NEEDS_DICOM3TOOLS = pytest.mark.skipif(shutil.which("dciodvfy") is None or shutil.which("dcentvfy") is None,
                                       reason="dicom3tools (dciodvfy, dcentvfy) not installed: apt-get install "
                                              "dicom3tools")


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
    assert list(first.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"] and first.SeriesDescription == "medsr SR"
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


def _refined(reference: Scan, factors: tuple[int, int, int], seed: int = 0) -> tuple[Scan, Scan]:
    """A float 'mean' and a positive 'std' on a refined grid of ``reference``."""
    fine = reference.array
    for axis, f in enumerate(factors, start=1):
        fine = np.repeat(fine, f, axis)
    rng = np.random.default_rng(seed)
    affine = refined_affine(reference.affine, factors)
    return (reference.with_array(fine + rng.normal(0, 2, fine.shape), affine),
            reference.with_array(rng.gamma(2.0, 3.0, fine.shape), affine))


def test_source_attributes_kept_verbatim_with_research_marks(tmp_path: Path):
    src = pydicom.dcmread(datafile("CT_small.dcm"), stop_before_pixels=True)
    reference = load_dicom(datafile("CT_small.dcm"))
    mean, _ = _refined(reference, (2, 2, 1))
    out = pydicom.dcmread(save_dicom_series(mean, reference, tmp_path / "m", "medsr SR")[0])
    kept = [kw for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight",
                          "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                          "ReferringPhysicianName", "Manufacturer", "InstitutionName", "StationName",
                          "ManufacturerModelName", "DeviceSerialNumber", "FrameOfReferenceUID", "KVP",
                          "AcquisitionNumber", "Laterality", "ContrastBolusAgent", "ExposureTime",
                          "OtherPatientIDsSequence", "AdditionalPatientHistory") if kw in src]
    assert len(kept) >= 15
    for kw in kept:
        assert out[kw].value == src[kw].value, kw
    assert list(out.SoftwareVersions) == [str(src.SoftwareVersions), f"medsr {__version__}"]
    assert out.BurnedInAnnotation == "NO" and "not for diagnostic use" in out.ImageComments
    assert "not for diagnostic use" in out.DerivationDescription
    assert (float(out.WindowCenter), float(out.WindowWidth)) == (40.0, 400.0)  # CT soft tissue, not min-max
    assert not any(e.tag.is_private for e in out) and out.Rows == 2 * src.Rows


def test_mr_keeps_source_window_and_integer_values(tmp_path: Path):
    reference = load_dicom(datafile("MR_small.dcm"))
    mean, _ = _refined(reference, (2, 2, 1))
    out = pydicom.dcmread(save_dicom_series(mean, reference, tmp_path / "m", "medsr SR")[0])
    assert (float(out.WindowCenter), float(out.WindowWidth)) == (600.0, 1600.0)  # the source's own window
    assert "RescaleSlope" not in out and out.SOPClassUID == pydicom.uid.MRImageStorage  # MR IOD: no Modality LUT
    back = load_dicom(tmp_path / "m")
    assert np.abs(back.array - mean.array).max() <= 0.5 + 1e-4


def test_each_image_references_its_source_slice(refined_ct, tmp_path: Path):
    reference, fine = refined_ct  # 8 source slices refined 3x along Z
    files = save_dicom_series(fine, reference, tmp_path / "sr", "medsr SR")
    uids = [h.SOPInstanceUID for h in reference.dicom_headers]
    for j, path in enumerate(files):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        (item,) = ds.SourceImageSequence
        assert item.ReferencedSOPInstanceUID == uids[j // 3] and item.ReferencedSOPClassUID == ds.SOPClassUID
        assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert [(c.CodeValue, c.CodingSchemeDesignator) for c in ds.DerivationCodeSequence] == [("113085", "DCM")]


def test_multiframe_source_frames_are_referenced_by_position(tmp_path: Path):
    path = datafile("eCT_Supplemental.dcm")
    src = pydicom.dcmread(path, stop_before_pixels=True)
    reference = load_dicom(path)
    mean, _ = _refined(reference, (2, 2, 1))
    frame_ipp = [np.array(g.PlanePositionSequence[0].ImagePositionPatient, float)
                 for g in src.PerFrameFunctionalGroupsSequence]
    seen = set()
    for f in save_dicom_series(mean, reference, tmp_path / "m", "medsr SR"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        item = ds.SourceImageSequence[0]
        nearest = 1 + int(np.argmin([np.linalg.norm(np.array(ds.ImagePositionPatient, float) - p) for p in frame_ipp]))
        assert item.ReferencedSOPInstanceUID == src.SOPInstanceUID and item.ReferencedFrameNumber == nearest
        seen.add(nearest)
    assert seen == {1, 2}


def test_parametric_map_round_trip(tmp_path: Path):
    reference = load_dicom(datafile("CT_small.dcm"))
    mean, std = _refined(reference, (2, 2, 1))
    images, pm_path = write_dicom(reference, type("R", (), {"mean": mean, "std": std})(), tmp_path, "medsr", 4)
    pm = pydicom.dcmread(pm_path)
    image = pydicom.dcmread(images[0], stop_before_pixels=True)
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and pm.FrameOfReferenceUID == image.FrameOfReferenceUID
    assert pm.StudyInstanceUID == image.StudyInstanceUID and pm.SeriesInstanceUID != image.SeriesInstanceUID
    assert (int(image.SeriesNumber), int(pm.SeriesNumber)) == (1001, 1002)  # CT_small is series 1
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "[hnsf'U]"
    assert mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == "113061"
    assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == image.SeriesInstanceUID
    frame = pm.PerFrameFunctionalGroupsSequence[0]
    assert frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == image.SOPInstanceUID
    back = load_dicom(pm_path)  # an independent path: float frames + functional-group geometry
    np.testing.assert_array_equal(back.array, std.array.astype(np.float32))
    np.testing.assert_allclose(back.affine, std.affine, atol=1e-4)
    assert "not for diagnostic use" in pm.ImageComments and pm.BurnedInAnnotation == "NO"


def test_parametric_map_refuses_another_grid(refined_ct, tmp_path: Path):
    reference, fine = refined_ct
    images = save_dicom_series(fine, reference, tmp_path / "m", "medsr SR")
    with pytest.raises(MedsrError, match="does not match"):
        save_parametric_map(reference, images, tmp_path / "pm.dcm", series_number=5, description="std")
    assert not (tmp_path / "pm.dcm").exists()


def _errors(path: Path) -> set[str]:
    """dciodvfy's error lines, item indices dropped (so the same problem compares equal)."""
    run = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    return {re.sub(r"\[\d+\]", "", line) for line in lines if line.startswith("Error")}


@NEEDS_DICOM3TOOLS
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "eCT_Supplemental.dcm", "series",
                                  "no DICOM source"])
def test_dicom3tools_find_no_new_errors(name: str, ct_series, tmp_path: Path):
    if name == "no DICOM source":  # e.g. a NIfTI input written as DICOM: secondary capture, no references
        src: list[Path] = []
        reference = Scan(array=np.random.default_rng(2).normal(0, 1, (1, 6, 5, 2)).astype(np.float32),
                         affine=np.diag([1.5, 1.5, 2.0, 1.0]))
    else:
        src = ct_series[1] if name == "series" else [datafile(name)]
        reference = load_dicom(ct_series[0] if name == "series" else src[0])
    mean, std = _refined(reference, (2, 2, 1 if len(src) == 1 else 2))
    images, pm = write_dicom(reference, type("R", (), {"mean": mean, "std": std})(), tmp_path, "medsr", 4)
    source_errors = set().union(*(_errors(p) for p in src))
    for path in (images[0], images[-1]):
        assert _errors(path) - source_errors == set(), path
    assert _errors(pm) == set()
    run = subprocess.run(["dcentvfy", *map(str, src), *map(str, images), str(pm)], capture_output=True, text=True,
                         timeout=120)
    # One consistent patient / study. The only tolerated remark: a type 2 attribute that the source lacks
    # (its own dciodvfy error) and medsr's objects carry empty, as the standard requires.
    lacking = {m.group(1) for e in source_errors if "Missing attribute for Type 2" in e
               for m in [re.search(r"</(\w+)\(", e)] if m}
    remarks = [line for line in (run.stdout + run.stderr).splitlines()
               if not any(f"Element=<{kw}>" in line and "present in one instance but not the other" in line
                          for kw in lacking)]
    assert remarks == [], remarks
