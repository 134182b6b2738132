"""The low-dose CT simulator on real CT slices and on a made phantom: projections that invert, noise that scales
with the dose, is zero-mean, reproducible and streaky (ramp-filtered, strongest along rays through bone; white
noise fails these), the clean path, the whole-slice noise cache behind training patches, and ``medsr enhance``
with a tiny untrained low-dose checkpoint on a real CT slice (output grid = input grid)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from enhance_fixtures import DICOM_REF, ct_small, tiny_config, write_tiny_checkpoint
from typer.testing import CliRunner

import medsr.cli
from medsr.config import AugmentConfig
from medsr.data import PatchDataset, Volume, load_volumes
from medsr.degrade import (
    LowDoseModel,
    apply_degradation,
    clean_sinogram,
    draw_params,
    fbp_parallel,
    low_dose_noise_hu,
    parse_spec,
    radon_parallel,
    simulate_low_dose,
)
from medsr.errors import MedsrError
from medsr.intensity import IntensityConfig
from medsr.io import load_scan
from medsr.io.refs import load_ref, resolve_ref
from medsr.lowdose_cache import noise_volumes, realisations_for


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ct() -> tuple[torch.Tensor, float]:
    """pydicom's real CT slice CT_small.dcm in HU ``(1, 128, 128)`` and its pixel size (0.66 mm)."""
    scan = ct_small()
    return torch.from_numpy(scan.array[0, :, :, 0].astype(np.float32))[None], float(np.mean(scan.spacing[:2]))


@pytest.fixture(scope="module")
def cranium() -> tuple[torch.Tensor, float]:
    """A mid slice of the real training head CT (InVesalius Cranium, 256 x 256, 0.957 mm), HU."""
    scan = load_ref("invesalius:Cranium")
    return torch.from_numpy(scan.array[0, :, :, 54].astype(np.float32))[None], float(np.mean(scan.spacing[:2]))


_SINOGRAMS: dict[tuple[bytes, tuple[int, ...], float], torch.Tensor] = {}


def _noise(hu: torch.Tensor, dose: float, seed: int, pixel: float, n: int = 1) -> torch.Tensor:
    """``n`` noise realisations of one slice; its clean sinogram is projected once per module, not per call
    (``test_sinogram_is_reused`` checks that passing it changes nothing)."""
    key = (hashlib.sha1(hu.numpy().tobytes()).digest(), tuple(hu.shape), pixel)
    if key not in _SINOGRAMS:
        _SINOGRAMS[key] = clean_sinogram(hu, pixel)
    sino = _SINOGRAMS[key].expand(n, -1, -1)
    return low_dose_noise_hu(hu.expand(n, -1, -1), dose, torch.Generator().manual_seed(seed), pixel, sinogram=sino)


def _radial_nps(noise: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Noise power spectrum of ``(N, H, W)`` noise images, radially averaged: (frequency in cycles/pixel, power)."""
    x = noise.double().numpy()
    x = x - x.mean(axis=(1, 2), keepdims=True)
    power = (np.abs(np.fft.fftshift(np.fft.fft2(x), axes=(1, 2))) ** 2).mean(0)
    h, w = power.shape
    fy, fx = np.meshgrid(np.fft.fftshift(np.fft.fftfreq(h)), np.fft.fftshift(np.fft.fftfreq(w)), indexing="ij")
    r = np.hypot(fy, fx)
    bins = np.linspace(0, 0.5, 11)
    idx = np.digitize(r.ravel(), bins) - 1
    prof = np.array([power.ravel()[idx == i].mean() for i in range(10)])
    return 0.5 * (bins[1:] + bins[:-1]), prof


def _low_to_mid_power(noise: torch.Tensor) -> float:
    _, prof = _radial_nps(noise)
    return float(prof[0] / prof[4:8].mean())  # below 0.05 cycles/pixel vs 0.2-0.4


# --- projections ------------------------------------------------------------------------------------------------

def test_fbp_inverts_the_projections_on_a_real_slice(ct: tuple[torch.Tensor, float]) -> None:
    hu, _ = ct
    mu = (0.0192 * (1 + hu / 1000)).clamp_min(0)
    rec = fbp_parallel(radon_parallel(mu, 256), (128, 128))
    inner = (slice(None), slice(8, -8), slice(8, -8))
    rel = float((rec - mu)[inner].abs().mean() / mu[inner].mean())
    assert rel < 0.03, rel
    # a constant keeps its value: the ramp filter has no DC offset
    assert float(rec[inner].mean() / mu[inner].mean()) == pytest.approx(1.0, abs=0.01)


# --- noise statistics -------------------------------------------------------------------------------------------

def test_noise_grows_as_dose_falls(ct: tuple[torch.Tensor, float]) -> None:
    """Added noise std follows sqrt(1/d - 1) (so full-dose noise plus it follows 1/sqrt(d)), within 10%."""
    hu, px = ct
    body = hu[0] > -300
    doses = (0.5, 0.25, 0.1)
    stds = [float(_noise(hu, d, 11, px, n=4)[:, body].std()) for d in doses]
    assert stds[0] < stds[1] < stds[2]
    for d, s in zip(doses, stds):
        assert s / stds[0] == pytest.approx(np.sqrt(1 / d - 1), rel=0.1), (d, stds)
    # total noise for a scan whose own (full-dose) noise equals the dose-1/2 insertion: 1/sqrt(d) within 10%
    full = stds[0]
    totals = [np.sqrt(full**2 + s**2) for s in stds]
    assert totals[2] / totals[1] == pytest.approx(np.sqrt(0.25 / 0.1), rel=0.1)


def test_noise_is_zero_mean(ct: tuple[torch.Tensor, float]) -> None:
    hu, px = ct
    noise = _noise(hu, 0.25, 5, px, n=8)
    body = hu[0] > -300
    std = float(noise[:, body].std())
    assert abs(float(noise[:, body].mean())) < 0.02 * std
    # pixelwise: the mean of 8 independent realisations is sqrt(8) smaller, with no fixed pattern left over
    assert float(noise.mean(0)[body].std()) == pytest.approx(std / np.sqrt(8), rel=0.2)


def test_noise_is_not_white_but_ramp_filtered(ct: tuple[torch.Tensor, float]) -> None:
    """FBP noise has little power at low frequencies (ramp filter): its NPS is far from flat. White noise of the
    same std (what an image-domain Gaussian model makes) has a flat NPS and fails the same check."""
    hu, px = ct
    noise = _noise(hu, 0.25, 2, px, n=4)
    assert _low_to_mid_power(noise) < 0.3
    white = torch.randn(noise.shape, generator=torch.Generator().manual_seed(0)) * noise.std()
    assert _low_to_mid_power(white) > 0.7


def _lag_corr(a: torch.Tensor, axis: int, lag: int) -> float:
    a = a.double()
    x, y = a.narrow(axis, 0, a.shape[axis] - lag), a.narrow(axis, lag, a.shape[axis] - lag)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).mean() / (x.std() * y.std()))


def test_streaks_run_along_rays_through_bone() -> None:
    """A water cylinder (1 mm pixels) with two very dense rods (3000 HU, 10 mm radius): the rays through both
    rods are photon-starved, so between the rods the noise forms streaks along their line: neighbours 2 pixels
    apart along the line are correlated, while the same band turned 90 degrees (where no ray crosses both rods)
    shows no such correlation. White noise shows none anywhere."""
    n = 128
    yy, xx = np.meshgrid(np.arange(n) - 63.5, np.arange(n) - 63.5, indexing="ij")
    phantom = np.where(np.hypot(yy, xx) < 58, 0.0, -1000.0)
    for cx in (-38.0, 38.0):
        phantom[np.hypot(yy, xx - cx) < 10] = 3000.0
    hu = torch.from_numpy(phantom.astype(np.float32))[None]
    noise = _noise(hu, 0.25, 3, 1.0, n=8)
    between, turned = noise[:, 58:70, 40:88], noise[:, 40:88, 58:70]
    along, control = _lag_corr(between, 2, 2), _lag_corr(turned, 1, 2)
    assert along > 0.2 and along > control + 0.15, (along, control)
    white = torch.randn(noise.shape, generator=torch.Generator().manual_seed(0))
    assert abs(_lag_corr(white[:, 58:70, 40:88], 2, 2)) < 0.05


def test_noise_scale_on_the_training_head_ct(cranium: tuple[torch.Tensor, float]) -> None:
    """Quarter dose on the real head CT (skull: rays down to e^-4.8) adds tens of HU, as in low-dose studies."""
    hu, px = cranium
    brain = (hu[0] > 0) & (hu[0] < 80)
    s = float(_noise(hu, 0.25, 0, px)[:, brain].std())
    assert 20 < s < 80, s


def test_clean_path_returns_the_input_and_same_seed_same_noise(ct: tuple[torch.Tensor, float]) -> None:
    hu, px = ct
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(simulate_low_dose(hu, 1.0, gen, px), hu)
    x = (hu / 1024.0)[None]
    assert torch.equal(apply_degradation(x, draw_params(parse_spec("lowdose:1x1,dose=1"), np.random.default_rng(0)),
                                         px), x)
    a, b, c = _noise(hu, 0.25, 7, px), _noise(hu, 0.25, 7, px), _noise(hu, 0.25, 8, px)
    assert torch.equal(a, b)
    assert float((a - c).abs().mean()) > 1.0


def test_views_change_cost_not_noise_level(ct: tuple[torch.Tensor, float]) -> None:
    """The photon budget is per rotation, so simulating fewer views keeps the noise level (within 10%)."""
    hu, px = ct
    body = hu[0] > -300
    s = [float(low_dose_noise_hu(hu.expand(4, -1, -1), 0.25, torch.Generator().manual_seed(1), px,
                                 LowDoseModel(n_views=v))[:, body].std()) for v in (128, 256)]
    assert s[0] == pytest.approx(s[1], rel=0.1)


def test_sinogram_is_reused(ct: tuple[torch.Tensor, float]) -> None:
    hu, px = ct
    sino = clean_sinogram(hu, px)
    a = low_dose_noise_hu(hu, 0.3, torch.Generator().manual_seed(4), px, sinogram=sino)
    torch.testing.assert_close(a, low_dose_noise_hu(hu, 0.3, torch.Generator().manual_seed(4), px))


# --- the noise cache behind training patches ----------------------------------------------------------------

def test_cache_is_made_once_and_patches_carry_whole_slice_noise(tmp_path: Path) -> None:
    vols = load_volumes(["pydicom:CT_small.dcm"], IntensityConfig())
    spec = parse_spec("lowdose:1x1,dose=0.25")
    first = noise_volumes(vols, spec, 2, tmp_path, seed=0, patches=8)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and not files[0].name.startswith(".tmp")
    assert first[0].shape == (realisations_for(1, 8), 128, 128, 1)
    stamp = files[0].stat().st_mtime_ns
    again = noise_volumes(vols, spec, 2, tmp_path, seed=0, patches=8)
    assert files[0].stat().st_mtime_ns == stamp  # reused, not remade
    np.testing.assert_array_equal(first[0], again[0])
    # the cached noise is the simulator's, in normalised units (HU / 1024), and realisations differ
    hu = torch.from_numpy((vols[0].data[:, :, 0] * 1024.0).astype(np.float32))
    body = hu > -300
    cached_hu = torch.from_numpy(first[0][..., 0].astype(np.float32)) * 1024.0
    assert float(cached_hu[:, body].std()) == pytest.approx(float(_noise(hu[None], 0.25, 9, 0.661468)[:, body].std()),
                                                            rel=0.15)
    assert float((cached_hu[0] - cached_hu[1]).abs().mean()) > 1.0
    # a different dose is a different file
    noise_volumes(vols, parse_spec("lowdose:1x1,dose=0.5"), 2, tmp_path, seed=0, patches=8)
    assert len(list(tmp_path.iterdir())) == 2

    ds = PatchDataset(vols, spec, (32, 32), 8, seed=0, lowdose_cache=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2  # the dataset used the cache
    item = ds[3]
    diff = (item["lowres"] - item["hr"])[0].numpy()
    # the patch's noise is a crop of one cached whole-slice realisation
    found = False
    for k in range(first[0].shape[0]):
        full = first[0][k, :, :, 0].astype(np.float32)
        for i in range(128 - 31):
            for j in range(128 - 31):
                if abs(full[i, j] - diff[0, 0]) < 1e-6 and np.allclose(full[i:i + 32, j:j + 32], diff, atol=1e-6):
                    found = True
                    break
            if found:
                break
        if found:
            break
    assert found
    assert torch.equal(ds[3]["lowres"], item["lowres"])  # reproducible


# --- medsr enhance with a low-dose checkpoint ----------------------------------------------------------------

def test_enhance_with_a_lowdose_checkpoint_keeps_the_grid(tmp_path: Path) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "lowdose tiny.pt", tiny_config("lowdose:1x1,dose=0.25", (16, 16)))
    out = tmp_path / "out"
    res = CliRunner().invoke(medsr.cli.app, ["enhance", DICOM_REF, "--model", str(ckpt), "--out", str(out),
                                             "--samples", "2", "--steps", "2", "--device", "cpu", "--amp", "none"])
    assert res.exit_code == 0, res.output
    src = ct_small()
    folder = out / "CT_small"
    produced = {p.name for p in folder.iterdir()}
    assert "report.json" in produced
    mean_path = next(p for p in folder.iterdir() if p.name.startswith("mean"))
    mean = load_scan(mean_path)
    assert mean.spatial_shape == src.spatial_shape
    np.testing.assert_allclose(mean.affine, src.affine, atol=1e-5)
    # an untrained denoiser stays close to the input: same anatomy, HU scale kept
    corr = np.corrcoef(mean.array.ravel(), src.array.ravel())[0, 1]
    assert corr > 0.9, corr


def test_noise_scale_augmentation_scales_the_cached_noise_within_its_range(tmp_path: Path) -> None:
    """Each patch's low-dose noise is the unscaled item's noise times one factor from the range; factors vary."""
    vols = load_volumes(["pydicom:CT_small.dcm"], IntensityConfig())
    spec = parse_spec("lowdose:1x1,dose=0.25")
    plain = PatchDataset(vols, spec, (32, 32), 12, seed=0, lowdose_cache=tmp_path)
    off = PatchDataset(vols, spec, (32, 32), 12, seed=0, lowdose_cache=tmp_path, augment=AugmentConfig())
    scaled = PatchDataset(vols, spec, (32, 32), 12, seed=0, lowdose_cache=tmp_path,
                          augment=AugmentConfig(lowdose_noise_scale=(0.5, 2.5)))
    factors = []
    for i in range(12):
        a, b = plain[i], scaled[i]
        assert torch.equal(off[i]["lowres"], a["lowres"])  # (1, 1) is off: the same items as without it
        assert torch.equal(a["hr"], b["hr"])  # same place, same realisation: only the noise's size changes
        na, nb = (a["lowres"] - a["hr"]).flatten(), (b["lowres"] - b["hr"]).flatten()
        k = float(nb @ na / (na @ na))
        torch.testing.assert_close(nb, k * na, atol=2e-6, rtol=1e-4)
        assert 0.5 - 1e-4 <= k <= 2.5 + 1e-4
        factors.append(k)
    assert max(factors) / min(factors) > 1.5
    assert torch.equal(scaled[5]["lowres"], scaled[5]["lowres"])  # reproducible


def test_target_noise_gives_the_full_dose_target_its_own_grain_of_the_same_texture(tmp_path: Path) -> None:
    """With lowdose_target_noise the target is the clean patch plus another cached realisation (scaled within the
    range), the input carries it plus the item's usual low-dose noise; off, the items are the old ones."""
    vols = load_volumes(["pydicom:CT_small.dcm"], IntensityConfig())
    spec = parse_spec("lowdose:1x1,dose=0.25")
    plain = PatchDataset(vols, spec, (32, 32), 12, seed=0, lowdose_cache=tmp_path)
    off = PatchDataset(vols, spec, (32, 32), 12, seed=0, lowdose_cache=tmp_path,
                       augment=AugmentConfig(lowdose_target_noise=(0.0, 0.0)))
    grainy = PatchDataset(vols, spec, (32, 32), 12, seed=0, lowdose_cache=tmp_path,
                          augment=AugmentConfig(lowdose_target_noise=(0.2, 0.8)))
    cache = plain.noise[0]  # (K, X, Y, Z) realisations of the one slice
    factors = []
    for i in range(12):
        a, b = plain[i], grainy[i]
        assert torch.equal(off[i]["lowres"], a["lowres"]) and torch.equal(off[i]["hr"], a["hr"])
        torch.testing.assert_close(b["lowres"] - b["hr"], a["lowres"] - a["hr"], atol=1e-5, rtol=0)  # same input noise
        own = (b["hr"] - a["hr"]).flatten().double()
        assert own.abs().max() > 0
        # the target's grain is one cached realisation (not the input's), scaled by a factor in the range
        fits = []
        for k in range(cache.shape[0]):
            ref = torch.from_numpy(np.asarray(cache[k], np.float64))
            window = [ref[x:x + 32, y:y + 32, 0].flatten() for x in range(ref.shape[0] - 31)
                      for y in range(ref.shape[1] - 31)]
            for w in window:
                f = float(own @ w / (w @ w))
                if torch.allclose(own, f * w, atol=1e-3, rtol=0):
                    fits.append((k, f))
                    break
        assert fits, f"item {i}: the target's grain is no cached realisation"
        assert all(0.2 - 1e-3 <= f <= 0.8 + 1e-3 for _, f in fits)
        factors.append(fits[0][1])
    assert max(factors) - min(factors) > 0.2
    assert torch.equal(grainy[4]["hr"], grainy[4]["hr"])  # reproducible


@pytest.mark.parametrize("spec_text, scale, message", [("lowdose:1x1,dose=0.25", (2.0, 1.0), "0 < min <= max"),
                                                      ("block:2x2", (0.5, 2.0), "has none")])
def test_noise_scale_augmentation_refuses_bad_ranges_and_specs_without_lowdose_noise(
        tmp_path: Path, spec_text: str, scale: tuple[float, float], message: str) -> None:
    vol = Volume("v", np.zeros((8, 8, 8), np.float32), np.zeros((0, 3), np.int32))
    with pytest.raises(MedsrError, match=message):
        PatchDataset([vol], parse_spec(spec_text), (8, 8), 4, lowdose_cache=tmp_path / "cache",
                     augment=AugmentConfig(lowdose_noise_scale=scale))
    with pytest.raises(MedsrError, match="lowdose_target_noise"):
        PatchDataset([vol], parse_spec(spec_text), (8, 8), 4, lowdose_cache=tmp_path / "cache",
                     augment=AugmentConfig(lowdose_target_noise=(0.5, 0.1) if "lowdose" in spec_text else (0, 1)))


def test_noise_cache_refuses_patches_cut_across_several_axes(tmp_path: Path) -> None:
    """The cache holds noise simulated in the planes across one axis: other planes would get misplaced streaks."""
    vol = Volume("v", np.zeros((8, 8, 8), np.float32), np.zeros((0, 3), np.int32))
    with pytest.raises(MedsrError, match="several axes"):
        PatchDataset([vol], parse_spec("lowdose:1x1,dose=0.25"), (8, 8), 4, slice_axes=(0, 1, 2),
                     lowdose_cache=tmp_path / "cache")


def test_noise_cache_refuses_zoomed_out_patches(tmp_path: Path) -> None:
    """The cached noise is made at the scans' own voxel size: a zoomed-out patch would get noise of the wrong grain."""
    vol = Volume("v", np.zeros((8, 8, 8), np.float32), np.zeros((0, 3), np.int32))
    with pytest.raises(MedsrError, match="zoom_out_prob"):
        PatchDataset([vol], parse_spec("lowdose:1x1,dose=0.25"), (8, 8), 4, lowdose_cache=tmp_path / "cache",
                     augment=AugmentConfig(zoom_out_prob=0.3))


# --- the shipped lowdose_ct model, by name -------------------------------------------------------------------

def test_lowdose_ct_is_shipped_as_a_denoiser_that_auto_never_picks() -> None:
    from medsr.model import load_model
    from medsr.model_choice import choose_model
    from medsr.runtime import SHIPPED_MODELS, shipped_model_path

    entry = SHIPPED_MODELS["lowdose_ct"]
    assert (entry.task, entry.factors, entry.modalities, entry.auto) == ("denoise", (1, 1), ("CT",), False)
    shipped = load_model(shipped_model_path("lowdose_ct"))
    assert parse_spec(shipped.config.degrade).kind == "lowdose"
    assert shipped_model_path("lowdose_ct").stat().st_size < 5e6  # fp16 EMA weights only
    # the real registry: whatever the geometry, auto picks something else
    for spacing, shape, acq in [((0.66, 0.66, 5.0), (128, 128, 1), 2), ((1, 1, 1), (64, 64, 64), None),
                                ((0.5, 0.5, 5.0), (64, 64, 20), 2), ((0.3, 0.3, 0.3), (512, 512, 1), None)]:
        assert choose_model(spacing, shape, acq).name != "lowdose_ct"
    # listed by ``medsr models`` with its calibration (CT) and its own card, which ships beside the weights
    import json

    from medsr.runtime import WEIGHTS_DIR

    res = CliRunner().invoke(medsr.cli.app, ["models", "--json"])
    assert res.exit_code == 0, res.output
    row = {r["name"]: r for r in json.loads(res.output)}["lowdose_ct"]
    assert (row["task"], row["auto"], row["card"]) == ("denoise", False, "LOWDOSE_CT_CARD.md")
    assert row["calibration"].startswith("CT: x") and (WEIGHTS_DIR / entry.card).is_file()


def test_enhance_by_name_lowdose_ct_writes_a_derived_dicom_series_on_the_input_grid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``medsr enhance CT_small.dcm --model lowdose_ct`` (a tiny model exported in the shipped model's place):
    DICOM in gives a derived DICOM series out whose geometry tags equal the input's."""
    import pydicom

    import medsr.runtime
    from pipelines.export_model import export_shipped

    weights = tmp_path / "weights"
    weights.mkdir()
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.pt", tiny_config("lowdose:1x1,dose=0.25", (16, 16)))
    monkeypatch.setattr(medsr.runtime, "WEIGHTS_DIR", weights)
    exported = export_shipped(ckpt, "lowdose_ct")
    assert exported == weights / "lowdose_ct.pt"
    out = tmp_path / "out"
    res = CliRunner().invoke(medsr.cli.app, ["enhance", DICOM_REF, "--model", "lowdose_ct", "--out", str(out),
                                             "--samples", "2", "--steps", "2", "--device", "cpu", "--amp", "none"])
    assert res.exit_code == 0, res.output
    assert "denoise" in res.output
    src_path = resolve_ref(DICOM_REF)
    src = pydicom.dcmread(src_path)
    files = sorted((out / "CT_small" / "dicom_mean").iterdir())
    assert len(files) == 1
    ds = pydicom.dcmread(files[0])
    for tag in ("Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient",
                "SliceThickness"):
        np.testing.assert_allclose(np.asarray(ds.data_element(tag).value, np.float64),
                                   np.asarray(src.data_element(tag).value, np.float64), atol=1e-4, err_msg=tag)
    assert "DERIVED" in list(ds.ImageType)
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert "denoise" in ds.SeriesDescription
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    ref = src.pixel_array * float(src.RescaleSlope) + float(src.RescaleIntercept)
    assert np.corrcoef(hu.ravel(), ref.ravel())[0, 1] > 0.9  # same anatomy, HU kept


# --- medsr evaluate on the denoise task ---------------------------------------------------------------------

def test_evaluation_degrades_with_the_slices_pixel_size_and_ct_window() -> None:
    """degrade_scan gives the simulator the scan's pixel size and the CT window: its noise is exactly the
    simulator's on the scan's HU at 0.66 mm (a wrong window would rescale the HU, the 1 mm default would be
    another simulation); an MR scan is refused for a CT simulation."""
    from medsr.evaluate import degrade_scan

    scan = ct_small()
    deg = degrade_scan(scan, "lowdose:1x1,dose=0.25", IntensityConfig(ct_window=(-1000.0, 1000.0)), 2, seed=3)
    noise_hu = (deg.low.array[0] - deg.truth.array[0])[..., 0]
    params = draw_params(parse_spec("lowdose:1x1,dose=0.25"), np.random.default_rng(3))
    hu = torch.from_numpy(deg.truth.array[0][..., 0].astype(np.float64))[None]
    px = float(np.mean(scan.spacing[:2]))
    expected = low_dose_noise_hu(hu, 0.25, torch.Generator().manual_seed(params.noise_seed), px)[0].numpy()
    np.testing.assert_allclose(noise_hu, expected, atol=0.5)  # float32 round trip through the window
    at_1mm = low_dose_noise_hu(hu, 0.25, torch.Generator().manual_seed(params.noise_seed), 1.0)[0].numpy()
    assert np.abs(noise_hu - at_1mm).mean() > 5.0  # the 1 mm default would be a different simulation
    with pytest.raises(MedsrError, match="simulates low-dose CT"):
        degrade_scan(load_ref("pydicom:MR_small.dcm"), "lowdose:1x1,dose=0.25", None, 2)


def test_evaluate_scores_tuned_classical_baselines_noise_and_edges(tmp_path: Path) -> None:
    import csv
    import json

    from medsr.baselines import available_baselines

    ckpt = write_tiny_checkpoint(tmp_path / "tiny.pt", tiny_config("lowdose:1x1,dose=0.25", (16, 16)))
    out = tmp_path / "eval"
    res = CliRunner().invoke(medsr.cli.app, ["evaluate", DICOM_REF, "--model", str(ckpt), "--degrade",
                                             "lowdose:1x1,dose=0.25", "--samples", "2", "--steps", "2",
                                             "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = {r["method"]: r for r in csv.DictReader(open(out / "metrics.csv"))}
    assert set(rows) == {"interpolation", "sample", "mean", *available_baselines()}
    assert {"nlm", "tv"} <= set(rows)
    noisy, nlm, tv = (float(rows[m]["psnr"]) for m in ("interpolation", "nlm", "tv"))
    assert nlm > noisy + 0.5 and tv > noisy + 0.5  # tuned on the truth, they do denoise
    # noise in uniform regions: the denoisers remove most of the simulated noise; edges are measured
    assert float(rows["nlm"]["noise_std"]) < 0.7 * float(rows["interpolation"]["noise_std"])
    assert all(float(r["edge_width_mm"]) > 0 for r in rows.values())
    summary = json.loads((out / "summary.json").read_text())
    info = summary["scans"][0]
    assert info["pixel_mm"] == pytest.approx(0.661468, rel=1e-4)
    assert info["edge_points"] > 0 and info["uniform_patches"] > 0
    assert set(info["baseline_strengths"]) == set(available_baselines())
    assert "nlm" in summary["overall"] and "noiseHU" in res.output
