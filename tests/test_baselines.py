"""Classical low-dose CT baselines on a real CT slice with simulated quarter-dose noise: tuning on the truth picks
an interior strength that beats the noisy input and every grid neighbour; clear errors; BM3D where installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio

from medsr.baselines import available_baselines, denoise, noise_sigma, tune_strength, tuned_baselines
from medsr.degrade import simulate_low_dose
from medsr.errors import MedsrError
from medsr.io.refs import load_ref


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    """pydicom's real CT slice (128 x 128 HU, 0.66 mm) and its simulated quarter-dose version."""
    torch.set_num_threads(1)
    scan = load_ref("pydicom:CT_small.dcm")
    hu = scan.array[0, :, :, 0].astype(np.float32)
    noisy = simulate_low_dose(torch.from_numpy(hu)[None], 0.25, torch.Generator().manual_seed(0),
                              float(np.mean(scan.spacing[:2])))[0].numpy()
    return noisy, hu


@pytest.mark.parametrize("name", ["nlm", "tv"])
def test_tuning_beats_the_noisy_input(pair: tuple[np.ndarray, np.ndarray], name: str) -> None:
    noisy, truth = pair
    base = peak_signal_noise_ratio(truth, noisy, data_range=2048.0)
    tuned = tune_strength(name, noisy, truth, data_range=2048.0)
    assert tuned.psnr > base + 1.0, (tuned.psnr, base)
    # the chosen strength is the best tried and not at either end of the grid (the grid brackets the optimum)
    assert tuned.psnr == max(tuned.tried.values())
    assert min(tuned.tried) < tuned.strength < max(tuned.tried)
    # the output is what denoise gives at that strength, and its PSNR is the reported one
    again = denoise(name, noisy, tuned.strength, tuned.sigma)
    np.testing.assert_array_equal(again, tuned.output)
    assert peak_signal_noise_ratio(truth, again.astype(np.float64), data_range=2048.0) == pytest.approx(tuned.psnr)
    # too strong a setting blurs the anatomy: worse than the input
    assert tuned.tried[max(tuned.tried)] < base


def test_noise_sigma_is_near_the_inserted_noise(pair: tuple[np.ndarray, np.ndarray]) -> None:
    noisy, truth = pair
    true_std = float((noisy - truth).std())
    assert 0.5 * true_std < noise_sigma(noisy) < 1.5 * true_std


def test_bad_requests_raise(pair: tuple[np.ndarray, np.ndarray]) -> None:
    noisy, truth = pair
    with pytest.raises(MedsrError, match="expected one of"):
        denoise("wiener", noisy, 1.0)
    with pytest.raises(MedsrError, match="2D slice"):
        denoise("tv", noisy[None], 1.0)
    with pytest.raises(MedsrError, match="differ in shape"):
        tune_strength("tv", noisy, truth[:64])


def test_available_baselines_lists_nlm_and_tv() -> None:
    names = available_baselines()
    assert names[:2] == ["nlm", "tv"]


@pytest.mark.slow
def test_bm3d_where_installed(pair: tuple[np.ndarray, np.ndarray]) -> None:
    pytest.importorskip("bm3d", reason="bm3d is optional (non-commercial licence): pip install bm3d")
    noisy, truth = pair
    res = tuned_baselines(noisy, truth, ["bm3d"], data_range=2048.0)["bm3d"]
    assert res.psnr > peak_signal_noise_ratio(truth, noisy, data_range=2048.0) + 1.0
