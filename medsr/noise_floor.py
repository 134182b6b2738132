"""The part of the truth no model can predict: white acquisition noise at the fine grid, estimated from the input.

Why: a high-resolution acquisition of the same anatomy carries its own noise. Averaging ``f`` fine voxels into one
coarse voxel divides white noise's std by ``sqrt(f)``, so a low-resolution input with noise ``σ_in`` implies
noise ``σ_in · sqrt(f)`` in the truth it stands for. Diffusion samples only spread where the *anatomy* is
uncertain; without this floor a calibrated interval is far too narrow on noisy scans and far too wide on clean
ones (one λ per modality cannot fit both; issue 12's study: per-scan coverage 0.58-0.98 without it, 0.82-0.94
with it). The interval of basis ``std_noise`` (:mod:`medsr.uncertainty`) is ``mean ± λ·sqrt(std² + σ²)``.

``σ_in`` is Immerkær's estimator (J. Immerkær, "Fast noise variance estimation", CVIU 1996): the mean absolute
response to a Laplacian-difference mask that cancels linear structure, ``σ = sqrt(π/2)/6 · mean|I * M|``, per 2D
image over the whole image (structure biases it up a little; λ absorbs a constant bias).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medsr.degrade import DegradeSpec
from medsr.errors import MedsrError

__all__ = ["estimate_noise_sigma", "fine_noise_sigma"]

_MASK = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])


def estimate_noise_sigma(images: torch.Tensor) -> torch.Tensor:
    """Immerkær's white-noise std of each 2D image in ``images`` (..., H, W) → shape (...). Zero below 3x3."""
    *lead, h, w = images.shape
    if h < 3 or w < 3:
        return torch.zeros(lead, dtype=torch.float32)
    x = images.reshape(-1, 1, h, w).double()
    response = F.conv2d(x, _MASK.to(x)[None, None])
    return (math.sqrt(math.pi / 2.0) / 6.0 * response.abs().mean(dim=(1, 2, 3))).float().reshape(lead)


def fine_noise_sigma(low: torch.Tensor, spec: DegradeSpec) -> torch.Tensor:
    """σ of white noise at the output grid for each item of a model input batch ``low`` (N, 1, *spatial) → (N,).

    2D items: one estimate per image. 3D items: the mean of the estimates over the planes of the last two axes.
    Scaled by the operator's white-noise gain (:attr:`DegradeSpec.white_noise_gain`).
    """
    gain = spec.white_noise_gain
    if gain is None:
        raise MedsrError(f"degradation {spec}: the noise of its truth cannot be inferred from the input (no "
                         "white-noise gain: blurred, noisy or low-dose operators); calibrate with basis 'std'")
    per_image = estimate_noise_sigma(low.detach().float().cpu()[:, 0])
    while per_image.ndim > 1:
        per_image = per_image.mean(dim=1)
    return per_image * gain
