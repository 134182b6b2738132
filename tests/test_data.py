"""Patch datasets on real scans: reproducible items, foreground weighting, 2D/3D shapes, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsr.data import PatchDataset, Volume, load_volumes
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
