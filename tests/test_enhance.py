"""enhance_scan on real scans with tiny random-weight models: geometry, statistics, consistency, reproducibility."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from enhance_fixtures import anatomical, ct_small, fine_centres, tiny_model

from medsr.degrade import block_average, parse_spec, psf_blur
from medsr.enhance import EnhanceOptions, EnhanceResult, choose_slice_axis, enhance_scan, volume_factors
from medsr.errors import MedsrError
from medsr.io import Scan, crop_scan, refined_affine
from medsr.model import LoadedModel


def with_spacing(spacing: tuple[float, float, float], shape: tuple[int, int, int] = (4, 5, 6)) -> Scan:
    return Scan(np.zeros((1, *shape), np.float32), np.diag([*spacing, 1.0]))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """2D x2 in-plane, 16-voxel training patch: 32-voxel windows, several per slice."""
    return tiny_model(tmp_path_factory.mktemp("enhance") / "tiny.pt")


@pytest.fixture(scope="module")
def t1() -> Scan:
    return anatomical()


@pytest.fixture(scope="module")
def small(t1: Scan) -> Scan:
    """3 real slices, 24 x 32 voxels (48 x 64 fine: several overlapping 16-voxel windows per slice), cut from
    the middle of the T1 so the affine's origin is shifted: geometry errors cannot hide behind a zero offset."""
    return crop_scan(t1, (4, 4, 10), (24, 32, 3))


@pytest.fixture(scope="module")
def result(model: LoadedModel, small: Scan) -> EnhanceResult:
    torch.set_num_threads(1)
    return enhance_scan(small, model, EnhanceOptions(samples=3, steps=2, seed=0, keep_samples=True))


# --- slice axis and factors ------------------------------------------------------------------------------------

def test_choose_slice_axis() -> None:
    assert choose_slice_axis(ct_small()) == 2  # singleton axis
    assert choose_slice_axis(with_spacing((1.0, 1.0, 1.0), (4, 1, 6))) == 1
    assert choose_slice_axis(with_spacing((0.5, 0.5, 3.0))) == 2  # thick slices
    assert choose_slice_axis(with_spacing((4.0, 1.0, 1.0))) == 0
    assert choose_slice_axis(with_spacing((2.0, 2.0, 2.0))) == 2  # isotropic: axial, as 2D models train
    assert choose_slice_axis(with_spacing((1.0000001, 1.0, 0.9999999))) == 2  # float noise is not "thicker"


def test_volume_factors() -> None:
    assert volume_factors(parse_spec("block:4x4"), 2) == (4, 4, 1)
    assert volume_factors(parse_spec("block:4x4"), 0) == (1, 4, 4)
    assert volume_factors(parse_spec("block:2x3"), 1) == (2, 1, 3)
    assert volume_factors(parse_spec("block:1x1x4"), None) == (1, 1, 4)


# --- one enhanced real NIfTI ----------------------------------------------------------------------------------

def test_shapes_spacing_and_affine(result: EnhanceResult, small: Scan) -> None:
    assert result.info["slice_axis"] == 2
    assert result.factors == (2, 2, 1)
    for out in (result.mean, result.std, result.q05, result.q95):
        assert out.array.shape == (1, 48, 64, 3)
        assert out.array.dtype == np.float32
        np.testing.assert_allclose(out.spacing, (1.0, 1.0, 2.0))
        np.testing.assert_allclose(out.affine, refined_affine(small.affine, result.factors))
    assert result.samples is not None and result.samples.shape == (3, 48, 64, 3)


def test_each_block_of_fine_voxels_is_centred_on_its_coarse_voxel(result: EnhanceResult, small: Scan) -> None:
    fx, fy, fz = result.factors
    x, y, z = small.spatial_shape
    fine = fine_centres(result.mean.affine, result.mean.spatial_shape)
    block_centres = fine.reshape(x, fx, y, fy, z, fz, 3).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(block_centres, fine_centres(small.affine, small.spatial_shape), atol=1e-9)


def test_statistics_are_those_of_the_samples(result: EnhanceResult) -> None:
    s = torch.from_numpy(result.samples).double()  # type: ignore[arg-type]
    scale = float(s.max() - s.min())
    np.testing.assert_allclose(result.mean.array[0], s.mean(0).numpy(), atol=1e-5 * scale)
    np.testing.assert_allclose(result.std.array[0], s.std(0).numpy(), atol=1e-5 * scale)
    np.testing.assert_allclose(result.q05.array[0], torch.quantile(s, 0.05, dim=0).numpy(), atol=1e-5 * scale)
    np.testing.assert_allclose(result.q95.array[0], torch.quantile(s, 0.95, dim=0).numpy(), atol=1e-5 * scale)
    assert result.interval_method == "empirical"
    mean, q05, q95, std = (a.array[0] for a in (result.mean, result.q05, result.q95, result.std))
    assert all(np.isfinite(a).all() for a in (mean, q05, q95, std))
    assert (std >= 0).all() and std.mean() > 0
    assert ((q05 <= mean + 1e-3) & (mean <= q95 + 1e-3)).mean() > 0.99
    assert 0 < result.score.mean_std < 1 and 0 < result.score.body_voxels <= mean.size


def test_every_sample_is_consistent_with_the_input(result: EnhanceResult, small: Scan) -> None:
    """Block-averaging each sample (scan units) gives back the input, as the projection promises."""
    low = torch.from_numpy(small.array)
    scale = float(low.max() - low.min())
    for s in torch.from_numpy(result.samples):  # type: ignore[arg-type]
        back = block_average(s.movedim(2, 0)[:, None], (2, 2))[:, 0].movedim(0, 2)
        assert float((back - low[0]).abs().max()) < 1e-5 * scale
    assert result.consistency["relative_mean_abs_error"] < 1e-6
    assert result.consistency["max_abs_error"] < 1e-5 * scale


def test_timings_and_info(result: EnhanceResult) -> None:
    assert set(result.timings) == {"prepare_s", "sampling_s", "total_s"}
    assert result.timings["total_s"] >= result.timings["sampling_s"] > 0
    assert result.info["window"] == [16, 16] and result.info["device"] == "cpu"


# --- reproducibility --------------------------------------------------------------------------------------------

def test_same_seed_same_result_different_seed_different(model: LoadedModel, small: Scan,
                                                        result: EnhanceResult) -> None:
    opts = {"samples": 3, "steps": 2, "keep_samples": True}  # ``result``'s options, seed 0
    a = result
    b = enhance_scan(small, model, EnhanceOptions(seed=0, **opts))
    c = enhance_scan(small, model, EnhanceOptions(seed=1, **opts))
    for key in ("mean", "std", "q05", "q95"):
        assert np.array_equal(getattr(a, key).array, getattr(b, key).array), key
    assert np.abs(a.mean.array - c.mean.array).mean() > 1e-3 * np.ptp(small.array)
    assert np.abs(a.std.array - c.std.array).mean() > 1e-3 * np.ptp(small.array)


def test_result_does_not_depend_on_batching(model: LoadedModel, small: Scan, result: EnhanceResult) -> None:
    """batch_size 16 (the default: all slices and samples per call; ``result``), 7 (calls that split a slice's
    samples) and 1 (one image per call) agree: every (sample, slice) pair has its own generator. Up to float
    rounding: CPU convolutions are not bitwise identical across batch sizes."""
    assert EnhanceOptions().batch_size == 16
    runs = [result, *(enhance_scan(small, model, EnhanceOptions(samples=3, steps=2, seed=0, batch_size=b,
                                                                 keep_samples=True)) for b in (7, 1))]
    tol = 1e-5 * float(np.ptp(small.array))
    for other in runs[1:]:
        for key in ("mean", "std", "q05", "q95"):
            np.testing.assert_allclose(getattr(other, key).array, getattr(runs[0], key).array, rtol=0, atol=tol)
        np.testing.assert_allclose(other.samples, runs[0].samples, rtol=0, atol=tol)  # type: ignore[arg-type]


# --- other inputs and options -----------------------------------------------------------------------------------

def ct_centre() -> Scan:
    """The middle 48 x 48 pixels of the real CT slice (head and skull, no air border)."""
    return crop_scan(ct_small(), (40, 40, 0), (48, 48, 1))


def test_ct_slice_without_projection_is_not_consistent(model: LoadedModel) -> None:
    ct = ct_centre()
    on = enhance_scan(ct, model, EnhanceOptions(samples=2, steps=2))
    off = enhance_scan(ct, model, EnhanceOptions(samples=2, steps=2, project=False))
    assert on.factors == (2, 2, 1) and on.mean.array.shape == (1, 96, 96, 1)
    np.testing.assert_allclose(on.mean.spacing, np.array(ct.spacing) / (2, 2, 1), rtol=1e-6)
    assert on.consistency["mean_abs_error"] < 0.01  # HU
    assert off.consistency["mean_abs_error"] > 100 * max(on.consistency["mean_abs_error"], 1e-3)


def test_consistency_uses_the_models_operator_with_its_blur(tmp_path: Path) -> None:
    """report.json's data-consistency figure degrades the mean with the model's own operator (PSF included)."""
    m = tiny_model(tmp_path / "blur.pt", "block:2x2,sigma=1.0")
    ct = ct_centre()
    r = enhance_scan(ct, m, EnhanceOptions(samples=1, steps=1, device="cpu", amp="none"))
    lo, hi = r.info["normaliser"]["lo"], r.info["normaliser"]["hi"]

    def normalised(a: np.ndarray) -> torch.Tensor:
        return (2.0 * (torch.from_numpy(a[0, :, :, 0]).double() - lo) / (hi - lo) - 1.0)[None, None]

    mean, low = normalised(r.mean.array), normalised(ct.array)
    with_blur = float((block_average(psf_blur(mean, 1.0), (2, 2)) - low).abs().mean()) * 0.5 * (hi - lo)
    without_blur = float((block_average(mean, (2, 2)) - low).abs().mean()) * 0.5 * (hi - lo)
    assert abs(with_blur - without_blur) > 0.05 * with_blur  # the two operators differ measurably on this scan
    assert r.consistency["mean_abs_error"] == pytest.approx(with_blur, rel=1e-3)


def test_single_sample_gives_zero_spread_and_a_normal_interval(model: LoadedModel, small: Scan) -> None:
    r = enhance_scan(small, model, EnhanceOptions(samples=1, steps=2))
    assert r.interval_method == "normal"
    assert np.array_equal(r.std.array, np.zeros_like(r.std.array))
    assert np.array_equal(r.q05.array, r.mean.array) and np.array_equal(r.q95.array, r.mean.array)


@pytest.mark.parametrize("shared, passes", [(True, 1 + 2 * 2), (False, 2 * 3)])
def test_progress_counts_network_passes_and_reaches_the_total(model: LoadedModel, small: Scan, shared: bool,
                                                             passes: int) -> None:
    """Progress is in network passes over each slice (3 slices here): a shared first step counts once."""
    seen: list[tuple[int, int]] = []
    opt = EnhanceOptions(samples=2, steps=3, batch_size=3, share_first_step=shared)
    enhance_scan(small, model, opt, lambda d, t: seen.append((d, t)))
    assert opt.passes() == passes
    assert seen[-1] == (3 * passes, 3 * passes)
    assert all(b[0] > a[0] for a, b in zip(seen, seen[1:]))


def test_3d_model(tmp_path: Path, t1: Scan) -> None:
    m = tiny_model(tmp_path / "3d.pt", "block:1x1x2", (8, 8, 8), "model.spatial_dims=3")
    scan = crop_scan(t1, (8, 10, 4), (16, 16, 8))
    r = enhance_scan(scan, m, EnhanceOptions(samples=2, steps=2, keep_samples=True))
    assert r.factors == (1, 1, 2) and r.info["slice_axis"] is None
    assert r.mean.array.shape == (1, 16, 16, 16)
    np.testing.assert_allclose(r.mean.affine, refined_affine(scan.affine, (1, 1, 2)))
    back = block_average(torch.from_numpy(r.samples)[:, None], (1, 1, 2))[:, 0]  # type: ignore[arg-type]
    assert float((back - torch.from_numpy(scan.array)).abs().max()) < 1e-5 * float(np.ptp(scan.array))


def test_bad_options_and_inputs(model: LoadedModel, small: Scan) -> None:
    with pytest.raises(MedsrError, match="samples must be an integer >= 1"):
        enhance_scan(small, model, EnhanceOptions(samples=0))
    tiny = Scan(np.ones((1, 1, 3, 1), np.float32), np.eye(4), modality="CT", source="tiny.nii.gz")
    with pytest.raises(MedsrError, match="too small"):
        enhance_scan(tiny, model, EnhanceOptions(samples=1, steps=1))
