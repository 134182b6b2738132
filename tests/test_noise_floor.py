"""The truth's noise floor (medsr.noise_floor) and the "std_noise" interval basis that uses it (issue 12)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from medsr.config import SamplingConfig
from medsr.degrade import parse_spec
from medsr.enhance import enhance_scan
from medsr.errors import MedsrError
from medsr.intensity import fit_normaliser
from medsr.noise_floor import estimate_noise_sigma, fine_noise_sigma
from medsr.uncertainty import Calibration, ModelCalibration, calibrate_scale, interval, normalised_scores
from tests.enhance_fixtures import anatomical, tiny_model


def _smooth(n: int, rng: np.random.Generator) -> torch.Tensor:
    """A smooth "anatomy": a linear ramp plus broad Gaussian blobs (little Laplacian response of its own)."""
    yy, xx = np.mgrid[0:n, 0:n] / n
    img = 0.3 * xx - 0.2 * yy
    for _ in range(4):
        cy, cx, w = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.3)
        img += 0.4 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * w**2))
    return torch.from_numpy(img).float()


def test_immerkaer_estimate_recovers_white_noise_and_ignores_linear_structure() -> None:
    rng = np.random.default_rng(0)
    ramp = torch.from_numpy(np.add.outer(np.arange(64.0), 2 * np.arange(64.0))).float()
    assert float(estimate_noise_sigma(ramp)) == pytest.approx(0.0, abs=1e-4)  # the mask cancels planes exactly
    for sigma in (0.01, 0.05, 0.2):
        img = _smooth(128, rng) + sigma * torch.from_numpy(rng.normal(size=(128, 128))).float()
        assert float(estimate_noise_sigma(img)) == pytest.approx(sigma, rel=0.1)
    batch = torch.stack([_smooth(64, rng) + s * torch.randn(64, 64) for s in (0.02, 0.1)])
    est = estimate_noise_sigma(batch[:, None])
    assert est.shape == (2, 1) and est[0, 0] < est[1, 0]
    assert float(estimate_noise_sigma(torch.ones(2, 2))) == 0.0  # too small to say anything


@pytest.mark.parametrize("degrade", ["block:4x4", "kspace:2x2"])
def test_fine_noise_is_the_input_noise_times_the_operators_gain(degrade: str) -> None:
    """White noise σ on the fine grid, degraded with the model's operator: the estimate from the coarse input
    is σ again (block 4x4 divides the std by 4, the gain multiplies it back)."""
    spec = parse_spec(degrade)
    rng = np.random.default_rng(1)
    sigmas = (0.03, 0.12)
    fine = torch.stack([_smooth(256, rng) + s * torch.from_numpy(rng.normal(size=(256, 256))).float()
                        for s in sigmas])[:, None]
    est = fine_noise_sigma(spec.forward(fine), spec)
    assert est.shape == (2,)
    np.testing.assert_allclose(est.numpy(), sigmas, rtol=0.15)


def test_operators_whose_input_says_nothing_simple_about_the_truths_noise_are_refused() -> None:
    for text in ("block:4x4,sigma=1", "lowdose:1x1,dose=0.25", "kspace:2x2,noise=0.01", "block:1x4,profile=gaussian"):
        spec = parse_spec(text)
        assert spec.white_noise_gain is None
        with pytest.raises(MedsrError, match="noise of its truth"):
            fine_noise_sigma(torch.zeros(1, 1, 8, 8), spec)
    assert parse_spec("block:1x4").white_noise_gain == pytest.approx(2.0)


def test_std_noise_interval_adds_the_floor_in_quadrature() -> None:
    mean, std = torch.zeros(3, 4), torch.full((3, 4), 0.3)
    cal = Calibration(2.0, "std_noise")
    lo, hi, method = interval(mean, std, None, calibration=cal, noise_sigma=torch.tensor([0.4, 0.0, 0.0])[:, None])
    assert method == "normal"
    np.testing.assert_allclose(hi[0].numpy(), 2.0 * 0.5)  # sqrt(0.3² + 0.4²) = 0.5
    np.testing.assert_allclose(hi[1].numpy(), 2.0 * 0.3)
    np.testing.assert_allclose(lo.numpy(), -hi.numpy())
    with pytest.raises(ValueError, match="noise_sigma"):
        interval(mean, std, None, calibration=cal)
    assert cal.std_factor == Calibration(2.0, "std").std_factor  # the std output stays the model's part


def test_one_lambda_covers_scans_of_different_noise_only_with_the_floor() -> None:
    """Scans whose truths carry different white noise, a model whose std is honest about its own error but
    ignores that noise: one λ
    fitted on some scans covers fresh scans evenly with basis std_noise, unevenly with basis std."""
    rng = np.random.default_rng(2)
    spec = parse_spec("block:4x4")

    def scan(noise: float) -> dict[str, np.ndarray]:
        smooth = _smooth(128, rng)
        truth = smooth + noise * torch.from_numpy(rng.normal(size=(128, 128))).float()
        low = spec.forward(truth[None, None])
        mean = smooth + 0.01 * torch.from_numpy(rng.normal(size=(128, 128))).float()  # its std is honest: 0.01
        return {"truth": truth.numpy(), "mean": mean.numpy(), "std": np.full((128, 128), 0.01, np.float32),
                "noise": float(fine_noise_sigma(low, spec)[0])}

    def scores(s: dict[str, np.ndarray], basis: str) -> np.ndarray:
        spread = np.sqrt(s["std"] ** 2 + s["noise"] ** 2) if basis == "std_noise" else s["std"]
        return normalised_scores(s["truth"], s["mean"], s["mean"] - spread, s["mean"] + spread).ravel()

    calib = [scan(n) for n in rng.uniform(0.01, 0.1, 12)]
    fresh = [scan(n) for n in (0.01, 0.03, 0.1)]
    for basis, even in (("std_noise", True), ("std", False)):
        lam = calibrate_scale([scores(s, basis) for s in calib]).empirical
        cover = [float(np.mean(scores(s, basis) <= lam)) for s in fresh]
        if even:
            assert all(0.85 <= c <= 0.95 for c in cover), cover
        else:
            assert max(cover) - min(cover) > 0.3, cover  # noisy scans under-covered, clean ones over-covered


def test_enhance_with_std_noise_calibration_widens_by_the_inputs_noise(tmp_path: Path) -> None:
    """End to end on a real MR volume: the interval's half-width is at least λ times the noise floor estimated
    from each input slice, the std map is the model's part alone, and the report names the basis."""
    model = tiny_model(tmp_path / "m.pt")
    scan = anatomical()
    scan = scan.with_array(scan.array[:, :16, :16, 10:12].copy(), scan.affine)
    opt = SamplingConfig(samples=2, steps=2, seed=0, device="cpu", slice_axis=2)
    plain = enhance_scan(scan, replace(model, calibration=ModelCalibration({"*": Calibration(2.0, "std")})), opt)
    floor = enhance_scan(scan, replace(model, calibration=ModelCalibration({"*": Calibration(2.0, "std_noise")})),
                         opt)
    np.testing.assert_allclose(floor.mean.array, plain.mean.array)
    np.testing.assert_allclose(floor.std.array, plain.std.array)
    assert floor.info["calibration"]["basis"] == "std_noise"
    norm = fit_normaliser(scan.array, scan.modality, model.config.intensity)
    low = torch.from_numpy(norm.normalise(scan.array[0])).movedim(2, 0)[:, None]
    sigma = fine_noise_sigma(low, model.degradation).numpy() * 0.5 * (norm.hi - norm.lo)  # scan units per slice
    half = 0.5 * (floor.q95.array[0] - floor.q05.array[0])
    for z in range(2):
        assert float(sigma[z]) > 0
        assert half[..., z].min() >= 2.0 * sigma[z] * (1 - 1e-4)
    assert floor.score.value > plain.score.value
