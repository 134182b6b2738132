"""The lowdose_ct card's per-slice scoring and verdicts (pipelines.lowdose_card) on a real CT slice with made
posteriors whose quality is known: a posterior centred on the truth beats the tuned classical denoisers and the
card says the PSNR target is met; a 'model' that returns its noisy input does not, and the card says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from enhance_fixtures import ct_small, tiny_model

import pipelines.calibrate_default_model as calib
from medsr.config import SamplingConfig as EnhanceOptions
from medsr.degrade import low_dose_noise_hu
from medsr.uncertainty import Calibration
from pipelines.lowdose_card import card_text, slice_rows


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def _data(samples_around: str) -> dict[str, np.ndarray]:
    scan = ct_small()
    hu = scan.array[0, :, :, 0].astype(np.float64)
    noise = low_dose_noise_hu(torch.from_numpy(hu)[None], 0.25, torch.Generator().manual_seed(0), 0.661)[0].numpy()
    truth, low = hu / 1024.0, (hu + noise) / 1024.0  # the default CT window -1024..1024
    centre = truth if samples_around == "truth" else low
    rng = np.random.default_rng(0)
    samples = centre[None] + rng.normal(0, 0.01, (8, *truth.shape))
    return {"truth": truth[..., None].astype(np.float32), "low": low[..., None].astype(np.float32),
            "samples": samples[..., None].astype(np.float32), "range": np.asarray([2048.0])}


@pytest.mark.parametrize("centre", ["truth", "noisy"])
def test_rows_and_verdicts(centre: str, tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "m.pt", "lowdose:1x1,dose=0.25")
    data = _data(centre)
    stats = calib.scan_stats("CT_small", "CT", data, -0.8, model.degradation, EnhanceOptions())
    cal = Calibration(1.645, "std")
    rows = slice_rows("CT_small", data, stats, cal, model, 0.661)
    assert len(rows) == 1
    r = rows[0]
    assert {"mean", "noisy", "nlm", "tv"} <= set(r)
    assert r["nlm"]["psnr"] > r["noisy"]["psnr"] and r["tv"]["psnr"] > r["noisy"]["psnr"]
    lo, hi = stats.bounds(cal)
    expected = ((data["truth"] >= lo) & (data["truth"] <= hi))[stats.body].mean()
    assert r["coverage"] == pytest.approx(expected)
    assert r["edge_points"] > 0 and r["patches"] > 0
    assert r["truth_levels"] > 500 and r["truth_equal_neighbours"] < 0.2  # a real acquisition, not a phantom
    assert 0 < r["mean"]["edge_error_share"] < 1 and r["mean"]["sq_error"] > 0
    result = {"checkpoint": "X.pt", "date": "today", "step": 7, "sha256": "0" * 64, "channels": [8, 16], "crop": 128,
              "samples": 8, "steps": 2, "scans": ["CT_small"], "methods": ["mean", "noisy", "nlm", "tv"],
              "simulator": {"mu_water": 0.0192, "n_views": 256, "i0": 1e5, "ref_views": 720, "electronic_std": 3.0},
              "calibration": {"scale": 1.6, "guarantee": "none", "n": 3, "alpha": 0.1, "delta": 0.1,
                              "scans": ["a", "b", "c"], "crc_min_n": 9, "rcps_min_n": 22}, "rows": rows}
    text = card_text(result)
    assert "## What each truth is like, and where the error lies" in text
    if centre == "truth":  # mean within 0.01/sqrt(8) of the truth: far better than any classical denoiser
        assert r["gain_db"] > 10 and "**met** (gains" in text
    else:  # the noisy input as the 'mean': worse than the tuned baselines
        assert r["gain_db"] < 0 and "**NOT met** (gains" in text
    assert "n ≥ 9" in text and "CT_small" in text


def test_held_out_low_dose_input_is_simulated_on_the_whole_slice_then_cropped(tmp_path: Path) -> None:
    """enhance_cached for a low-dose model: the crop's noise is the crop of the whole slice's simulated noise
    (attenuation and streaks from outside the crop count), the input is cached with the samples, and reruns
    read the cache."""
    from medsr.enhance import EnhanceOptions
    from medsr.evaluate import degrade_scan
    from pipelines.lowdose_card import held_out_ct

    model = tiny_model(tmp_path / "m.pt", "lowdose:1x1,dose=0.25")
    item = next(h for h in held_out_ct(64) if h.name == "CT_small")
    opt = EnhanceOptions(samples=2, steps=2, seed=0, device="cpu")
    data = calib.enhance_cached(item, model, opt, tmp_path / "cache")
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].name.endswith("-c64-sf-e2-ld.npz")  # 2 samples on 2 turns of the input
    assert data["truth"].shape == data["low"].shape == (64, 64, 1) and data["samples"].shape == (2, 64, 64, 1)
    whole = degrade_scan(ct_small(), model.config.degrade, model.config.intensity, slice_axis=2, seed=0)
    noise = (whole.low_norm - whole.truth_norm)[32:96, 32:96]
    np.testing.assert_allclose(data["low"] - data["truth"], noise, atol=1e-5)
    np.testing.assert_allclose(data["truth"], whole.truth_norm[32:96, 32:96], atol=1e-6)
    stamp = files[0].stat().st_mtime_ns
    again = calib.enhance_cached(item, model, opt, tmp_path / "cache")
    assert files[0].stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again["samples"], data["samples"])
