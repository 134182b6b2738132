"""medsr evaluate on real scans (nibabel's T1 volume, pydicom's CT slice) with a tiny random-weight model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from medsr.cli import app
from medsr.config import load_config
from medsr.degrade import block_average, kspace_truncate, parse_spec
from medsr.enhance import EnhanceOptions, choose_slice_axis, enhance_scan
from medsr.evaluate import degrade_scan
from medsr.io import coarse_affine, crop_to_factors, load_scan, refined_affine, save_nifti
from medsr.io.refs import resolve_ref
from medsr.model import checkpoint_payload, load_checkpoint, load_model, save_checkpoint, write_untrained_checkpoint
from medsr.outputs import _review_title, build_report
from medsr.uncertainty import Calibration, ModelCalibration, fit_spread_calibration, normalised_scores

VOLUME = "nibabel:anatomical.nii"  # real T1, 33x41x25, 2 mm isotropic
SLICE = "pydicom:CT_small.dcm"  # real CT slice, 128x128
CROP = (slice(None), slice(30, 94), slice(40, 104))  # 64x64 of it (spine and soft tissue), to keep the test short


def write_model(path: Path, degrade: str = "block:4x4") -> Path:
    """A tiny 2D checkpoint like medsr.train's; MONAI zero-initialises the output conv, so randomise it."""
    cfg = load_config(None, ["model.channels=[8,16]", "model.attention_levels=[false,false]",
                             "model.num_head_channels=8", "model.norm_num_groups=4", "data.patch_size=[32,32]",
                             "diffusion.prediction=v_prediction", f"degrade={degrade}"])
    return write_untrained_checkpoint(path, cfg, out_std=0.02, step=3)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="module")
def ct_crop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scan = load_scan(resolve_ref(SLICE))
    return save_nifti(scan.with_array(scan.array[CROP]), tmp_path_factory.mktemp("ct") / "CT_small.nii.gz")


@pytest.fixture(scope="module")
def run(model_path: Path, ct_crop: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("eval") / "out"
    result = CliRunner().invoke(app, ["evaluate", VOLUME, str(ct_crop), "--model", str(model_path),
                                      "--degrade", "block:4x4", "--samples", "3", "--steps", "2", "--out", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out, result.output


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_files_and_table(run: tuple[Path, str]) -> None:
    out, text = run
    for name in ("metrics.csv", "summary.json", "calibration.png", "error_vs_uncertainty.png",
                 "compare_anatomical.png", "compare_CT_small.png"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".tmp-*"))
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PSNR" in text and "SSIM" in text and "coverage of the model's 90% interval" in text
    for method in ("interpolation", "sample", "mean"):
        assert f"overall              {method}" in text
    rows = read_rows(out)
    assert [(r["scan"], r["method"]) for r in rows] == [(s, m) for s in ("anatomical", "CT_small")
                                                        for m in ("interpolation", "sample", "mean")]
    sampling = json.loads((out / "summary.json").read_text())["sampling"]
    assert (sampling["samples"], sampling["steps"], sampling["first_step_shared"]) == (3, 2, True)
    assert sampling["self_ensemble"] == 3  # 3 samples on 3 turns of the input (the default, at most 8)


def test_metrics_sane(run: tuple[Path, str]) -> None:
    out, _ = run
    summary = json.loads((out / "summary.json").read_text())
    for row in read_rows(out):
        for key in ("psnr", "psnr_body", "ssim", "ssim_body", "consistency_mae"):
            assert np.isfinite(float(row[key])), (row, key)
        if row["method"] != "interpolation":  # the projection makes every sample consistent with the input
            assert float(row["consistency_max"]) < 1e-4, row
        if row["method"] == "mean":
            for key in ("coverage_90", "coverage_90_body"):
                assert 0.0 <= float(row[key]) <= 1.0
            assert -1.0 <= float(row["spearman_std_error"]) <= 1.0
            assert int(row["patches"]) > 3
        else:
            assert row["coverage_90"] == ""
    cal = summary["calibration"]
    assert cal["nominal"] == 0.9 and 0.0 <= cal["coverage_90_body"] <= 1.0
    refit = summary["refit"]
    assert refit["in_sample"] and set(refit["per_modality"]) == {"CT", "MR"}  # anatomical.nii has no modality: MR
    assert all(f["n"] == 1 and f["guarantee"] == "none" and f["scale"] > 0 for f in refit["per_modality"].values())
    for row in read_rows(out):
        if row["method"] == "mean":  # quartiles of width hold a quarter of the body each: their mean is the total
            quarts = [float(row[f"coverage_q{i}"]) for i in range(1, 5)]
            assert np.mean(quarts) == pytest.approx(float(row["coverage_90_body"]), abs=0.01)
    vol = summary["scans"][0]
    axis = choose_slice_axis(load_scan(resolve_ref(VOLUME)))  # as enhance picks it for the high-quality scan
    assert vol["slice_axis"] == axis
    factors = [1 if a == axis else 4 for a in range(3)]
    assert vol["shape"] == [s - s % f for s, f in zip((33, 41, 25), factors)]
    assert vol["input_shape"] == [s // f for s, f in zip(vol["shape"], factors)]
    assert vol["truth_consistency_mae"] < 1e-6  # the degraded truth re-degrades to the input


def test_interpolation_psnr_matches_numpy(run: tuple[Path, str]) -> None:
    """Independent: CT window by hand, block mean by reshape, bicubic by torch, PSNR by numpy."""
    out, _ = run
    hu = load_scan(resolve_ref(SLICE)).array[CROP][0, :, :, 0].astype(np.float64)  # 64 x 64, divisible by 4
    truth = 2.0 * (hu + 1024.0) / 2048.0 - 1.0
    low = truth.reshape(16, 4, 16, 4).mean(axis=(1, 3))
    interp = F.interpolate(torch.tensor(low)[None, None], scale_factor=4, mode="bicubic", align_corners=False)[0, 0]
    mse = np.mean((interp.numpy() - truth) ** 2)
    body = truth > -0.8
    mse_body = np.mean((interp.numpy()[body] - truth[body]) ** 2)
    row = next(r for r in read_rows(out) if r["scan"] == "CT_small" and r["method"] == "interpolation")
    assert float(row["psnr"]) == pytest.approx(10 * np.log10(4.0 / mse), abs=1e-3)
    assert float(row["psnr_body"]) == pytest.approx(10 * np.log10(4.0 / mse_body), abs=1e-3)


@pytest.mark.parametrize("spec", ["block:4x4", "kspace:4x4", "block:4x4,sigma=1"])
def test_degraded_truth_redegrades_consistently(spec: str) -> None:
    scan = load_scan(resolve_ref(VOLUME))
    deg = degrade_scan(scan, spec, slice_axis=2)
    assert deg.factors == (4, 4, 1)
    assert deg.truth.spatial_shape == (32, 40, 25) and deg.low.spatial_shape == (8, 10, 25)
    np.testing.assert_allclose(refined_affine(deg.low.affine, deg.factors), deg.truth.affine, atol=1e-9)
    np.testing.assert_allclose(deg.norm.normalise(deg.low.array[0]), deg.low_norm, atol=1e-5)
    if "sigma" not in spec:
        op = kspace_truncate if spec.startswith("kspace") else block_average
        again = op(torch.from_numpy(deg.truth_norm).movedim(2, 0)[:, None], (4, 4))[:, 0].movedim(0, 2)
        np.testing.assert_allclose(again.numpy(), deg.low_norm, atol=1e-5)


def test_crop_and_coarse_affine_roundtrip() -> None:
    scan = load_scan(resolve_ref(VOLUME))
    cropped = crop_to_factors(scan, (5, 3, 4))  # 33 -> 30, 41 -> 39, 25 -> 24, centred
    assert cropped.spatial_shape == (30, 39, 24)
    np.testing.assert_array_equal(cropped.array, scan.array[:, 1:31, 1:40, 0:24])
    # a kept voxel sits where it sat in the original scan
    np.testing.assert_allclose(cropped.affine @ [2, 3, 4, 1], scan.affine @ [3, 4, 4, 1])
    coarse = coarse_affine(scan.affine, (2, 3, 4))
    np.testing.assert_allclose(refined_affine(coarse, (2, 3, 4)), scan.affine, atol=1e-12)


def test_single_factor_fitted_on_one_draw_covers_ninety_percent_of_another() -> None:
    """v0.1's pooled factor (kept for comparison): intervals half as wide as they should be need c = 2."""
    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        mean = rng.normal(size=n)
        return mean, mean + rng.normal(size=n)  # true spread 1

    half = 0.5 * 1.6448536
    mean, truth = draw(200_000)
    c = fit_spread_calibration(truth, mean, mean - half, mean + half)
    assert c == pytest.approx(2.0, rel=0.02)
    fresh_mean, fresh_truth = draw(200_000)
    fresh = normalised_scores(fresh_truth, fresh_mean, fresh_mean - c * half, fresh_mean + c * half)
    assert np.mean(fresh <= 1.0) == pytest.approx(0.9, abs=0.003)
    c2 = fit_spread_calibration([truth[:1000], truth[1000:]], [mean[:1000], mean[1000:]],
                                [mean[:1000] - half, mean[1000:] - half], [mean[:1000] + half, mean[1000:] + half],
                                mask=[np.ones(1000, bool), np.ones(len(mean) - 1000, bool)])
    assert c2 == pytest.approx(c)


def test_calibration_round_trips_through_the_checkpoint_and_reaches_report_json(model_path: Path,
                                                                                 tmp_path: Path) -> None:
    """A stored per-modality λ is what enhance applies (mean ± λ·std) and what report.json states."""
    ckpt = load_checkpoint(model_path)
    cal = ModelCalibration({"CT": Calibration(4.0, "std", n=2, scans=("bad_sequence", "eCT_Supplemental"),
                                              details={"samples": 3.0, "steps": 1.0, "self_ensemble": 3.0}),
                            "MR": Calibration(2.0, "std", n=2, scans=("MR2_UNCR", "inia19"))})
    path = save_checkpoint(tmp_path / "cal.pt", {**ckpt, "calibration": cal.to_checkpoint()})
    model = load_model(path)
    assert model.calibration == cal
    scan = load_scan(resolve_ref(SLICE))
    scan = scan.with_array(scan.array[:, 32:64, 32:64])
    opt = EnhanceOptions(samples=3, steps=1, device="cpu", keep_samples=True)
    result = enhance_scan(scan, model, opt)
    assert result.samples is not None
    raw_std = result.samples.std(0, ddof=1)
    np.testing.assert_allclose(result.q95.array[0] - result.mean.array[0], 4.0 * raw_std, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(result.std.array[0], 4.0 / 1.6448536 * raw_std, rtol=1e-4, atol=1e-2)
    rep = json.loads(json.dumps(build_report(scan, result, model, opt)))
    assert rep["model"]["calibration"]["per_modality"]["CT"]["scale"] == 4.0
    assert rep["calibration"]["applied"] == "CT" and rep["calibration"]["scans"] == ["bad_sequence", "eCT_Supplemental"]
    assert rep["calibration"]["n"] == 2 and rep["calibration"]["guarantee"] == "none"
    assert rep["interval"]["method"] == "normal"
    assert rep["calibration"]["mismatch"] == ""  # run at the settings λ was fitted at
    half = 0.5 * (result.q95.array[0] - result.q05.array[0])
    body = result.mean.array[0] > -1024.0 + 0.1 * 2048.0  # foreground_threshold -0.8 in the CT window
    assert rep["score"]["halfwidth_scan_units"] == pytest.approx(float(half[body].mean()), rel=1e-4)
    assert rep["score"]["value"] == pytest.approx(100 * float(half[body].mean()) / 2048.0, rel=1e-4)


def test_a_run_at_other_sampling_settings_than_the_calibration_says_so(model_path: Path, tmp_path: Path) -> None:
    """λ is fitted at one samples x steps; another setting's coverage is unmeasured: report.json, figure title."""
    cal = Calibration(4.0, "std", n=2, details={"samples": 3.0, "steps": 1.0})
    assert cal.mismatch(3, 1) == "" and Calibration(4.0, "std").mismatch(5, 9) == ""  # nothing recorded: silent
    assert "3 samples x 1 DDIM steps" in cal.mismatch(3, 2) and "3 samples x 2 DDIM steps" in cal.mismatch(3, 2)
    assert "4 samples" in cal.mismatch(4, 1) and "DDPM" in cal.mismatch(3, 1, "ddpm")
    shared = Calibration(4.0, "std", details={"samples": 8.0, "steps": 2.0, "shared_first_step": 1.0})
    assert shared.mismatch(8, 2, shared_first_step=True) == ""
    assert "8 samples x 2 DDIM steps, first step shared;" in shared.mismatch(8, 2)
    path = save_checkpoint(tmp_path / "cal.pt", {**load_checkpoint(model_path),
                                                 "calibration": ModelCalibration({"CT": cal}).to_checkpoint()})
    model = load_model(path)
    scan = load_scan(resolve_ref(SLICE))
    scan = scan.with_array(scan.array[:, 32:64, 32:64])
    opt = EnhanceOptions(samples=2, steps=1, device="cpu")
    result = enhance_scan(scan, model, opt)
    rep = build_report(scan, result, model, opt)
    said = cal.mismatch(2, 1, turns=2)  # 2 samples: on 2 turns of the input (the default self-ensemble)
    assert rep["calibration"]["mismatch"] == said != "" and "self-ensemble of 2 turns" in said
    assert said in _review_title(result, opt)


def test_v01_checkpoint_with_a_float_calibration_still_loads_and_runs(model_path: Path, tmp_path: Path) -> None:
    """v0.1 stored one float (5.27) that scales the empirical 5-95% interval and the std about the mean."""
    ckpt = load_checkpoint(model_path)
    path = save_checkpoint(tmp_path / "v01.pt", {**ckpt, "calibration": 5.27})
    model = load_model(path)
    assert model.calibration.legacy and model.calibration.to_checkpoint() == 5.27
    scan = load_scan(resolve_ref(SLICE))
    scan = scan.with_array(scan.array[:, 32:64, 32:64])
    opt = EnhanceOptions(samples=4, steps=1, device="cpu", keep_samples=True)
    result = enhance_scan(scan, model, opt)
    assert result.samples is not None and result.interval_method == "empirical"
    mean = result.mean.array[0]
    q = torch.quantile(torch.from_numpy(result.samples), torch.tensor([0.05, 0.95]), dim=0).numpy()
    np.testing.assert_allclose(result.q05.array[0], mean + 5.27 * (q[0] - mean), rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(result.std.array[0], 5.27 * result.samples.std(0, ddof=1), rtol=1e-4, atol=1e-2)
    assert build_report(scan, result, model, opt)["model"]["calibration"]["legacy_single_factor"] is True
    payload = checkpoint_payload(model.config, ckpt["ema"], calibration=model.calibration)
    assert payload["calibration"] == 5.27


@pytest.mark.parametrize("spec, message", [("block:3x3", "factors"), ("blurry:4x4", "kind must be one of"),
                                           ("block:4", "need 2 or 3"), ("block4x4", "expected KIND")])
def test_wrong_spec_is_a_clear_error(model_path: Path, tmp_path: Path, spec: str, message: str) -> None:
    result = CliRunner().invoke(app, ["evaluate", SLICE, "--model", str(model_path), "--degrade", spec,
                                      "--samples", "2", "--steps", "1", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "medsr: error:" in result.output and message in result.output
    assert not (tmp_path / "o").exists()


def test_spec_kind_may_differ_from_training(model_path: Path) -> None:
    """A block-trained model can be evaluated on k-space input of the same factors (robustness check)."""
    from medsr.enhance import EnhanceOptions
    from medsr.evaluate import evaluate_scans
    from medsr.model import load_model

    scan = load_scan(resolve_ref(SLICE))
    scan = scan.with_array(scan.array[:, 32:96, 32:96])
    ev = evaluate_scans([scan], load_model(model_path), parse_spec("kspace:4x4"),
                        EnhanceOptions(samples=2, steps=1, device="cpu"))
    assert ev.summary["degradation"] == "kspace:4x4"
    assert ev.summary["scans"][0]["truth_consistency_mae"] < 1e-5
    assert len(ev.rows) == 3 and all(np.isfinite(r["psnr"]) for r in ev.rows)


def test_refit_uses_the_noise_floor_when_the_model_is_calibrated_with_it(model_path: Path) -> None:
    """A std_noise model's λ refit scores include the truth's noise floor: same samples, smaller λ than with std."""
    from dataclasses import replace

    from medsr.enhance import EnhanceOptions
    from medsr.evaluate import evaluate_scans
    from medsr.model import load_model

    scan = load_scan(resolve_ref(SLICE))
    scan = scan.with_array(scan.array[:, 32:96, 32:96])
    model = load_model(model_path)
    lam = {}
    for basis in ("std", "std_noise"):
        m = replace(model, calibration=ModelCalibration({"CT": Calibration(1.0, basis)}))
        ev = evaluate_scans([scan], m, "block:4x4", EnhanceOptions(samples=2, steps=1, device="cpu", seed=3))
        fit = ev.summary["refit"]["per_modality"]["CT"]
        assert fit["basis"] == [basis]
        lam[basis] = fit["scale"]
    assert lam["std_noise"] < lam["std"]
