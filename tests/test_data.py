"""Patch datasets on real scans: reproducible items, foreground weighting, 2D/3D shapes, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medsr.config import AugmentConfig, load_config, to_dict
from medsr.data import PatchDataset, Volume, build_augment, load_volumes
from medsr.degrade import apply_degradation, draw_params, parse_spec, upsample
from medsr.errors import MedsrError
from medsr.intensity import IntensityConfig


@pytest.fixture(scope="module")
def mni() -> list[Volume]:
    """The real MNI152 T1 template (197 x 233 x 189), percentile-normalised."""
    return load_volumes(["nilearn:mni152"], IntensityConfig())


@pytest.fixture(scope="module")
def small_scans() -> list[Volume]:
    """Two small real scans: a CT slice (128 x 128 x 1, HU window) and a T1 volume (33 x 41 x 25)."""
    return load_volumes(["pydicom:CT_small.dcm", "nibabel:anatomical.nii@MR"], IntensityConfig())


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_volumes_normalises_and_samples_foreground(small_scans: list[Volume]) -> None:
    ct, mr = small_scans
    assert ct.data.shape == (128, 128, 1) and mr.data.shape == (33, 41, 25)
    assert ct.data.dtype == np.float32
    assert ct.data.min() >= -1.0 - 1e-6  # CT_small has no value below -1024 HU
    assert np.all(ct.data[tuple(ct.foreground.T)] > -0.8)
    capped = load_volumes(["nibabel:anatomical.nii"], IntensityConfig(), max_foreground=100)
    assert capped[0].foreground.shape == (100, 3)


def test_items_are_reproducible(mni: list[Volume]) -> None:
    spec = parse_spec("kspace:4x4,noise=0.03")  # random noise too: must come from the item's own seed
    ds = PatchDataset(mni, spec, (32, 32), length=50, seed=3)
    again = PatchDataset(mni, spec, (32, 32), length=50, seed=3)
    first = ds[7]
    assert _same(first, ds[7])
    assert _same(first, again[7])
    _ = [ds[i] for i in range(10)]  # order of access does not matter
    assert _same(first, ds[7])
    assert not _same(first, ds[8])
    assert not _same(first, PatchDataset(mni, spec, (32, 32), 50, seed=4)[7])
    assert not _same(first, PatchDataset(mni, spec, (32, 32), 50, seed=3, rank=1)[7])


def test_item_is_a_consistent_training_pair(mni: list[Volume]) -> None:
    spec = parse_spec("block:4x4")
    item = PatchDataset(mni, spec, (32, 32), 4)[0]
    hr = item["hr"][None]
    torch.testing.assert_close(item["lowres"][None], apply_degradation(hr, draw_params(spec, np.random.default_rng())))
    torch.testing.assert_close(item["cond"][None], upsample(item["lowres"][None], spec.factors))


def _air_patches(ds: PatchDataset, threshold: float = -0.8) -> int:
    return sum(float(ds[i]["hr"].max()) <= threshold for i in range(len(ds)))


def test_foreground_weighting_avoids_air(mni: list[Volume]) -> None:
    spec = parse_spec("block:4x4")
    n = 200
    weighted = _air_patches(PatchDataset(mni, spec, (32, 32), n, seed=1, foreground_fraction=1.0))
    uniform = _air_patches(PatchDataset(mni, spec, (32, 32), n, seed=1, foreground_fraction=0.0))
    assert weighted <= 0.02 * n
    assert uniform >= 0.25 * n  # about 78% of the template is air
    assert uniform > weighted + 0.2 * n


@pytest.mark.parametrize(
    ("spec", "patch", "slice_axis", "hr_shape", "low_shape"),
    [
        ("block:4x4", (32, 32), 2, (1, 32, 32), (1, 8, 8)),
        ("block:2x4", (16, 32), 0, (1, 16, 32), (1, 8, 8)),
        ("lowdose:1x1,dose=0.25", (24, 24), 1, (1, 24, 24), (1, 24, 24)),
        ("block:1x1x4", (16, 16, 16), 2, (1, 16, 16, 16), (1, 16, 16, 4)),
        ("kspace:2x2x2", (16, 8, 16), 2, (1, 16, 8, 16), (1, 8, 4, 8)),
    ],
)
def test_shapes_2d_and_3d(mni: list[Volume], spec: str, patch: tuple[int, ...], slice_axis: int,
                          hr_shape: tuple[int, ...], low_shape: tuple[int, ...]) -> None:
    ds = PatchDataset(mni, parse_spec(spec), patch, length=3, slice_axis=slice_axis)
    item = ds[1]
    assert item["hr"].shape == hr_shape
    assert item["cond"].shape == hr_shape
    assert item["lowres"].shape == low_shape
    assert all(v.dtype == torch.float32 for v in item.values())
    assert len(ds) == 3


def test_scans_smaller_than_the_patch_are_padded(small_scans: list[Volume]) -> None:
    """anatomical.nii is 25 voxels deep and CT_small is one slice: patches still come out whole and finite."""
    ds = PatchDataset(small_scans, parse_spec("block:1x1x4"), (32, 32, 32), length=6)
    for i in range(len(ds)):
        assert ds[i]["hr"].shape == (1, 32, 32, 32)
        assert torch.isfinite(ds[i]["hr"]).all()
    flat = PatchDataset(small_scans[:1], parse_spec("block:4x4"), (64, 64), length=2)
    assert flat[0]["hr"].shape == (1, 64, 64)


def test_a_batch_through_the_loader(mni: list[Volume]) -> None:
    ds = PatchDataset(mni, parse_spec("block:4x4"), (32, 32), length=8)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["hr"].shape == (4, 1, 32, 32) and batch["lowres"].shape == (4, 1, 8, 8)


@pytest.mark.parametrize(
    ("spec", "patch", "match"),
    [
        ("block:4x4", (30, 32), "not divisible"),
        ("block:1x1x4", (32, 32, 30), "not divisible"),
        ("block:4x4", (32, 32, 32), "differ in dimensions"),
        ("block:1x1x4", (32, 32), "differ in dimensions"),
    ],
)
def test_mismatched_patch_and_factors_raise(mni: list[Volume], spec: str, patch: tuple[int, ...], match: str) -> None:
    with pytest.raises(MedsrError, match=match):
        PatchDataset(mni, parse_spec(spec), patch, length=1)


def test_no_scans_raises() -> None:
    with pytest.raises(MedsrError, match="no scans"):
        PatchDataset([], parse_spec("block:4x4"), (32, 32), length=1)


def test_missing_scan_raises_medsr_error(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(MedsrError):
        load_volumes([str(tmp_path / "nothing.nii.gz")], IntensityConfig())


# --- training-time augmentation (data.augment) ---------------------------------------------------------------

ALL_ON = AugmentConfig(flip_prob=0.5, rot90_prob=0.75, curve_prob=0.5, gamma_prob=0.5, noise_prob=0.5,
                       noise_std=0.03)


def _hr(ds: PatchDataset, n: int) -> list[torch.Tensor]:
    return [ds[i]["hr"] for i in range(n)]


def test_augment_off_is_the_identity(mni: list[Volume]) -> None:
    """Defaults (and zero probabilities) give exactly the items a dataset without augmentation gives."""
    spec = parse_spec("kspace:4x4,noise=0.03")
    plain = PatchDataset(mni, spec, (32, 32), 20, seed=2)
    assert build_augment(AugmentConfig(), (32, 32), (4, 4)) is None
    for cfg in (AugmentConfig(), AugmentConfig(noise_std=0.5, gamma_range=(0.2, 3.0), zoom_out_max=3)):
        off = PatchDataset(mni, spec, (32, 32), 20, seed=2, augment=cfg)
        assert all(_same(plain[i], off[i]) for i in range(20))


def test_augment_is_reproducible(mni: list[Volume]) -> None:
    spec = parse_spec("block:4x4")
    ds = PatchDataset(mni, spec, (32, 32), 30, seed=3, augment=ALL_ON)
    first = [ds[i] for i in range(30)]
    again = PatchDataset(mni, spec, (32, 32), 30, seed=3, augment=ALL_ON)
    assert all(_same(first[i], again[i]) for i in (29, 0, 17, 5))  # any order, a fresh instance
    assert all(_same(first[i], ds[i]) for i in reversed(range(30)))
    other = PatchDataset(mni, spec, (32, 32), 30, seed=4, augment=ALL_ON)
    assert not _same(first[7], other[7])


def test_augment_changes_patches_when_on(mni: list[Volume]) -> None:
    spec = parse_spec("block:4x4")
    plain = _hr(PatchDataset(mni, spec, (32, 32), 40, seed=5), 40)
    on = _hr(PatchDataset(mni, spec, (32, 32), 40, seed=5, augment=ALL_ON), 40)
    changed = sum(not torch.equal(a, b) for a, b in zip(plain, on))
    assert changed >= 32  # P(untouched) = 0.5^2 * 0.25 * 0.5^3 ~ 0.8%; air patches can survive the curves


def test_flips_and_rotations_move_the_same_crop(mni: list[Volume]) -> None:
    """Geometry transforms act on the patch the un-augmented dataset cuts, and do exactly what they say."""
    spec = parse_spec("block:4x4")
    plain = _hr(PatchDataset(mni, spec, (32, 32), 12, seed=6), 12)
    flipped = _hr(PatchDataset(mni, spec, (32, 32), 12, seed=6, augment=AugmentConfig(flip_prob=1.0)), 12)
    for a, b in zip(plain, flipped):
        torch.testing.assert_close(b, torch.flip(a, dims=(1, 2)), rtol=0, atol=0)
    rotated = _hr(PatchDataset(mni, spec, (32, 32), 12, seed=6, augment=AugmentConfig(rot90_prob=1.0)), 12)
    ks = []
    for a, b in zip(plain, rotated):
        k = [k for k in (1, 2, 3) if torch.equal(b, torch.rot90(a, k, dims=(1, 2)))]
        assert k, "not a 90/180/270 degree rotation of the crop"
        ks.append(k[0])
    assert len(set(ks)) >= 2  # the angle is drawn per item


def test_intensity_curves_are_monotone_and_keep_the_range(mni: list[Volume]) -> None:
    """Curve and gamma reorder no voxel values and keep the patch minimum and maximum (air stays air)."""
    spec = parse_spec("block:4x4")
    plain = _hr(PatchDataset(mni, spec, (32, 32), 10, seed=7, foreground_fraction=1.0), 10)
    for cfg in (AugmentConfig(curve_prob=1.0), AugmentConfig(gamma_prob=1.0, gamma_range=(0.5, 2.0))):
        out = _hr(PatchDataset(mni, spec, (32, 32), 10, seed=7, foreground_fraction=1.0, augment=cfg), 10)
        for a, b in zip(plain, out):
            order = torch.argsort(a.flatten())
            assert torch.all(torch.diff(b.flatten()[order]) >= -1e-5)
            torch.testing.assert_close(b.min(), a.min(), atol=1e-5, rtol=0)
            torch.testing.assert_close(b.max(), a.max(), atol=1e-5, rtol=0)
        assert sum(not torch.allclose(a, b, atol=1e-3) for a, b in zip(plain, out)) >= 8


def test_noise_is_added_to_the_target_within_its_std(mni: list[Volume]) -> None:
    spec = parse_spec("block:4x4")
    plain = _hr(PatchDataset(mni, spec, (64, 64), 10, seed=8), 10)
    noisy = _hr(PatchDataset(mni, spec, (64, 64), 10, seed=8, augment=AugmentConfig(noise_prob=1.0, noise_std=0.05)),
                10)
    stds = [float((b - a).std()) for a, b in zip(plain, noisy)]
    assert all(s <= 0.05 * 1.1 for s in stds)
    assert max(stds) > 0.01 and len(set(stds)) == len(stds)  # a std drawn per item


@pytest.mark.parametrize(("spec", "patch"), [("block:4x4", (32, 32)), ("block:1x1x4", (16, 16, 16)),
                                             ("kspace:4x4", (32, 32))])
def test_augmented_items_are_consistent_pairs(mni: list[Volume], spec: str, patch: tuple[int, ...]) -> None:
    """Augmentation happens before degradation: degrading the augmented target gives the input."""
    parsed = parse_spec(spec)
    ds = PatchDataset(mni, parsed, patch, 6, seed=9, augment=ALL_ON)
    for i in range(len(ds)):
        item = ds[i]
        hr = item["hr"][None]
        low = apply_degradation(hr, draw_params(parsed, np.random.default_rng()))
        torch.testing.assert_close(item["lowres"][None], low)
        torch.testing.assert_close(item["cond"][None], upsample(low, parsed.factors))


def test_augment_through_a_worker_loader(mni: list[Volume]) -> None:
    """Worker processes (pickled dataset) give the same augmented batches as the main process."""
    ds = PatchDataset(mni, parse_spec("block:4x4"), (32, 32), 8, seed=10, augment=ALL_ON)
    main = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    worker = next(iter(torch.utils.data.DataLoader(ds, batch_size=8, num_workers=1)))
    assert _same(main, worker)
    assert type(main["hr"]) is torch.Tensor


def _ramp(shape: tuple[int, int, int]) -> list[Volume]:
    """A volume whose value is a linear function of the voxel index (x + 100 y + 10^4 z, x and y < 100, exact in
    float32): a patch's steps along each axis (block averaging keeps it linear) say how many voxels each patch
    voxel spans."""
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    data = (x + 100 * y + 1e4 * z).astype(np.float32)
    return [Volume("ramp", data, np.argwhere(np.ones(shape, bool)).astype(np.int32))]


@pytest.mark.parametrize(("patch", "spec", "steps"), [((16, 16), "block:1x4", (1.0, 100.0)),
                                                      ((8, 8, 8), "block:1x1x4", (1.0, 100.0, 1e4))])
def test_zoom_out_block_averages_a_larger_window(patch: tuple[int, ...], spec: str, steps: tuple[float, ...]) -> None:
    """Zoomed-out items are a z-times larger window block-averaged to the patch (each voxel spans z voxels on every
    patch axis), z drawn among 2..zoom_out_max; the rest are plain crops; the input is the zoomed target degraded."""
    vols = _ramp((96, 96, 24))
    parsed = parse_spec(spec)
    ds = PatchDataset(vols, parsed, patch, 60, seed=4, slice_axis=2,
                      augment=AugmentConfig(zoom_out_prob=0.5, zoom_out_max=3))
    zooms = []
    for i in range(len(ds)):
        item = ds[i]
        hr = item["hr"][0].double()
        diffs = [torch.diff(hr, dim=d) for d in range(hr.ndim)]
        assert all(float(d.max() - d.min()) < 1e-2 for d in diffs)  # one step per axis: a linear ramp still
        step = [float(d.mean()) for d in diffs]
        z = round(step[0] / steps[0])
        assert z in (1, 2, 3) and step == pytest.approx([z * s for s in steps], rel=1e-5), step
        zooms.append(z)
        low = apply_degradation(item["hr"][None], draw_params(parsed, np.random.default_rng()))
        torch.testing.assert_close(item["lowres"][None], low)
    assert set(zooms) == {1, 2, 3} and 15 <= zooms.count(1) <= 45
    again = PatchDataset(vols, parsed, patch, 60, seed=4, slice_axis=2,
                         augment=AugmentConfig(zoom_out_prob=0.5, zoom_out_max=3))
    assert all(_same(ds[i], again[i]) for i in (0, 31, 59))


@pytest.mark.parametrize(
    ("cfg", "patch", "match"),
    [
        (AugmentConfig(flip_prob=1.5), (32, 32), "flip_prob"),
        (AugmentConfig(noise_prob=-0.1), (32, 32), "noise_prob"),
        (AugmentConfig(rot90_prob=0.5), (32, 16), "no two axes"),
        (AugmentConfig(curve_prob=0.5, curve_points=(2, 5)), (32, 32), "curve_points"),
        (AugmentConfig(gamma_prob=0.5, gamma_range=(1.5, 0.7)), (32, 32), "gamma_range"),
        (AugmentConfig(zoom_out_prob=1.2), (32, 32), "zoom_out_prob"),
        (AugmentConfig(zoom_out_prob=0.5, zoom_out_max=1), (32, 32), "zoom_out_max"),
    ],
)
def test_bad_augment_settings_raise(mni: list[Volume], cfg: AugmentConfig, patch: tuple[int, ...], match: str) -> None:
    with pytest.raises(MedsrError, match=match):
        PatchDataset(mni, parse_spec("block:4x4"), patch, 1, augment=cfg)


def test_augment_section_in_configs() -> None:
    """v0.1 configs (no augment section) load with augmentation off; the v2 config turns it on."""
    root = Path(__file__).resolve().parents[1]
    old = load_config(root / "configs" / "default_model_v01.yaml")
    assert old.data.augment == AugmentConfig()
    v2 = load_config(root / "configs" / "inplane_v2.yaml", ["data.augment.noise_std=0.01"])
    assert v2.data.augment.flip_prob > 0 and v2.data.augment.curve_prob > 0
    assert v2.data.augment.noise_std == 0.01 and isinstance(v2.data.augment.gamma_range, tuple)
    assert to_dict(v2)["data"]["augment"]["noise_std"] == 0.01
    with pytest.raises(MedsrError, match="unknown keys"):
        load_config(root / "configs" / "inplane_v2.yaml", ["data.augment.rotate=1"])
