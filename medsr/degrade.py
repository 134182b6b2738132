"""Degradation operators that make the low-resolution / low-dose input from a high-quality scan.

Every operator is a deterministic function of the image and explicit parameters; randomness (noise) comes only
from a seed drawn beforehand by :func:`draw_params`, so each training pair is reproducible (the torchio split).
All functions take torch tensors ``(B, C, *spatial)`` with 2 or 3 spatial axes, in normalised units ([-1, 1],
see :mod:`medsr.intensity`); the linear operators (block average, k-space truncation) commute with that affine
normalisation, so they mean the same thing in scan units.

A spec string names a degradation everywhere (configs, ``medsr evaluate --degrade``):
``KIND:FxFxF[,key=value...]``, e.g. ``block:4x4``, ``block:1x1x4,sigma=1.0``, ``kspace:4x4,noise=0.02``,
``lowdose:1x1,dose=0.25`` (pure denoising), ``lowdose:2x2,dose=0.25`` (low dose and thick voxels),
``block:1x4,profile=gaussian`` (thick slices with a Gaussian slice profile instead of a box).

"lowdose" is a realistic CT simulator (Poisson counts in a parallel-beam sinogram, FBP; see
:func:`low_dose_noise_hu` and :class:`LowDoseModel`); it works in HU, through the CT window of the normalisation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

from medsr.errors import MedsrError

__all__ = [
    "DegradeSpec",
    "DegradeParams",
    "parse_spec",
    "draw_params",
    "apply_degradation",
    "block_average",
    "block_average_adjoint",
    "profile_matrices",
    "apply_profile",
    "kspace_truncate",
    "kspace_zero_fill",
    "psf_blur",
    "rician_noise",
    "low_dose_noise",
    "low_dose_noise_hu",
    "simulate_low_dose",
    "clean_sinogram",
    "radon_parallel",
    "fbp_parallel",
    "LowDoseModel",
    "upsample",
]

KINDS = ("block", "kspace", "lowdose")
PROFILES = ("box", "gaussian")  # slice profile of a block average: box (default) or Gaussian, FWHM = the block
CT_WINDOW = (-1024.0, 1024.0)  # HU mapped to [-1, 1] (medsr.intensity.IntensityConfig default)


@dataclass(frozen=True)
class DegradeSpec:
    """A degradation: kind, integer factors per spatial axis, and its scalar options.

    Attributes:
        kind: "block" (block average, thick slices / large voxels), "kspace" (central k-space only, MRI) or
            "lowdose" (CT noise, optionally with block averaging by ``factors``).
        factors: integer downsampling factor per spatial axis (2 or 3 values).
        sigma: Gaussian point-spread blur (std, in fine voxels) applied before block averaging.
        noise: Rician noise std (normalised units) after k-space truncation.
        dose: dose fraction in (0, 1] of the full-dose photon count, for "lowdose" (see :class:`LowDoseModel`).
        profile: slice profile of a "block" average: "box" (each coarse voxel the plain mean of its block, the
            default) or "gaussian" (a Gaussian weighting of the fine voxels centred on the block, FWHM = the
            factor: a real MR slice profile is closer to this than to a box; :func:`profile_matrices`).
    """

    kind: str = "block"
    factors: tuple[int, ...] = (4, 4)
    sigma: float = 0.0
    noise: float = 0.0
    dose: float = 1.0
    profile: str = "box"
    options: dict[str, float] = field(default_factory=dict, compare=False, hash=False)

    def __str__(self) -> str:
        text = f"{self.kind}:{'x'.join(str(f) for f in self.factors)}"
        for key, default in (("sigma", 0.0), ("noise", 0.0), ("dose", 1.0)):
            value = getattr(self, key)
            if value != default:
                text += f",{key}={value:g}"
        if self.profile != "box":
            text += f",profile={self.profile}"
        return text

    @property
    def spatial_dims(self) -> int:
        return len(self.factors)

    @property
    def has_projection(self) -> bool:
        """Whether an exact data-consistency projection exists (noise-free linear operator; never for lowdose)."""
        return self.kind == "block" and self.sigma == 0.0 or self.kind == "kspace" and self.noise == 0.0

    @property
    def white_noise_gain(self) -> float | None:
        """By how much white noise's std at the fine grid exceeds its std after A: ``sqrt(prod(factors))`` for
        a plain (box) block average or k-space truncation; None where the input's noise says nothing simple about
        the truth's (blur, a Gaussian slice profile, added noise, low dose)."""
        plain = (self.kind == "block" and self.sigma == 0.0 and self.profile == "box"
                 or self.kind == "kspace" and self.noise == 0.0)
        return math.sqrt(math.prod(self.factors)) if plain else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The noise-free forward operator A (fine → coarse): PSF and block average, or k-space truncation.

        For "lowdose" it is the block average by ``factors`` alone (the identity for a pure denoiser, 1x1): the
        dose only adds noise, and noise is not part of A.

        The one definition every caller uses: training pairs (plus noise), data-consistency checks of outputs,
        and evaluation.
        """
        _check_shape(x, self.factors)
        if self.kind == "kspace":
            return kspace_truncate(x, self.factors)
        if self.profile == "gaussian":
            return apply_profile(psf_blur(x, self.sigma) if self.sigma > 0 else x, self.factors, inverse=False)
        return block_average(psf_blur(x, self.sigma) if self.sigma > 0 else x, self.factors)

    def right_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """A⁺ with A(A⁺y) = y for the noise-free operators without blur: repeat (block) or zero-fill (k-space)."""
        if self.kind == "kspace":
            return kspace_zero_fill(y, self.factors)
        if self.sigma > 0:
            raise MedsrError(f"degradation {self}: a blurred block average has no exact right inverse")
        if self.profile == "gaussian":
            return apply_profile(y, self.factors, inverse=True)
        return block_average_adjoint(y, self.factors)

    def project(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Range/null-space projection (DDNM, Wang et al. 2023): ``x0 + A⁺(y − A x0)``, so ``A(result) = y``.

        Exact for noise-free block averaging and k-space truncation; for operators without an exact projection
        (noise, blur; every "lowdose" spec, whose input is noisy: projecting onto it would put the noise back)
        ``x0`` is returned unchanged; check :attr:`has_projection`.
        """
        if not self.has_projection:
            return x0
        return x0 + self.right_inverse(y - self.forward(x0))


def parse_spec(text: str | DegradeSpec) -> DegradeSpec:
    """Parse ``KIND:FxF[xF][,key=value...]`` into a :class:`DegradeSpec`, with a clear error."""
    if isinstance(text, DegradeSpec):
        return text
    try:
        kind, rest = str(text).split(":", 1)
        parts = rest.split(",")
        factors = tuple(int(f) for f in parts[0].lower().split("x"))
        pairs = {k.strip().lower(): v.strip() for k, v in (p.split("=", 1) for p in parts[1:] if p.strip())}
        profile = pairs.pop("profile", "box").lower()
        opts = {k: float(v) for k, v in pairs.items()}
    except ValueError:
        raise MedsrError(f"degradation spec {text!r}: expected KIND:FxF[xF][,key=value], e.g. 'block:4x4'") from None
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise MedsrError(f"degradation spec {text!r}: kind must be one of {KINDS}")
    if len(factors) not in (2, 3) or any(f < 1 for f in factors):
        raise MedsrError(f"degradation spec {text!r}: need 2 or 3 positive integer factors")
    unknown = set(opts) - {"sigma", "noise", "dose"}
    if unknown:
        raise MedsrError(f"degradation spec {text!r}: unknown options {sorted(unknown)}")
    if profile not in PROFILES:
        raise MedsrError(f"degradation spec {text!r}: profile must be one of {PROFILES}")
    if profile != "box" and kind != "block":
        raise MedsrError(f"degradation spec {text!r}: a slice profile applies to block averages only")
    dose = opts.get("dose", 1.0)
    if not 0.0 < dose <= 1.0:
        raise MedsrError(f"degradation spec {text!r}: dose must be in (0, 1]")
    return DegradeSpec(kind, factors, opts.get("sigma", 0.0), opts.get("noise", 0.0), dose, profile)


@dataclass(frozen=True)
class DegradeParams:
    """Everything random about one degradation, drawn up front: only the noise seed here."""

    spec: DegradeSpec
    noise_seed: int


def draw_params(spec: DegradeSpec, rng: np.random.Generator) -> DegradeParams:
    """The random half of the random/deterministic split: draw the parameters, touch no image."""
    return DegradeParams(spec, int(rng.integers(0, 2**62)))


def apply_degradation(x: torch.Tensor, params: DegradeParams, pixel_mm: float = 1.0,
                      window: tuple[float, float] = CT_WINDOW) -> torch.Tensor:
    """Degrade ``x`` ``(B, C, *spatial)`` deterministically; returns the coarse-grid input ``(B, C, *spatial/f)``.

    ``lowdose``: sinogram-domain CT noise (:func:`low_dose_noise_hu`) on the fine grid, then the block average;
    ``pixel_mm`` (in-plane voxel size) and ``window`` (the CT HU window of the normalisation) are used by it only.
    """
    spec = params.spec
    _check_shape(x, spec.factors)
    gen = torch.Generator(device=x.device).manual_seed(params.noise_seed)
    if spec.kind == "lowdose":
        return spec.forward(low_dose_noise(x, spec.dose, gen, pixel_mm, window))
    y = spec.forward(x)
    if spec.kind == "kspace" and spec.noise > 0:
        return rician_noise(y, spec.noise, gen)
    return y


def _check_shape(x: torch.Tensor, factors: Sequence[int]) -> None:
    spatial = x.shape[2:]
    if len(spatial) != len(factors):
        raise MedsrError(f"degradation has {len(factors)} factors but the image has {len(spatial)} spatial axes")
    if any(s % f for s, f in zip(spatial, factors)):
        raise MedsrError(f"image size {tuple(spatial)} is not divisible by the factors {tuple(factors)}")


def block_average(x: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Mean over non-overlapping blocks of ``factors`` voxels: what a thicker slice or larger voxel records."""
    k = tuple(int(f) for f in factors)
    pool = F.avg_pool2d if len(k) == 2 else F.avg_pool3d
    return pool(x, kernel_size=k, stride=k)


def block_average_adjoint(y: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Right inverse of :func:`block_average` (repeat each coarse value over its block): A(A⁺y) = y."""
    out = y
    for axis, f in enumerate(factors):
        out = out.repeat_interleave(int(f), dim=2 + axis)
    return out


@functools.lru_cache(maxsize=32)
def profile_matrices(n_fine: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """The Gaussian slice-profile operator along one axis and its right inverse, ``(n/f, n)`` and ``(n, n/f)``.

    Coarse voxel ``j`` records the fine voxels weighted by a Gaussian centred on its block's centre
    (``j f + (f-1)/2``) with FWHM ``f`` fine voxels (the thick slice's spacing). Rows are normalised to sum to
    one over the voxels inside the image, so a constant keeps its value (also at the edges, where the profile
    is cut). The right inverse is the minimum-norm one, ``Aᵀ(AAᵀ)⁻¹``, so ``A A⁺ = I`` (exact data consistency).
    """
    if n_fine % factor:
        raise MedsrError(f"image size {n_fine} is not divisible by the factor {factor}")
    sigma = factor / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    centres = np.arange(n_fine // factor) * factor + (factor - 1) / 2.0
    d = np.arange(n_fine)[None, :] - centres[:, None]
    a = np.exp(-0.5 * (d / sigma) ** 2)
    a[a < 1e-12] = 0.0
    a /= a.sum(1, keepdims=True)
    pinv = a.T @ np.linalg.inv(a @ a.T)
    return a, pinv


def apply_profile(x: torch.Tensor, factors: Sequence[int], inverse: bool) -> torch.Tensor:
    """The Gaussian slice profile along every axis whose factor is above 1 (``inverse``: its right inverse),
    on ``(B, C, *spatial)``; axes with factor 1 are left alone."""
    out = x
    for axis, f in enumerate(int(f) for f in factors):
        if f == 1:
            continue
        dim = 2 + axis
        n_fine = out.shape[dim] if not inverse else out.shape[dim] * f
        a, pinv = profile_matrices(n_fine, f)
        mat = torch.as_tensor(pinv if inverse else a, dtype=torch.float64, device=out.device)
        moved = out.movedim(dim, -1)
        out = (moved.double() @ mat.T).to(x.dtype).movedim(-1, dim)
    return out


def psf_blur(x: torch.Tensor, sigma: float | Sequence[float]) -> torch.Tensor:
    """Gaussian point-spread function (std in fine voxels) with MONAI's separable filter."""
    if isinstance(sigma, (int, float)):
        sigmas = [float(sigma)] * (x.ndim - 2)
    else:
        sigmas = [float(s) for s in sigma]
    flt = GaussianFilter(spatial_dims=x.ndim - 2, sigma=sigmas).to(x.device)
    return flt(x)


def _centre_slices(full: Sequence[int], factors: Sequence[int]) -> tuple[slice, ...]:
    sl = []
    for n, f in zip(full, factors):
        m = n // int(f)
        start = n // 2 - m // 2
        sl.append(slice(start, start + m))
    return tuple(sl)


def _drop_nyquist(spec: torch.Tensor) -> torch.Tensor:
    """Zero the unpaired most-negative frequency of even-sized (shifted) axes so the spectrum stays Hermitian."""
    spec = spec.clone()
    for axis in range(2, spec.ndim):
        if spec.shape[axis] % 2 == 0 and spec.shape[axis] > 1:
            spec.select(axis, 0).zero_()
    return spec


def kspace_truncate(x: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Keep the central 1/f of k-space per axis (a lower acquisition matrix); output on the coarse grid.

    Scaled by 1/prod(f) so that a constant keeps its value. The unpaired Nyquist bin of an even crop is dropped,
    so the kept spectrum is Hermitian and the result real.
    """
    dims = tuple(range(2, x.ndim))
    spec = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=dims), dim=dims)
    crop = _drop_nyquist(spec[(slice(None), slice(None), *_centre_slices(x.shape[2:], factors))])
    crop = torch.fft.ifftshift(crop, dim=dims)
    return (torch.fft.ifftn(crop, dim=dims).real / float(np.prod(factors))).to(x.dtype)


def kspace_zero_fill(y: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Right inverse of :func:`kspace_truncate`: zero-pad the spectrum back to the fine grid (sinc interpolation)."""
    dims = tuple(range(2, y.ndim))
    full = [int(n) * int(f) for n, f in zip(y.shape[2:], factors)]
    spec = torch.fft.fftshift(torch.fft.fftn(y.float(), dim=dims), dim=dims)
    big = torch.zeros((*y.shape[:2], *full), dtype=spec.dtype, device=y.device)
    big[(slice(None), slice(None), *_centre_slices(full, factors))] = _drop_nyquist(spec)
    big = torch.fft.ifftshift(big, dim=dims)
    return (torch.fft.ifftn(big, dim=dims).real * float(np.prod(factors))).to(y.dtype)


def rician_noise(y: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Magnitude of a complex signal with Gaussian noise in both channels (MRI magnitude images).

    Works on the signal shifted to be non-negative ((y + 1) in normalised units) and shifts back, so the
    background (-1) gets the Rician noise floor as in real magnitude images.
    """
    s = (y + 1.0).clamp_min(0)
    n1 = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype) * sigma
    n2 = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype) * sigma
    return torch.sqrt((s + n1) ** 2 + n2**2) - 1.0


@dataclass(frozen=True)
class LowDoseModel:
    """Physics and defaults of the sinogram-domain low-dose CT simulator (see :func:`low_dose_noise_hu`).

    Attributes:
        i0: full-dose photons per detector bin (one pixel wide) per view, for a ``ref_views``-view rotation;
            1e5 is within the 1e5-2e5 full-dose counts that low-dose CT simulation studies assume.
        ref_views: views over 180 degrees that ``i0`` is stated for. The FBP noise variance depends on the total
            count per bin, ``i0 * ref_views``; when fewer views are simulated (speed), each gets
            ``i0 * ref_views / n_views`` photons, so the noise level does not depend on ``n_views``.
        n_views: parallel-beam views simulated over 180 degrees.
        electronic_std: detector electronic noise, Gaussian, in photon counts per simulated view reading at full
            dose (an assumed value, variance 9); next to the Poisson noise it matters only in photon-starved rays
            (behind dense bone). It is not rescaled with ``n_views``.
        mu_water: linear attenuation of water in 1/mm at an effective energy of about 70 keV (0.0192 /mm).
    """

    i0: float = 1e5
    ref_views: int = 720
    n_views: int = 256
    electronic_std: float = 3.0
    mu_water: float = 0.0192


def _angles(n_views: int, device: torch.device | None = None) -> torch.Tensor:
    return torch.arange(n_views, dtype=torch.float64, device=device) * (np.pi / n_views)


def _detector_size(h: int, w: int) -> int:
    return int(np.ceil(np.hypot(h, w))) + 2


def radon_parallel(img: torch.Tensor, n_views: int, chunk: int = 16) -> torch.Tensor:
    """Parallel-beam projections ``(N, n_views, D)`` of images ``(N, H, W)`` over 180 degrees, in pixel units.

    Each view samples the image (bilinear, zero outside) on a rotated grid and sums along the rays; the detector
    has ``D`` bins one pixel wide, centred on the image centre, covering the image diagonal (nothing is cut).
    """
    n, h, w = img.shape
    d = _detector_size(h, w)
    # normalised grid_sample coordinates of the D x D rotated sampling grid (align_corners=False), per image axis
    scale_x, scale_y = d / w, d / h
    lin = (2 * torch.arange(d, dtype=torch.float64, device=img.device) + 1) / d - 1
    ray, det = torch.meshgrid(lin, lin, indexing="ij")
    theta = _angles(n_views, img.device)
    views = []
    for k in range(0, n_views, chunk):
        c, s = torch.cos(theta[k:k + chunk])[:, None, None], torch.sin(theta[k:k + chunk])[:, None, None]
        grid = torch.stack([(det * c - ray * s) * scale_x, (det * s + ray * c) * scale_y], -1).to(img.dtype)
        m = grid.shape[0]
        src = img[:, None].repeat_interleave(m, 0)
        out = F.grid_sample(src, grid.repeat(n, 1, 1, 1), mode="bilinear", padding_mode="zeros",
                            align_corners=False)
        views.append(out.sum(2).view(n, m, d))
    return torch.cat(views, 1)


def _ramp_filter(d: int, device: torch.device | None = None) -> tuple[torch.Tensor, int]:
    """Ram-Lak filter from its band-limited spatial kernel (no DC offset; as scikit-image's iradon)."""
    size = max(64, 2 ** int(np.ceil(np.log2(2 * d))))
    kernel = torch.zeros(size, dtype=torch.float64, device=device)
    kernel[0] = 0.25
    odd = torch.cat([torch.arange(1, size // 2 + 1, 2), torch.arange(size // 2 - 1, 0, -2)]).double().to(device)
    kernel[1::2] = -1.0 / (np.pi * odd) ** 2
    return 2 * torch.fft.fft(kernel).real, size


def fbp_parallel(sino: torch.Tensor, shape: tuple[int, int], chunk: int = 16) -> torch.Tensor:
    """Filtered back-projection (ramp filter, linear interpolation) of :func:`radon_parallel` data: ``(N, H, W)``.

    ``fbp_parallel(radon_parallel(x, v), x.shape[1:])`` reconstructs ``x`` (in the same units).
    """
    n, n_views, d = sino.shape
    h, w = shape
    filt, size = _ramp_filter(d, sino.device)
    spec = torch.fft.fft(F.pad(sino.double(), (0, size - d)), dim=-1) * filt
    q = torch.fft.ifft(spec, dim=-1).real[..., :d].to(sino.dtype)
    ys = torch.arange(h, dtype=torch.float64, device=sino.device) - (h - 1) / 2
    xs = torch.arange(w, dtype=torch.float64, device=sino.device) - (w - 1) / 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    theta = _angles(n_views, sino.device)
    img = torch.zeros(n, h, w, dtype=sino.dtype, device=sino.device)
    for k in range(0, n_views, chunk):
        t = theta[k:k + chunk]
        u = gx * torch.cos(t)[:, None, None] + gy * torch.sin(t)[:, None, None]  # detector offset in pixels
        u = (2 * (u + (d - 1) / 2) + 1) / d - 1
        grid = torch.stack([u, torch.zeros_like(u)], -1).to(sino.dtype)
        m = grid.shape[0]
        out = F.grid_sample(q[:, k:k + m].reshape(n * m, 1, 1, d), grid.repeat(n, 1, 1, 1), mode="bilinear",
                            padding_mode="zeros", align_corners=False)
        img += out.view(n, m, h, w).sum(1)
    return img * (np.pi / (2 * n_views))


def low_dose_noise_hu(hu: torch.Tensor, dose: float, generator: torch.Generator, pixel_mm: float,
                      model: LowDoseModel | None = None,
                      sinogram: torch.Tensor | None = None) -> torch.Tensor:
    """The noise (HU) that taking CT slices ``hu`` ``(N, H, W)`` at ``dose`` instead of full dose would add.

    Physics (noise insertion, after Zeng et al. 2015 and Yu et al. 2012): HU → linear attenuation
    ``mu = mu_water (1 + HU/1000)`` (≥ 0) → parallel-beam line integrals ``p`` (bins one pixel of ``pixel_mm``
    wide) → the scan is taken as a full-dose acquisition of ``I = i0 e^-p`` counts per bin; at dose ``d`` the
    variance of ``-log(counts)`` is ``1/(d I)`` instead of ``1/I``, so the noise to add is that of an independent
    acquisition at ``I d/(1-d)`` counts (variances of independent noise add): Poisson counts there, plus
    electronic noise of std ``electronic_std sqrt((1+d)/(1-d))`` (the same difference for the electronic
    variance), clamped at 1 count, → log → ramp-filtered back-projection of the sinogram noise ``δp``:
    ``FBP(p_noisy) − FBP(p_clean) = FBP(δp)`` (FBP is linear). The added noise std is therefore proportional to
    ``sqrt(1/d − 1)`` and the total (scan's own + added) to ``1/sqrt(d)``; it is streaky and correlated (ramp
    filtered, strongest along rays through dense bone), not white. ``dose=1`` adds exactly nothing.

    ``sinogram``: the clean line integrals ``radon_parallel(mu, n_views) * pixel_mm`` if already computed (they
    do not depend on the dose or the seed).
    """
    m = model or LowDoseModel()
    if dose >= 1.0:
        return torch.zeros_like(hu)
    if sinogram is None:
        sinogram = clean_sinogram(hu, pixel_mm, m)
    counts_per_view = m.i0 * m.ref_views / m.n_views
    expected = counts_per_view * dose / (1.0 - dose) * torch.exp(-sinogram.double())
    counts = torch.poisson(expected, generator=generator)
    if m.electronic_std > 0:
        e_std = m.electronic_std * np.sqrt((1.0 + dose) / (1.0 - dose))
        noise = torch.randn(counts.shape, generator=generator, dtype=counts.dtype, device=counts.device)
        counts = counts + e_std * noise
    delta_p = -torch.log(counts.clamp_min(1.0) / expected)
    delta_mu = fbp_parallel(delta_p.to(hu.dtype), (hu.shape[-2], hu.shape[-1])) / pixel_mm
    return 1000.0 * delta_mu / m.mu_water


def clean_sinogram(hu: torch.Tensor, pixel_mm: float, model: LowDoseModel | None = None) -> torch.Tensor:
    """Line integrals of attenuation (dimensionless) of HU slices ``(N, H, W)``: ``(N, n_views, D)``."""
    m = model or LowDoseModel()
    mu = (m.mu_water * (1.0 + hu.float() / 1000.0)).clamp_min(0.0)  # float32: 4x faster, ample precision
    return radon_parallel(mu, m.n_views).double() * pixel_mm


def simulate_low_dose(hu: torch.Tensor, dose: float, generator: torch.Generator, pixel_mm: float,
                      model: LowDoseModel | None = None) -> torch.Tensor:
    """A low-dose version of full-dose CT slices ``hu`` ``(N, H, W)``: ``hu + low_dose_noise_hu(...)``."""
    return hu + low_dose_noise_hu(hu, dose, generator, pixel_mm, model)


def low_dose_noise(y: torch.Tensor, dose: float, generator: torch.Generator, pixel_mm: float = 1.0,
                   window: tuple[float, float] = CT_WINDOW, model: LowDoseModel | None = None) -> torch.Tensor:
    """:func:`simulate_low_dose` on normalised images ``(B, C, *spatial)`` (the CT ``window`` maps to [-1, 1]).

    2D images are slices; 3D images are stacks of axial slices along the last axis, each with its own noise.
    The image is taken as the whole object: simulate on whole slices (the training cache does), since a patch
    alone misses the attenuation of everything outside it.
    """
    if dose >= 1.0:
        return y
    half = 0.5 * (window[1] - window[0])
    spatial = y.shape[2:]
    flat = y.movedim(-1, 2) if len(spatial) == 3 else y
    slices = flat.reshape(-1, flat.shape[-2], flat.shape[-1])
    hu = (slices.double() + 1.0) * half + window[0]
    noise = (low_dose_noise_hu(hu, dose, generator, pixel_mm, model) / half).to(y.dtype)
    noise = noise.reshape(flat.shape)
    return y + (noise.movedim(2, -1) if len(spatial) == 3 else noise)


def upsample(y: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Bring a coarse image back onto the fine grid: bicubic in 2D, trilinear in 3D (as SR3 conditions).

    ``align_corners=False`` puts each block of fine voxels centred on its coarse voxel, matching
    :func:`medsr.io.refined_affine`.
    """
    mode = "bicubic" if y.ndim == 4 else "trilinear"
    return F.interpolate(y, scale_factor=tuple(float(f) for f in factors), mode=mode, align_corners=False)
