"""Degradation operators that make the low-resolution / low-dose input from a high-quality scan.

Every operator is a deterministic function of the image and explicit parameters; randomness (noise) comes only
from a seed drawn beforehand by :func:`draw_params`, so each training pair is reproducible (the torchio split).
All functions take torch tensors ``(B, C, *spatial)`` with 2 or 3 spatial axes, in normalised units ([-1, 1],
see :mod:`medsr.intensity`); the linear operators (block average, k-space truncation) commute with that affine
normalisation, so they mean the same thing in scan units.

A spec string names a degradation everywhere (configs, ``medsr evaluate --degrade``):
``KIND:FxFxF[,key=value...]``, e.g. ``block:4x4``, ``block:1x1x4,sigma=1.0``, ``kspace:4x4,noise=0.02``,
``lowdose:1x1,dose=0.25`` (pure denoising), ``lowdose:2x2,dose=0.25`` (low dose and thick voxels).
"""

from __future__ import annotations

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
    "kspace_truncate",
    "kspace_zero_fill",
    "psf_blur",
    "rician_noise",
    "low_dose_noise",
    "upsample",
]

KINDS = ("block", "kspace", "lowdose")


@dataclass(frozen=True)
class DegradeSpec:
    """A degradation: kind, integer factors per spatial axis, and its scalar options.

    Attributes:
        kind: "block" (block average, thick slices / large voxels), "kspace" (central k-space only, MRI) or
            "lowdose" (CT noise, optionally with block averaging by ``factors``).
        factors: integer downsampling factor per spatial axis (2 or 3 values).
        sigma: Gaussian point-spread blur (std, in fine voxels) applied before block averaging.
        noise: Rician noise std (normalised units) after k-space truncation.
        dose: dose fraction in (0, 1] for "lowdose".
    """

    kind: str = "block"
    factors: tuple[int, ...] = (4, 4)
    sigma: float = 0.0
    noise: float = 0.0
    dose: float = 1.0
    options: dict[str, float] = field(default_factory=dict, compare=False, hash=False)

    def __str__(self) -> str:
        text = f"{self.kind}:{'x'.join(str(f) for f in self.factors)}"
        for key, default in (("sigma", 0.0), ("noise", 0.0), ("dose", 1.0)):
            value = getattr(self, key)
            if value != default:
                text += f",{key}={value:g}"
        return text

    @property
    def spatial_dims(self) -> int:
        return len(self.factors)

    @property
    def has_projection(self) -> bool:
        """Whether an exact data-consistency projection exists (noise-free linear operator)."""
        return self.kind == "block" and self.sigma == 0.0 or self.kind == "kspace" and self.noise == 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The noise-free forward operator A (fine → coarse): PSF and block average, or k-space truncation.

        The one definition every caller uses: training pairs (plus noise), data-consistency checks of outputs,
        and evaluation.
        """
        _check_shape(x, self.factors)
        if self.kind == "kspace":
            return kspace_truncate(x, self.factors)
        return block_average(psf_blur(x, self.sigma) if self.sigma > 0 else x, self.factors)

    def right_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """A⁺ with A(A⁺y) = y for the noise-free operators without blur: repeat (block) or zero-fill (k-space)."""
        if self.kind == "kspace":
            return kspace_zero_fill(y, self.factors)
        if self.sigma > 0:
            raise MedsrError(f"degradation {self}: a blurred block average has no exact right inverse")
        return block_average_adjoint(y, self.factors)

    def project(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Range/null-space projection (DDNM, Wang et al. 2023): ``x0 + A⁺(y − A x0)``, so ``A(result) = y``.

        Exact for noise-free block averaging and k-space truncation; for operators without an exact projection
        (noise, blur) ``x0`` is returned unchanged; check :attr:`has_projection`.
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
        opts = {k.strip(): float(v) for k, v in (p.split("=", 1) for p in parts[1:] if p.strip())}
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
    dose = opts.get("dose", 1.0)
    if not 0.0 < dose <= 1.0:
        raise MedsrError(f"degradation spec {text!r}: dose must be in (0, 1]")
    return DegradeSpec(kind, factors, opts.get("sigma", 0.0), opts.get("noise", 0.0), dose)


@dataclass(frozen=True)
class DegradeParams:
    """Everything random about one degradation, drawn up front: only the noise seed here."""

    spec: DegradeSpec
    noise_seed: int


def draw_params(spec: DegradeSpec, rng: np.random.Generator) -> DegradeParams:
    """The random half of the random/deterministic split: draw the parameters, touch no image."""
    return DegradeParams(spec, int(rng.integers(0, 2**62)))


def apply_degradation(x: torch.Tensor, params: DegradeParams) -> torch.Tensor:
    """Degrade ``x`` ``(B, C, *spatial)`` deterministically; returns the coarse-grid input ``(B, C, *spatial/f)``."""
    spec = params.spec
    _check_shape(x, spec.factors)
    gen = torch.Generator(device=x.device).manual_seed(params.noise_seed)
    y = spec.forward(x)
    if spec.kind == "kspace" and spec.noise > 0:
        return rician_noise(y, spec.noise, gen)
    if spec.kind == "lowdose":
        return low_dose_noise(y, spec.dose, gen, averaged_voxels=int(np.prod(spec.factors)))
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


def low_dose_noise(
    y: torch.Tensor,
    dose: float,
    generator: torch.Generator,
    sigma_full: float = 0.01,
    averaged_voxels: int = 1,
) -> torch.Tensor:
    """Simulated CT dose reduction: extra Gaussian noise whose variance grows as the dose falls.

    Model (image domain, quantum noise only): at dose fraction d the noise variance is sigma_full² / d, so the
    noise to add on top of a full-dose image has variance sigma_full² (1/d − 1); it is scaled by the local
    attenuation ``(y + 1) / 2`` (Poisson-like: more photons absorbed, noisier) with a floor of 0.1, and divided
    by the number of voxels averaged into each coarse voxel. ``sigma_full`` = 0.01 normalised ≈ 10 HU with the
    default CT window. Limits: no streaks, no noise texture (the real noise is correlated by the reconstruction
    kernel), no electronic noise floor; good enough to teach denoising, not to predict a protocol's image quality.
    """
    if dose >= 1.0:
        return y
    var = sigma_full**2 * (1.0 / dose - 1.0) * ((y + 1.0) * 0.5).clamp_min(0.1) / averaged_voxels
    noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    return y + noise * var.sqrt()


def upsample(y: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Bring a coarse image back onto the fine grid: bicubic in 2D, trilinear in 3D (as SR3 conditions).

    ``align_corners=False`` puts each block of fine voxels centred on its coarse voxel, matching
    :func:`medsr.io.refined_affine`.
    """
    mode = "bicubic" if y.ndim == 4 else "trilinear"
    return F.interpolate(y, scale_factor=tuple(float(f) for f in factors), mode=mode, align_corners=False)
