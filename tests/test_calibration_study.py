"""The calibration study's spread diagnostics (pipelines.calibrate_default_model) on data with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.calibrate_default_model import spread_diagnostics


def _data(truth_spread: float, sample_spread: float, seed: int = 0) -> dict[str, np.ndarray]:
    """A 128² slice whose 8x8 patches have spreads from 0.01 to 0.2; truth and 8 samples drawn about one mean."""
    rng = np.random.default_rng(seed)
    sigma = np.kron(rng.uniform(0.01, 0.2, (16, 16)), np.ones((8, 8)))[..., None]
    centre = rng.uniform(-0.5, 0.5, (128, 128, 1))
    truth = centre + truth_spread * sigma * rng.normal(size=sigma.shape)
    samples = centre + sample_spread * sigma * rng.normal(size=(8, *sigma.shape))
    return {"truth": truth.astype(np.float32), "samples": samples.astype(np.float32)}


def test_samples_exchangeable_with_the_truth_reach_their_own_ceiling() -> None:
    d = spread_diagnostics("x", _data(1.0, 1.0), -0.8)
    assert d["patches"] == 256
    assert d["spearman_patch"] > 0.8 and d["spearman_if_calibrated"] > 0.8
    assert abs(d["spearman_patch"] - d["spearman_if_calibrated"]) < 0.1
    assert d["rmse_over_std"] == pytest.approx(np.sqrt(1 + 1 / 8), rel=0.1)


def test_a_too_narrow_spread_shows_in_the_error_ratio_not_in_the_ceiling() -> None:
    """Samples 4x too narrow: the ranking is still right (same pattern), the error is 4x the spread."""
    narrow = spread_diagnostics("x", _data(1.0, 0.25), -0.8)
    assert narrow["rmse_over_std"] == pytest.approx(4.0, rel=0.15)
    assert narrow["spearman_if_calibrated"] > 0.8


def test_a_spread_unrelated_to_the_error_ranks_nothing() -> None:
    data = _data(1.0, 1.0)
    rng = np.random.default_rng(5)
    data["truth"] = data["samples"].mean(0) + 0.1 * rng.normal(size=data["truth"].shape).astype(np.float32)
    d = spread_diagnostics("x", data, -0.8)
    assert abs(d["spearman_patch"]) < 0.2 and d["spearman_if_calibrated"] > 0.8
