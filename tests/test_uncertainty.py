"""Streaming statistics equal batch ones; intervals (empirical and normal); coverage; the per-scan score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsr.uncertainty import NORMAL_Z, RunningStats, coverage, interval, uncertainty_score


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


def test_interval_empirical_is_torch_quantile() -> None:
    samples = torch.randn(16, 4, 5, generator=torch.Generator().manual_seed(2))
    mean, std = samples.mean(0), samples.std(0)
    lo, hi, method = interval(mean, std, samples)
    assert method == "empirical"
    torch.testing.assert_close(lo, torch.quantile(samples, 0.05, dim=0))
    torch.testing.assert_close(hi, torch.quantile(samples, 0.95, dim=0))
    assert bool((lo <= hi).all())


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


def test_uncertainty_score_in_fractions_of_range() -> None:
    std = np.full((4, 4), 0.02)  # normalised units: range 2, so 1% of range
    std[0, 0] = 0.1  # 5% of range, above the 2% threshold
    body = np.zeros((4, 4), bool)
    body[:2] = True
    score = uncertainty_score(std, body)
    assert score.body_voxels == 8
    assert score.mean_std == pytest.approx((7 * 0.01 + 0.05) / 8)
    assert score.high_fraction == pytest.approx(1 / 8)
    empty = uncertainty_score(std, np.zeros((4, 4), bool))  # no body: the whole image counts
    assert empty.body_voxels == 16
