"""Streaming statistics equal batch ones; intervals (empirical and normal); coverage; the per-scan score."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import ndtr

from medsr.uncertainty import (
    NORMAL_Z,
    Calibration,
    ModelCalibration,
    RunningStats,
    calibrate_scale,
    coverage,
    coverage_by_quartile,
    interval,
    normalised_scores,
    spearman,
    uncertainty_score,
)


@pytest.mark.parametrize("sizes", [[1, 1, 1, 1, 1, 1, 1], [7], [3, 4], [1, 5, 1], [2, 2, 3]])
def test_running_stats_match_batch_statistics(sizes: list[int]) -> None:
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(sum(sizes), 5, 6, generator=gen, dtype=torch.float64) * 3.0 + 100.0  # large offset
    stats = RunningStats()
    start = 0
    for n in sizes:
        stats.update(data[start:start + n])
        start += n
    assert stats.count == data.shape[0]
    torch.testing.assert_close(stats.mean, data.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.std(), data.std(0, correction=1), rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.std(ddof=0), data.std(0, correction=0), rtol=0, atol=1e-12)


def test_running_stats_float32_groups_are_accumulated_in_float64() -> None:
    data = torch.randn(9, 64, generator=torch.Generator().manual_seed(1)) + 1000.0
    stats = RunningStats()
    for chunk in data.split(2):
        stats.update(chunk)
    expected = data.double()
    torch.testing.assert_close(stats.mean, expected.mean(0), rtol=0, atol=1e-9)
    torch.testing.assert_close(stats.std(), expected.std(0), rtol=0, atol=1e-9)


def test_running_stats_edge_cases() -> None:
    stats = RunningStats()
    with pytest.raises(ValueError):
        stats.std()
    stats.update(torch.ones(1, 3))
    assert torch.equal(stats.std(), torch.zeros(3, dtype=torch.float64))  # one sample: no spread, not NaN


def test_interval_empirical_matches_closed_form_quantiles() -> None:
    """Exponential(1) samples: the 5% and 95% quantiles are -ln(0.95) and -ln(0.05), exactly."""
    gen = torch.Generator().manual_seed(2)
    samples = torch.empty(20_000, 3).exponential_(1.0, generator=gen)
    lo, hi, method = interval(samples.mean(0), samples.std(0), samples)
    assert method == "empirical"
    torch.testing.assert_close(lo, torch.full((3,), -math.log(0.95)), atol=0.004, rtol=0)
    torch.testing.assert_close(hi, torch.full((3,), -math.log(0.05)), atol=0.06, rtol=0)
    # a std-basis calibration draws mean ± λ·std, whatever the samples are
    cal = Calibration(2.5, "std")
    mean, std = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.2])
    lo2, hi2, method2 = interval(mean, std, samples[:, :2], calibration=cal)
    assert method2 == "normal"
    torch.testing.assert_close(hi2, torch.tensor([2.5, 1.5]))
    torch.testing.assert_close(lo2, torch.tensor([-2.5, 0.5]))


def test_interval_normal_fallback_and_calibration() -> None:
    mean = torch.tensor([0.0, 1.0, -2.0])
    std = torch.tensor([1.0, 0.5, 0.0])
    for samples in (None, torch.zeros(1, 3)):  # no samples kept, or too few for quantiles
        lo, hi, method = interval(mean, std, samples)
        assert method == "normal"
        torch.testing.assert_close(lo, mean - NORMAL_Z * std)
        torch.testing.assert_close(hi, mean + NORMAL_Z * std)
    lo2, hi2, _ = interval(mean, std, None, calibration=2.0)
    torch.testing.assert_close(hi2 - mean, 2.0 * (hi - mean))
    torch.testing.assert_close(mean - lo2, 2.0 * (mean - lo))
    assert NORMAL_Z == pytest.approx(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.95)).item(), abs=1e-6)


def test_empirical_interval_of_normal_samples_approaches_normal_interval() -> None:
    samples = torch.randn(4000, 50, generator=torch.Generator().manual_seed(3)) * 2.0 + 5.0
    mean, std = samples.mean(0), samples.std(0)
    lo_e, hi_e, _ = interval(mean, std, samples)
    lo_n, hi_n, _ = interval(mean, std, None)
    assert float((lo_e - lo_n).abs().mean()) < 0.05
    assert float((hi_e - hi_n).abs().mean()) < 0.05


def test_coverage_of_a_calibrated_gaussian_interval_is_ninety_percent() -> None:
    rng = np.random.default_rng(4)
    mean = rng.normal(size=200_000)
    sigma = rng.uniform(0.1, 2.0, size=mean.shape)
    truth = mean + sigma * rng.normal(size=mean.shape)
    cov = coverage(truth, mean - NORMAL_Z * sigma, mean + NORMAL_Z * sigma)
    assert cov == pytest.approx(0.90, abs=0.004)
    assert coverage(truth, mean - 0.5 * NORMAL_Z * sigma, mean + 0.5 * NORMAL_Z * sigma) < 0.65  # too narrow
    mask = np.zeros(mean.shape, bool)
    mask[:10] = True
    inside = (truth[:10] >= mean[:10] - NORMAL_Z * sigma[:10]) & (truth[:10] <= mean[:10] + NORMAL_Z * sigma[:10])
    assert coverage(truth, mean - NORMAL_Z * sigma, mean + NORMAL_Z * sigma, mask) == pytest.approx(inside.mean())


def test_coverage_exact_small_case() -> None:
    truth = np.array([0.0, 1.0, 2.0, 3.0])
    assert coverage(truth, np.full(4, 0.5), np.full(4, 2.0)) == 0.5  # 1 and 2 inside (bounds inclusive)


def test_uncertainty_score_is_the_mean_calibrated_halfwidth() -> None:
    half = np.full((4, 4), 0.02)  # normalised units: range 2, so 1% of range
    half[0, 0] = 0.1  # 5% of range
    body = np.zeros((4, 4), bool)
    body[:2] = True
    score = uncertainty_score(half, half / NORMAL_Z, body, half_range=1024.0)  # CT window: 1 unit = 1024 HU
    assert score.body_voxels == 8
    assert score.value == score.halfwidth_pct == pytest.approx(100 * (7 * 0.01 + 0.05) / 8)
    assert score.halfwidth == pytest.approx(1024.0 * (7 * 0.02 + 0.1) / 8)
    empty = uncertainty_score(half, half, np.zeros((4, 4), bool), 1.0)  # no body: the whole image counts
    assert empty.body_voxels == 16


# --- calibration ------------------------------------------------------------------------------------------------

def _norm_cdf(x: np.ndarray) -> np.ndarray:
    return ndtr(np.asarray(x))


def _draw_images(rng: np.random.Generator, n: int, k: float, voxels: int = 500) -> list[np.ndarray]:
    """Normalised scores |y - mean| / std of n images whose std is k times too small (image-level scale u)."""
    u = rng.lognormal(0.0, 0.3, size=n)
    return [np.abs(rng.normal(size=voxels)) * u_i * k for u_i in u]


U_GRID = np.random.default_rng(123).lognormal(0.0, 0.3, size=20_000)


def _true_risk(scale: float, k: float) -> float:
    """Expected miscoverage of a fresh image, in closed form given u: P(|N(0,1)| u k > λ) = 2 (1 - Φ(λ / uk))."""
    return float(np.mean(2.0 * (1.0 - _norm_cdf(scale / (U_GRID * k)))))


def test_calibration_guarantees_hold_on_fresh_draws() -> None:
    """Calibrate on one draw of n images, measure the true risk of the fitted λ (closed form), repeat 200 times.

    RCPS promises P(risk > α) <= δ; CRC promises E[risk] <= α; the plain empirical fit promises nothing and
    exceeds α about half the time.
    """
    rng = np.random.default_rng(0)
    alpha, delta, k = 0.1, 0.1, 3.0
    risks: dict[str, list[float]] = {"rcps": [], "crc": [], "empirical": []}
    for _ in range(200):
        fit = calibrate_scale(_draw_images(rng, 40, k), alpha, delta)
        assert fit.n == 40 and math.isfinite(fit.rcps) and fit.choose() == (fit.rcps, "rcps")
        assert fit.empirical <= fit.crc <= fit.rcps
        for rule in risks:
            risks[rule].append(_true_risk(getattr(fit, rule), k))
    violations = np.mean(np.asarray(risks["rcps"]) > alpha)
    assert violations <= delta  # observed 0.0
    assert np.mean(risks["crc"]) <= alpha  # observed 0.078 (the empirical fit: 0.1005)
    assert np.mean(np.asarray(risks["empirical"]) > alpha) > 0.3  # no guarantee: the test can see the difference
    assert np.mean(risks["rcps"]) > 0.005  # and RCPS is not vacuous (λ = ∞ would pass the first check)


@pytest.mark.parametrize("k, wider", [(3.0, True), (0.3, False)])
def test_too_narrow_spread_is_widened_and_too_wide_narrowed(k: float, wider: bool) -> None:
    """λ multiplies std; an honest std needs λ = z = 1.645. std k times too small needs λ ≈ k·z."""
    fit = calibrate_scale(_draw_images(np.random.default_rng(1), 200, k, 2000))
    assert (fit.empirical > NORMAL_Z) == wider
    assert fit.empirical == pytest.approx(k * NORMAL_Z, rel=0.12)
    assert _true_risk(fit.empirical, k) == pytest.approx(0.1, abs=0.02)


def test_small_n_has_no_guarantee_and_says_how_many_scans_are_needed() -> None:
    fit = calibrate_scale(_draw_images(np.random.default_rng(2), 3, 2.0))
    assert math.isinf(fit.crc) and math.isinf(fit.rcps)
    assert fit.choose() == (fit.empirical, "none") and math.isfinite(fit.empirical)
    assert (fit.crc_min_n, fit.rcps_min_n) == (9, 22)
    assert fit.hoeffding_slack == pytest.approx(math.sqrt(math.log(10) / 6))
    assert math.isfinite(calibrate_scale(_draw_images(np.random.default_rng(2), 9, 2.0)).crc)
    assert math.isinf(calibrate_scale(_draw_images(np.random.default_rng(2), 21, 2.0)).rcps)
    assert math.isfinite(calibrate_scale(_draw_images(np.random.default_rng(2), 22, 2.0)).rcps)


def test_normalised_scores_are_the_needed_scale() -> None:
    truth = np.array([0.0, 2.0, -3.0, 1.0, 5.0])
    mean = np.array([0.0, 0.0, 0.0, 0.0, 5.0])
    lo, hi = mean - np.array([1, 1, 2, 0, 0]), mean + np.array([1, 4, 1, 0, 0])
    np.testing.assert_allclose(normalised_scores(truth, mean, lo, hi), [0.0, 0.5, 1.5, np.inf, 0.0])


def test_calibration_checkpoint_values_round_trip_and_v01_float_reads_as_legacy() -> None:
    cal = ModelCalibration({"CT": Calibration(3.1, "std", 0.1, 0.1, "none", 2, ("a", "b"), {"crc": math.inf}),
                            "MR": Calibration(2.2, "std", n=3)})
    back = ModelCalibration.from_checkpoint(cal.to_checkpoint())
    assert back == cal
    assert back.for_modality("CT")[0].scale == 3.1 and back.for_modality("mr")[0].scale == 2.2
    assert back.for_modality("")[1] == "MR"  # NIfTI without modality: percentile-normalised like MR
    old = ModelCalibration.from_checkpoint(5.27)
    assert old.legacy and old.to_checkpoint() == 5.27
    c, key = old.for_modality("CT")
    assert (c.scale, c.basis, c.std_factor, key) == (5.27, "quantile", 5.27, "*")
    assert ModelCalibration.from_checkpoint(1.0).for_modality("CT") == (Calibration(), "")
    with pytest.raises(Exception, match="unknown layout"):
        ModelCalibration.from_checkpoint("five")


def test_coverage_by_width_quartile_sees_uneven_coverage() -> None:
    """Heteroscedastic truth: an interval of the right per-voxel width covers 90% in every width quartile; a
    constant-width interval covers too much where errors are small and too little where they are large."""
    rng = np.random.default_rng(5)
    sigma = rng.uniform(0.1, 2.0, size=100_000)
    truth = sigma * rng.normal(size=sigma.shape)
    good = coverage_by_quartile(truth, -NORMAL_Z * sigma, NORMAL_Z * sigma)
    assert np.allclose(good, 0.9, atol=0.01)
    flat_half = NORMAL_Z * sigma.mean() + 1e-6 * sigma  # tiny tie-break so quartiles follow sigma
    flat = coverage_by_quartile(truth, -flat_half, flat_half)
    assert flat[0] > 0.99 and flat[-1] < 0.75


def test_spearman_matches_definition() -> None:
    a = np.array([1.0, 2.0, 2.0, 4.0, 5.0])
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    ranks_a, ranks_b = np.array([1, 2.5, 2.5, 4, 5]), np.array([2, 1, 4, 3, 5])
    assert spearman(a, np.array([2.0, 1.0, 4.0, 3.0, 5.0])) == pytest.approx(np.corrcoef(ranks_a, ranks_b)[0, 1])
    assert math.isnan(spearman(np.ones(5), a))
