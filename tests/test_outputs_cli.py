"""``medsr enhance`` end to end on a real NIfTI and a real DICOM file with a tiny random-weight model: files,
geometry, DICOM read-back in HU, report.json, no patient data, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from enhance_fixtures import DICOM_REF, anatomical, fine_centres, tiny_config, write_tiny_checkpoint
from PIL import Image
from typer.testing import CliRunner, Result

import medsr.cli
import medsr.outputs
import medsr.runtime
from medsr.enhance import EnhanceOptions, enhance_scan
from medsr.io import crop_scan, load_scan, refined_affine, save_nifti
from medsr.io.refs import resolve_ref
from medsr.model import file_sha256
from medsr.outputs import write_outputs
from medsr.review import heat_caption

STATS = ("mean", "std", "q05", "q95")
FAST = ["--steps", "2", "--device", "cpu", "--amp", "none"]


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt: Path) -> Path:
    return tiny_ckpt


def enhance(*args: str) -> Result:
    torch.set_num_threads(1)
    return CliRunner().invoke(medsr.cli.app, ["enhance", *args])


@pytest.fixture(scope="module")
def nifti_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three real slices of nibabel's T1 (33 x 41 x 3, 2 mm), written as a NIfTI file: the CLI reads files."""
    src = anatomical()
    path = tmp_path_factory.mktemp("nifti_src") / "anatomical.nii.gz"
    save_nifti(crop_scan(src, (0, 0, 10), (*src.spatial_shape[:2], 3)), path)
    return path


@pytest.fixture(scope="module")
def nifti_run(ckpt: Path, nifti_src: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path]:
    out = tmp_path_factory.mktemp("nifti_out")
    res = enhance(str(nifti_src), "--model", str(ckpt), "--out", str(out), "--samples", "3",
                  "--seed", "5", "--save-samples", *FAST)
    assert res.exit_code == 0, res.output
    return res, out / "anatomical"


@pytest.fixture(scope="module")
def dicom_run(ct_small_enhanced: tuple[Result, Path]) -> tuple[Result, Path]:
    """``medsr enhance`` on the real CT slice, 2 samples, default format (shared with the PACS tests)."""
    return ct_small_enhanced


def report(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "report.json").read_text())


# --- NIfTI -------------------------------------------------------------------------------------------------------

def test_nifti_files_shapes_and_geometry(nifti_run: tuple[Result, Path], nifti_src: Path) -> None:
    res, folder = nifti_run
    src = load_scan(nifti_src)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([f"{k}.nii.gz" for k in STATS] + ["review.png", "report.json", "samples.nii.gz"])
    assert f"-> {folder}" in res.stdout
    affine = refined_affine(src.affine, (2, 2, 1))  # isotropic 2 mm: sliced axially, x2 in-plane
    for key in STATS:
        out = load_scan(folder / f"{key}.nii.gz")
        assert out.array.shape == (1, 66, 82, 3)
        np.testing.assert_allclose(out.spacing, (1.0, 1.0, 2.0), atol=1e-6)
        np.testing.assert_allclose(out.affine, affine, atol=1e-5)
    centres = fine_centres(affine, (66, 82, 3)).reshape(33, 2, 41, 2, 3, 1, 3).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(centres, fine_centres(src.affine, src.spatial_shape), atol=1e-9)
    samples = nib.load(folder / "samples.nii.gz")
    assert samples.shape == (66, 82, 3, 3)  # one volume per sample
    np.testing.assert_allclose(samples.affine, affine, atol=1e-5)


def test_nifti_statistics_are_sane(nifti_run: tuple[Result, Path], nifti_src: Path) -> None:
    _, folder = nifti_run
    mean, std, q05, q95 = (load_scan(folder / f"{k}.nii.gz").array for k in STATS)
    assert (std >= 0).all() and std.mean() > 0
    assert ((q05 <= mean + 1e-2) & (mean <= q95 + 1e-2)).mean() > 0.99
    src = load_scan(nifti_src).array
    coarse = mean.reshape(1, 33, 2, 41, 2, 3).mean(axis=(2, 4))  # projection: block means are the input
    assert np.abs(coarse - src).max() < 1e-5 * np.ptp(src)
    samples = np.asarray(nib.load(folder / "samples.nii.gz").dataobj)
    np.testing.assert_allclose(samples.mean(-1), mean[0], atol=1e-5 * np.ptp(src))
    np.testing.assert_allclose(samples.std(-1, ddof=1), std[0], atol=1e-5 * np.ptp(src))


def test_report_json(nifti_run: tuple[Result, Path], ckpt: Path, nifti_src: Path) -> None:
    _, folder = nifti_run
    rep = report(folder)
    assert rep["model"]["sha256"] == file_sha256(ckpt) and len(rep["model"]["sha256"]) == 64
    assert rep["model"]["step"] == 7 and rep["model"]["degradation"] == "block:2x2"
    s = rep["sampling"]
    assert (s["steps"], s["samples"], s["seed"], s["sampler"]) == (2, 3, 5, "ddim")
    assert s["data_consistency_projection"] is True and s["slice_axis"] == 2 and s["window"] == [16, 16]
    assert s["self_ensemble"] == 3  # 3 samples on 3 turns of each slice (the default ensemble, at most 8)
    assert rep["input"] == {"source": str(nifti_src.resolve()), "format": "NIfTI", "modality": "",
                            "shape": [33, 41, 3], "spacing_mm": [2.0, 2.0, 2.0]}
    assert rep["output"] == {"shape": [66, 82, 3], "spacing_mm": [1.0, 1.0, 2.0], "scale": [2, 2, 1]}
    assert set(rep["timings_s"]) == {"prepare_s", "sampling_s", "total_s"}
    assert rep["timings_s"]["total_s"] > 0
    assert 0 < rep["score"]["mean_std_fraction_of_range"] < 1 and rep["score"]["body_voxels"] > 0
    assert rep["interval"] == {"low": 0.05, "high": 0.95, "method": "empirical"}
    dc = rep["data_consistency"]
    assert dc["relative_mean_abs_error"] < 1e-6 and dc["max_abs_error"] < 1e-5 * np.ptp(load_scan(nifti_src).array)
    assert rep["files"][-1] == "report.json" and "review.png" in rep["files"]


def test_review_png(nifti_run: tuple[Result, Path]) -> None:
    with Image.open(nifti_run[1] / "review.png") as img:
        assert img.format == "PNG" and img.width > 1000 and img.height > 300
        assert np.asarray(img.convert("L")).std() > 10  # not blank


def test_same_seed_same_files_different_seed_different(ckpt: Path, nifti_src: Path, tmp_path: Path) -> None:
    """The same real slices three times: twice with one seed, once with another."""
    runs = []
    for seed, out in (("1", "a"), ("1", "b"), ("2", "c")):
        res = enhance(str(nifti_src), "--model", str(ckpt), "--out", str(tmp_path / out),
                      "--samples", "2", "--seed", seed, *FAST)
        assert res.exit_code == 0, res.output
        runs.append(load_scan(tmp_path / out / "anatomical" / "mean.nii.gz").array)
    assert np.array_equal(runs[0], runs[1])
    assert np.abs(runs[0] - runs[2]).mean() > 1e-3 * np.ptp(load_scan(nifti_src).array)


# --- DICOM -------------------------------------------------------------------------------------------------------

def test_dicom_outputs_read_back_in_hu(dicom_run: tuple[Result, Path]) -> None:
    _, folder = dicom_run
    src = load_scan(resolve_ref(DICOM_REF))
    for name in [f"{k}.nii.gz" for k in STATS] + ["review.png", "report.json", "dicom_mean", "dicom_std"]:
        assert (folder / name).exists(), name
    spacing = np.array(src.spacing) / (2, 2, 1)
    affine = refined_affine(src.affine, (2, 2, 1))
    for key in ("mean", "std"):
        nifti = load_scan(folder / f"{key}.nii.gz")
        series = load_scan(folder / f"dicom_{key}")
        assert series.array.shape == nifti.array.shape == (1, 256, 256, 1)
        assert series.modality == ("CT" if key == "mean" else "OT")  # the std is a Parametric Map, not a CT
        np.testing.assert_allclose(series.spacing, spacing, rtol=1e-5)
        np.testing.assert_allclose(nifti.spacing, spacing, rtol=1e-5)
        np.testing.assert_allclose(series.affine, affine, atol=1e-3)
        files = sorted((folder / f"dicom_{key}").glob("*.dcm"))
        ds = pydicom.dcmread(files[0])
        slope = float(ds.get("RescaleSlope", 1.0))
        stored = ds.pixel_array.astype(np.float64) * slope + float(ds.get("RescaleIntercept", 0.0))
        np.testing.assert_allclose(series.array[0, ..., 0].T, stored, atol=1e-6 * max(1.0, abs(stored).max()))
        if key == "std":  # float frames with a real-world value mapping in HU: exact
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and "PixelData" not in ds
            np.testing.assert_array_equal(series.array, nifti.array)
        np.testing.assert_allclose(series.array, nifti.array, atol=slope / 2 + 1e-3)  # HU, within a rescale step
    mean = load_scan(folder / "mean.nii.gz").array
    assert abs(float(mean.mean()) - float(src.array.mean())) < 0.01  # HU: block means are the input's
    assert -1100 < np.percentile(mean, 1) and np.percentile(mean, 99) < 1300


def test_dicom_report_and_stdout_hold_no_patient_data(dicom_run: tuple[Result, Path]) -> None:
    res, folder = dicom_run
    ds = pydicom.dcmread(resolve_ref(DICOM_REF))
    secrets = [str(ds.PatientName), str(ds.PatientID), str(ds.PatientName).split("^")[0]]
    assert all(secrets)
    text = (folder / "report.json").read_text() + res.stdout + res.stderr
    for secret in secrets:
        assert secret not in text
    rep = report(folder)
    assert rep["input"]["format"] == "DICOM file" and rep["input"]["modality"] == "CT"
    assert rep["output"]["scale"] == [2, 2, 1] and rep["sampling"]["slice_axis"] == 2
    assert rep["data_consistency"]["mean_abs_error"] < 0.01  # HU
    assert "dicom_mean/" in rep["files"] and "dicom_std/" in rep["files"]


def test_no_projection_is_reported_honestly(dicom_run: tuple[Result, Path], ckpt: Path, tmp_path: Path) -> None:
    res = enhance(DICOM_REF, "--model", str(ckpt), "--out", str(tmp_path), "--samples", "1", "--format", "nifti",
                  "--no-projection", *FAST)  # one sample: its mean is that sample, which drifts
    assert res.exit_code == 0, res.output
    off = report(tmp_path / "CT_small")
    on = report(dicom_run[1])
    assert off["sampling"]["data_consistency_projection"] is False
    assert not (tmp_path / "CT_small" / "dicom_mean").exists()
    assert off["data_consistency"]["mean_abs_error"] > 1.0  # HU: the samples drift from the input
    assert off["data_consistency"]["mean_abs_error"] > 100 * max(on["data_consistency"]["mean_abs_error"], 1e-3)


# --- review slice ------------------------------------------------------------------------------------------------

def test_review_shows_the_slice_axis_used(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan whose X voxels are thickest is sliced across X; the review figure must show that plane (axis 0
    used to be mistaken for "no axis" and replaced by 2)."""
    from medsr.model import load_model

    src = anatomical()
    affine = src.affine @ np.diag([2.0, 1.0, 1.0, 1.0])
    scan = src.with_array(src.array[:, :, :, 10:14], affine)  # 4 mm x 2 mm x 2 mm, 33 x 41 x 4
    seen: dict[str, Any] = {}
    real = medsr.outputs.review_figure

    def spy(*args: Any, **kwargs: Any) -> Path:
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(medsr.outputs, "review_figure", spy)
    model = load_model(ckpt)
    options = EnhanceOptions(samples=1, steps=1)
    result = enhance_scan(scan, model, options)
    assert result.info["slice_axis"] == 0 and result.factors == (1, 2, 2)
    folder = write_outputs(scan, result, model, options, tmp_path, name="thick_x")
    assert seen["slice_axis"] == 0
    assert (folder / "review.png").is_file()


# --- errors ------------------------------------------------------------------------------------------------------

def test_without_model_the_default_is_needed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(medsr.runtime, "WEIGHTS_DIR", tmp_path / "weights")
    res = enhance(DICOM_REF, "--out", str(tmp_path / "out"), *FAST)
    assert res.exit_code == 2
    assert "shipped model 'default' is missing" in res.stderr and "--model" in res.stderr
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_unknown_model_name_is_a_clear_error(tmp_path: Path) -> None:
    res = enhance(DICOM_REF, "--out", str(tmp_path / "out"), "--model", "no_such_model", *FAST)
    assert res.exit_code == 2
    assert "no_such_model" in res.stderr and "Traceback" not in res.output


def test_without_model_the_shipped_default_is_used(tmp_path: Path) -> None:
    res = enhance(str(resolve_ref("pydicom:MR_small.dcm")), "--out", str(tmp_path), "--samples", "1", "--steps", "1",
                  "--device", "cpu", "--amp", "none")
    assert res.exit_code == 0, res.output
    rep = report(tmp_path / "MR_small")
    shipped = medsr.runtime.shipped_model_path()
    assert Path(rep["model"]["path"]).resolve() == shipped.resolve()
    assert rep["model"]["sha256"] == file_sha256(shipped)


def test_missing_input_names_the_file(ckpt: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "scan.nii.gz"
    res = enhance(str(missing), "--model", str(ckpt), "--out", str(tmp_path / "out"), *FAST)
    assert res.exit_code == 2
    assert str(missing) in res.stderr and "no such file" in res.stderr
    assert "Traceback" not in res.output


@pytest.mark.parametrize("kind", ["text", "foreign torch file", "missing"])
def test_a_model_that_is_not_a_checkpoint_is_refused_clearly(kind: str, tmp_path: Path) -> None:
    bad = tmp_path / "model.pt"
    if kind == "text":
        bad.write_text("this is not a checkpoint\n")
    elif kind == "foreign torch file":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, bad)
    res = enhance(DICOM_REF, "--model", str(bad), "--out", str(tmp_path / "out"), *FAST)
    assert res.exit_code == 2
    assert str(bad) in res.stderr
    expected = {"text": "not a readable medsr checkpoint", "foreign torch file": "not a medsr checkpoint",
                "missing": "checkpoint not found"}[kind]
    assert expected in res.stderr
    assert "Traceback" not in res.output


def test_a_checkpoint_for_another_network_is_refused_clearly(tmp_path: Path) -> None:
    from medsr.model import load_checkpoint, save_checkpoint

    path = write_tiny_checkpoint(tmp_path / "m.pt", tiny_config())
    ckpt = load_checkpoint(path)
    ckpt["config"]["model"]["channels"] = [8, 32]  # weights no longer fit the stored architecture
    save_checkpoint(path, {k: v for k, v in ckpt.items() if k != "format"})
    res = enhance(DICOM_REF, "--model", str(path), "--out", str(tmp_path / "out"), *FAST)
    assert res.exit_code == 2 and "weights do not match the model config" in res.stderr


def test_bad_format_is_refused(ckpt: Path, tmp_path: Path) -> None:
    res = enhance(DICOM_REF, "--model", str(ckpt), "--out", str(tmp_path), "--format", "png", *FAST)
    assert res.exit_code == 2 and "--format must be nifti, dicom or both" in res.stderr



def test_a_bad_self_ensemble_is_refused_before_any_scan_is_read(ckpt: Path, tmp_path: Path) -> None:
    res = enhance(DICOM_REF, "--model", str(ckpt), "--out", str(tmp_path), "--self-ensemble", "3", *FAST)
    assert res.exit_code == 2 and "self_ensemble must be 1, 2, 4 or 8, got 3" in res.stderr
    assert not any(tmp_path.iterdir())


def test_a_nearly_uniform_heat_map_says_so_in_its_caption() -> None:
    """The heat scale starts at the map's floor, so ±6.0-6.6 HU everywhere would fill the colour range: the caption
    must say the map is nearly uniform and give its range; a map with real structure keeps the plain title."""
    rng = np.random.default_rng(0)
    flat = 6.0 + 0.6 * rng.random((64, 64))
    caption = heat_caption(flat, "uncertainty", "(HU)")
    assert caption.startswith("uncertainty\nnearly uniform here: 6") and caption.endswith("(HU)")
    structured = flat.copy()
    structured[20:40, 20:40] += 20.0  # an uncertain region 4x the floor
    assert heat_caption(structured, "uncertainty", "(HU)") == "uncertainty"
    assert heat_caption(np.zeros((8, 8)), "uncertainty") == "uncertainty"  # nothing to say about an empty map
