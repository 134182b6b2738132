"""Degradation operators: shapes, exactness of the linear operators and their projections, reproducibility,
spec parsing, the low-dose noise model on a real CT, and agreement of ``upsample`` with ``refined_affine``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsr.degrade import (
    DegradeParams,
    DegradeSpec,
    apply_degradation,
    block_average,
    block_average_adjoint,
    draw_params,
    kspace_truncate,
    kspace_zero_fill,
    parse_spec,
    upsample,
)
from medsr.errors import MedsrError
from medsr.intensity import IntensityConfig, fit_normaliser
from medsr.io import refined_affine
from medsr.io.refs import load_ref


@pytest.fixture(scope="module")
def ct_slice() -> torch.Tensor:
    """A real CT slice (pydicom's CT_small.dcm, 128 x 128 HU) normalised with the CT window: ``(1, 1, 128, 128)``."""
    scan = load_ref("pydicom:CT_small.dcm")
    norm = fit_normaliser(scan.array, scan.modality, IntensityConfig())
    return torch.from_numpy(norm.normalise(scan.array[0, :, :, 0]))[None, None]


@pytest.fixture(scope="module")
def mr_block() -> torch.Tensor:
    """A real T1 block (nibabel's anatomical.nii), percentile-normalised: ``(1, 1, 32, 40, 24)``."""
    scan = load_ref("nibabel:anatomical.nii")
    norm = fit_normaliser(scan.array, "MR", IntensityConfig())
    return torch.from_numpy(norm.normalise(scan.array[0, :32, :40, :24]))[None, None]


def _params(text: str, seed: int = 0) -> DegradeParams:
    return draw_params(parse_spec(text), np.random.default_rng(seed))


# --- shapes -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("spec", "shape", "expected"),
    [
        ("block:4x4", (2, 1, 32, 32), (2, 1, 8, 8)),
        ("block:2x4,sigma=1", (1, 1, 32, 32), (1, 1, 16, 8)),
        ("kspace:4x4,noise=0.02", (1, 1, 32, 32), (1, 1, 8, 8)),
        ("lowdose:1x1,dose=0.25", (1, 1, 32, 32), (1, 1, 32, 32)),
        ("lowdose:2x2,dose=0.25", (1, 1, 32, 32), (1, 1, 16, 16)),
        ("block:1x1x4", (1, 1, 16, 16, 32), (1, 1, 16, 16, 8)),
        ("block:2x2x2", (1, 1, 16, 16, 16), (1, 1, 8, 8, 8)),
        ("kspace:1x1x4", (1, 1, 16, 16, 32), (1, 1, 16, 16, 8)),
    ],
)
def test_shapes_and_upsampled_condition(spec: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    x = torch.rand(shape) * 2 - 1
    y = apply_degradation(x, _params(spec))
    assert y.shape == expected
    assert y.dtype == x.dtype
    assert upsample(y, parse_spec(spec).factors).shape == x.shape


def test_through_plane_only_touches_the_slice_axis(mr_block: torch.Tensor) -> None:
    y = block_average(mr_block, (1, 1, 4))
    expected = mr_block.reshape(1, 1, 32, 40, 6, 4).mean(-1)
    torch.testing.assert_close(y, expected)


def test_wrong_image_for_spec_raises() -> None:
    with pytest.raises(MedsrError, match="not divisible"):
        apply_degradation(torch.zeros(1, 1, 30, 32), _params("block:4x4"))
    with pytest.raises(MedsrError, match="spatial axes"):
        apply_degradation(torch.zeros(1, 1, 32, 32), _params("block:1x1x4"))


# --- linear operators keep constants, and projections are exact -------------------------------------------

@pytest.mark.parametrize("factors", [(4, 4), (1, 1, 4), (2, 3, 2)])
def test_block_average_and_kspace_keep_a_constant(factors: tuple[int, ...]) -> None:
    shape = (1, 1, *[12 * f for f in factors])
    x = torch.full(shape, 0.37, dtype=torch.float64)
    coarse = (1, 1, *[12] * len(factors))
    torch.testing.assert_close(block_average(x, factors), torch.full(coarse, 0.37, dtype=torch.float64))
    torch.testing.assert_close(kspace_truncate(x, factors), torch.full(coarse, 0.37, dtype=torch.float64))


def test_adjoints_are_right_inverses(ct_slice: torch.Tensor, mr_block: torch.Tensor) -> None:
    y2 = block_average(ct_slice.double(), (4, 4))
    torch.testing.assert_close(block_average(block_average_adjoint(y2, (4, 4)), (4, 4)), y2)
    y3 = block_average(mr_block.double(), (1, 1, 4))
    torch.testing.assert_close(block_average(block_average_adjoint(y3, (1, 1, 4)), (1, 1, 4)), y3)
    # k-space: exact for any y in the operator's range (its spectrum has no unpaired Nyquist bin)
    k2 = kspace_truncate(ct_slice.double(), (4, 4))
    # (the FFT runs in float32 whatever the input dtype)
    torch.testing.assert_close(kspace_truncate(kspace_zero_fill(k2, (4, 4)), (4, 4)), k2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("spec", ["block:4x4", "kspace:4x4", "kspace:2x4", "block:1x4,profile=gaussian"])
def test_projection_makes_2d_estimate_consistent(spec: str, ct_slice: torch.Tensor) -> None:
    s = parse_spec(spec)
    assert s.has_projection
    x = ct_slice.double()
    y = apply_degradation(x, draw_params(s, np.random.default_rng(0)))
    guess = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fixed = s.project(guess, y)
    tol = {"atol": 1e-6, "rtol": 1e-5} if s.kind == "kspace" else {}  # k-space FFTs run in float32
    torch.testing.assert_close(apply_degradation(fixed, draw_params(s, np.random.default_rng(0))), y, **tol)
    # a consistent image is left alone
    torch.testing.assert_close(s.project(fixed, y), fixed, **tol)


@pytest.mark.parametrize("spec", ["block:1x1x4", "kspace:1x1x4", "kspace:2x2x2", "block:1x1x4,profile=gaussian"])
def test_projection_makes_3d_estimate_consistent(spec: str, mr_block: torch.Tensor) -> None:
    s = parse_spec(spec)
    x = mr_block.double()
    y = apply_degradation(x, draw_params(s, np.random.default_rng(0)))
    guess = upsample(y, s.factors) + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2),
                                                        dtype=torch.float64)
    fixed = s.project(guess, y)
    tol = {"atol": 1e-6, "rtol": 1e-5} if s.kind == "kspace" else {}
    torch.testing.assert_close(apply_degradation(fixed, draw_params(s, np.random.default_rng(0))), y, **tol)
    assert (fixed - x).abs().mean() < (guess - x).abs().mean()  # projecting onto the truth's set helps


def test_no_projection_for_noisy_or_blurred_operators() -> None:
    for text in ("block:4x4,sigma=1", "kspace:4x4,noise=0.02", "lowdose:1x1,dose=0.5"):
        s = parse_spec(text)
        assert not s.has_projection
        x0 = torch.rand(1, 1, 16, 16)
        assert s.project(x0, torch.zeros(1, 1, 4, 4)) is x0


# --- reproducibility -------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["kspace:4x4,noise=0.05", "lowdose:1x1,dose=0.25", "lowdose:2x2,dose=0.1"])
def test_same_params_same_output_different_seed_different_noise(spec: str, ct_slice: torch.Tensor) -> None:
    s = parse_spec(spec)
    p = draw_params(s, np.random.default_rng(7))
    assert p == draw_params(s, np.random.default_rng(7))
    a, b = apply_degradation(ct_slice, p), apply_degradation(ct_slice.clone(), p)
    assert torch.equal(a, b)
    other = draw_params(s, np.random.default_rng(8))
    assert other.noise_seed != p.noise_seed
    c = apply_degradation(ct_slice, other)
    assert not torch.equal(a, c)
    # the noise-free part is the same: only the (zero-mean) noise differs
    assert abs(float((a - c).mean())) < 0.01


def test_parse_roundtrip() -> None:
    for text in ("block:4x4", "block:1x1x4,sigma=1", "kspace:4x4,noise=0.02", "lowdose:1x1,dose=0.25"):
        s = parse_spec(text)
        assert str(s) == text
        assert parse_spec(str(s)) == s
    assert parse_spec(" BLOCK:4X4").kind == "block"


@pytest.mark.parametrize(
    "text",
    ["block", "blur:4x4", "block:4", "block:4x4x4x4", "block:0x4", "block:-2x4", "block:axb",
     "block:4x4,foo=1", "block:4x4,sigma=abc", "lowdose:1x1,dose=0", "lowdose:1x1,dose=1.5", ""],
)
def test_bad_specs_raise_medsr_error(text: str) -> None:
    with pytest.raises(MedsrError, match="degradation spec"):
        parse_spec(text)


# --- low-dose noise model -----------------------------------------------------------------------------

def test_low_dose_noise_variance_grows_as_dose_falls(ct_slice: torch.Tensor) -> None:
    """Measured on a real CT slice: the added noise variance is proportional to (1/d - 1) (see low_dose_noise_hu)."""
    variances = []
    for dose in (0.9, 0.5, 0.25, 0.1):
        out = apply_degradation(ct_slice, _params(f"lowdose:1x1,dose={dose}", seed=3))
        variances.append(float((out - ct_slice).var()))
    assert all(a < b for a, b in zip(variances, variances[1:])), variances
    # the model's shape: variance proportional to (1/d - 1) (same seed: same unit noise, only the scale moves)
    ratio = variances[3] / variances[2]
    assert ratio == pytest.approx((1 / 0.1 - 1) / (1 / 0.25 - 1), rel=0.05)
    # scale: about 10 HU at full-dose-equivalent attenuation, i.e. quarter dose well under 50 HU
    assert 0 < np.sqrt(variances[2]) * 1024 < 50
    # full dose adds nothing
    assert torch.equal(apply_degradation(ct_slice, _params("lowdose:1x1,dose=1")), ct_slice)


def test_low_dose_noise_falls_with_averaged_voxels(ct_slice: torch.Tensor) -> None:
    p1, p2 = _params("lowdose:1x1,dose=0.25", 4), _params("lowdose:2x2,dose=0.25", 4)
    v1 = float((apply_degradation(ct_slice, p1) - ct_slice).var())
    clean2 = block_average(ct_slice, (2, 2))
    v2 = float((apply_degradation(ct_slice, p2) - clean2).var())
    assert v2 < v1 / 2


# --- geometry: upsample agrees with refined_affine -----------------------------------------------------

def _world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3).astype(float)
    return (idx @ affine[:3, :3].T + affine[:3, 3]).reshape(*shape, 3)


@pytest.mark.parametrize("factors", [(4, 4, 1), (2, 3, 1), (1, 1, 4), (2, 2, 3)])
def test_upsample_matches_refined_affine(factors: tuple[int, int, int]) -> None:
    """A linear ramp in world mm sampled on the coarse grid and upsampled agrees with the ramp sampled on the
    fine grid that ``refined_affine`` describes (interior only: interpolation clamps at the borders).

    Trilinear (3D) reproduces a ramp exactly. PyTorch's bicubic (Keys, a = -0.75) does not: it leaves a small
    periodic error that is symmetric within each block, so in 2D the block means must agree exactly (no shift)
    and the pointwise error must stay well below the half-voxel offset the unshifted affine would give.
    """
    rot = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    coarse_affine = np.eye(4)
    coarse_affine[:3, :3] = rot @ np.diag([0.9, 1.3, 4.0])
    coarse_affine[:3, 3] = [-40.0, 12.5, 7.0]
    coarse_shape = (12, 10, 8) if factors[2] > 1 else (12, 10, 1)
    w, b = np.array([0.03, -0.02, 0.05]), 0.1
    coarse = _world(coarse_affine, coarse_shape) @ w + b
    fine_shape = tuple(n * f for n, f in zip(coarse_shape, factors))
    fine_true = _world(refined_affine(coarse_affine, factors), fine_shape) @ w + b
    unshifted = coarse_affine.copy()
    unshifted[:3, :3] = coarse_affine[:3, :3] / np.array(factors)
    fine_wrong = _world(unshifted, fine_shape) @ w + b
    t = torch.from_numpy(coarse)[None, None]
    two_d = factors[2] == 1
    up = upsample(t[..., 0], factors[:2])[0, 0].numpy()[..., None] if two_d else upsample(t, factors)[0, 0].numpy()
    assert up.shape == fine_shape
    inner = tuple(slice(2 * f, n - 2 * f) if f > 1 else slice(None) for n, f in zip(fine_shape, factors))
    err, err_wrong = (up - fine_true)[inner], (up - fine_wrong)[inner]
    offset = np.abs(err_wrong.mean())
    assert offset > 1e-3  # the classic half-voxel bug would be visible
    if not two_d:
        np.testing.assert_allclose(err, 0.0, atol=1e-9)
        return
    blocks = err.reshape(err.shape[0] // factors[0], factors[0], err.shape[1] // factors[1], factors[1], 1)
    np.testing.assert_allclose(blocks.mean(axis=(1, 3)), 0.0, atol=1e-9)
    assert np.abs(err).max() < 0.5 * np.abs(err_wrong).max()


# --- the operator object: one forward operator for pairs, projection and consistency checks ------------------

@pytest.mark.parametrize("text", ["block:4x4", "block:2x2,sigma=1.0", "kspace:4x4", "lowdose:2x2,dose=0.25"])
def test_forward_is_the_noise_free_part_of_the_degradation(text: str, ct_slice: torch.Tensor) -> None:
    s = parse_spec(text)
    x = ct_slice.double()
    clean = DegradeSpec(s.kind, s.factors, s.sigma, 0.0, 1.0)  # same operator without noise
    torch.testing.assert_close(apply_degradation(x, draw_params(clean, np.random.default_rng(0))), s.forward(x))
    if s.sigma > 0:  # the blur is part of A: a plain block average is a different operator
        assert float((s.forward(x) - block_average(x, s.factors)).abs().max()) > 1e-3


def test_right_inverse_exists_only_where_exact(ct_slice: torch.Tensor) -> None:
    for text in ("block:4x4", "kspace:4x4"):
        s = parse_spec(text)
        y = s.forward(ct_slice.double())
        torch.testing.assert_close(s.forward(s.right_inverse(y)), y, atol=1e-6, rtol=1e-5)
    with pytest.raises(MedsrError, match="no exact right inverse"):
        parse_spec("block:2x2,sigma=1").right_inverse(torch.zeros(1, 1, 4, 4))


# --- Gaussian slice profile -------------------------------------------------------------------------------------

def test_gaussian_profile_parses_and_box_stays_the_default() -> None:
    s = parse_spec("block:1x4,profile=gaussian")
    assert s.profile == "gaussian" and str(s) == "block:1x4,profile=gaussian" and parse_spec(str(s)) == s
    assert parse_spec("block:1x4").profile == "box" and str(parse_spec("block:1x4")) == "block:1x4"
    assert s != parse_spec("block:1x4")
    for bad in ("block:1x4,profile=triangle", "kspace:1x4,profile=gaussian", "lowdose:1x4,profile=gaussian"):
        with pytest.raises(MedsrError, match="profile"):
            parse_spec(bad)


@pytest.mark.parametrize(("factors", "shape"), [((1, 4), (2, 1, 12, 32)), ((4, 4), (1, 1, 16, 16)),
                                                ((1, 1, 4), (1, 1, 4, 6, 20))])
def test_gaussian_profile_keeps_a_constant_up_to_the_edges(factors: tuple[int, ...], shape: tuple[int, ...]) -> None:
    spec = parse_spec(f"block:{'x'.join(map(str, factors))},profile=gaussian")
    y = spec.forward(torch.full(shape, 0.37, dtype=torch.float64))
    assert y.shape[2:] == tuple(n // f for n, f in zip(shape[2:], factors))
    torch.testing.assert_close(y, torch.full_like(y, 0.37))


def test_gaussian_profile_weights_neighbouring_slices_where_the_box_does_not() -> None:
    """A single bright thin slice inside block 3 shows in thick slices 2 and 4 with a Gaussian profile of FWHM 4
    (half maximum at 2 thin slices from the block centre), never with a box; both are centred on the block."""
    x = torch.zeros(1, 1, 1, 32, dtype=torch.float64)
    x[..., 12] = 1.0  # first thin slice of block 3 (slices 12-15, centre 13.5)
    gauss = parse_spec("block:1x4,profile=gaussian").forward(x)[0, 0, 0]
    box = parse_spec("block:1x4").forward(x)[0, 0, 0]
    assert box[2] == 0 and box[4] == 0 and box[3] == 0.25
    assert gauss[2] > 0.05 and gauss[3] > gauss[2] > gauss[4] > 0  # slice 12 is nearer block 2's centre (9.5)
    ramp = torch.arange(32, dtype=torch.float64).view(1, 1, 1, 32)  # a symmetric profile reads a ramp at its centre
    centres = torch.arange(8, dtype=torch.float64) * 4 + 1.5
    torch.testing.assert_close(parse_spec("block:1x4,profile=gaussian").forward(ramp)[0, 0, 0, 2:6], centres[2:6])


def test_gaussian_right_inverse_is_exact(ct_slice: torch.Tensor) -> None:
    spec = parse_spec("block:4x4,profile=gaussian")
    y = spec.forward(ct_slice.double())
    torch.testing.assert_close(spec.forward(spec.right_inverse(y)), y)
    assert spec.has_projection and not parse_spec("block:1x4,sigma=1,profile=gaussian").has_projection
