"""Intensity normalisation on real scans: exact inverse, the fixed CT window, per-scan MR percentiles."""

from __future__ import annotations

import numpy as np
import pytest

from medsr.intensity import IntensityConfig, Normaliser, fit_normaliser
from medsr.io.refs import load_ref

CT_REFS = ["pydicom:CT_small.dcm", "pydicom:693_UNCR.dcm", "invesalius:Cranium"]
MR_REFS = ["pydicom:MR_small.dcm", "pydicom:MR2_UNCR.dcm", "nilearn:mni152", "nibabel:anatomical.nii"]


def _scan(ref: str):  # noqa: ANN202 - a medsr.io.Scan
    try:
        return load_ref(ref)
    except Exception as exc:  # an optional data package missing on this machine
        pytest.skip(f"{ref} not available ({exc})")


@pytest.mark.parametrize("ref", CT_REFS)
def test_ct_roundtrip_is_exact_in_hu(ref: str) -> None:
    scan = _scan(ref)
    assert scan.modality == "CT"
    hu = scan.array
    norm = fit_normaliser(hu, scan.modality)
    back = norm.denormalise(norm.normalise(hu))
    assert back.dtype == np.float32 and back.shape == hu.shape
    np.testing.assert_allclose(back, hu, rtol=0, atol=2e-3 * max(1.0, float(np.abs(hu).max()) / 1024))
    # stored CT values are integers: rounding gives them back bit for bit
    assert np.array_equal(np.round(back), hu)


@pytest.mark.parametrize("ref", CT_REFS)
def test_ct_uses_the_fixed_window(ref: str) -> None:
    scan = _scan(ref)
    norm = fit_normaliser(scan.array, "CT", IntensityConfig(ct_window=(-1024.0, 1024.0)))
    assert (norm.lo, norm.hi, norm.kind) == (-1024.0, 1024.0, "ct_window")
    y = norm.normalise(np.array([-1024.0, 0.0, 1024.0, 3000.0]))
    np.testing.assert_allclose(y, [-1.0, 0.0, 1.0, 3000 / 1024], rtol=1e-6)  # never clipped
    # the same HU mean the same normalised value in every CT scan (air -1000 HU, water 0 HU)
    assert norm.normalise(scan.array).max() > 1.0  # bone above the window keeps its value
    other = fit_normaliser(np.zeros((1, 4, 4, 1)), "ct")
    assert (other.lo, other.hi) == (norm.lo, norm.hi)


@pytest.mark.parametrize("ref", MR_REFS)
def test_mr_roundtrip_and_percentiles(ref: str) -> None:
    scan = _scan(ref)
    x = scan.array
    norm = fit_normaliser(x, "MR")
    assert norm.kind == "percentile"
    lo, hi = np.percentile(x.astype(np.float32), (0.5, 99.5))
    assert norm.lo == pytest.approx(float(lo)) and norm.hi == pytest.approx(float(hi))
    y = norm.normalise(x)
    np.testing.assert_allclose(np.percentile(y, (0.5, 99.5)), [-1.0, 1.0], atol=1e-4)
    back = norm.denormalise(y)
    scale = float(np.abs(x).max())
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-5 * scale + 1e-6)
    # per-scan: another percentile setting gives another mapping, and the extremes are not clipped
    wide = fit_normaliser(x, "MR", IntensityConfig(mr_percentiles=(0.0, 100.0)))
    assert (wide.lo, wide.hi) == (pytest.approx(float(x.min())), pytest.approx(float(x.max())))
    assert y.max() >= 1.0 and y.min() <= -1.0


def test_unknown_modality_uses_percentiles_and_constant_image_stays_invertible() -> None:
    mni = _scan("nilearn:mni152")
    assert mni.modality == ""
    assert fit_normaliser(mni.array, mni.modality).kind == "percentile"
    flat = np.full((1, 8, 8, 1), 42.0, np.float32)
    norm = fit_normaliser(flat, "MR")
    assert norm.hi > norm.lo
    np.testing.assert_array_equal(norm.denormalise(norm.normalise(flat)), flat)


def test_scale_std_has_no_offset() -> None:
    norm = Normaliser(-1024.0, 1024.0, "ct_window")
    np.testing.assert_allclose(norm.scale_std(np.array([0.01, 1.0])), [10.24, 1024.0], rtol=1e-6)
    assert norm.to_dict() == {"lo": -1024.0, "hi": 1024.0, "kind": "ct_window"}
