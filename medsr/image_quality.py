"""Noise and resolution of a denoised CT slice, measured where the truth says what to expect.

A denoiser can win PSNR by blurring; these two numbers keep it honest, and both pick their regions from the
truth automatically, so every method is measured at the same places:

- **noise** (:func:`noise_std`): the image's standard deviation (its units: HU for CT) inside *uniform regions*.
  Rule (:func:`uniform_patches`): tile the slice into non-overlapping ``patch`` x ``patch`` squares lying wholly
  inside the body mask; score each by the mean gradient magnitude of the truth (central differences); keep the
  ``fraction`` with the lowest score (at least ``min_patches``). The std is taken within each patch (its own
  mean removed) and pooled as the root mean square over patches.
- **resolution kept** (:func:`edge_width`): the 10-90% width (mm) of the mean edge-spread profile across the
  truth's strongest bone edges. Rule (:func:`edge_points`): pixels within one pixel of the boundary of
  ``truth > bone`` whose truth gradient (Gaussian-smoothed, sigma 1 pixel) is in the top ``fraction`` of those
  boundary pixels; the profile of the image is sampled along the truth's gradient direction (bilinear,
  ``±half`` pixels), the profiles are averaged (zero-mean noise cancels, blur does not) and the mean profile is
  rescaled between its two ends. A blurred edge is wider; compare with the truth's own width.
- **what the truth is like** (:func:`grey_levels`): how many distinct values the truth has and how often two
  neighbouring pixels are exactly equal. A CT acquisition has hundreds to thousands of levels in a slice and almost
  no equal neighbours (its own noise); a piecewise-constant image (a phantom, a synthetic or heavily
  post-processed example) has few levels and mostly equal neighbours: the kind of image total variation assumes.
- **where the error lies** (:func:`edge_region`, :func:`edge_error_share`): the share of an image's squared error
  within ``dilate`` pixels of the truth's strong edges (gradient above ``fraction`` of its maximum).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["uniform_patches", "noise_std", "edge_points", "edge_profile", "edge_width", "grey_levels",
           "edge_region", "edge_error_share"]


def _grad(img: np.ndarray, sigma: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    x = ndimage.gaussian_filter(img, sigma) if sigma > 0 else img
    return np.gradient(x, axis=0), np.gradient(x, axis=1)


def uniform_patches(truth: np.ndarray, body: np.ndarray, patch: int = 8, fraction: float = 0.1,
                    min_patches: int = 4) -> list[tuple[slice, slice]]:
    """The most uniform ``patch`` x ``patch`` squares of 2D ``truth`` inside ``body`` (module docstring rule)."""
    t = np.asarray(truth, np.float64)
    gy, gx = _grad(t)
    mag = np.hypot(gy, gx)
    cands: list[tuple[float, tuple[slice, slice]]] = []
    for i in range(0, t.shape[0] - patch + 1, patch):
        for j in range(0, t.shape[1] - patch + 1, patch):
            win = (slice(i, i + patch), slice(j, j + patch))
            if body[win].all():
                cands.append((float(mag[win].mean()), win))
    cands.sort(key=lambda c: c[0])
    keep = max(min_patches, int(math.ceil(fraction * len(cands))))
    return [w for _, w in cands[:keep]]


def noise_std(image: np.ndarray, patches: list[tuple[slice, slice]]) -> float:
    """Root mean square over ``patches`` of the std of ``image`` within each (image units); NaN if none."""
    if not patches:
        return math.nan
    img = np.asarray(image, np.float64)
    return float(np.sqrt(np.mean([img[p].var() for p in patches])))


def edge_points(truth: np.ndarray, bone: float, fraction: float = 0.2, margin: int = 6,
                ) -> tuple[np.ndarray, np.ndarray]:
    """Strong bone-edge pixels of 2D ``truth`` ``(N, 2)`` and the unit gradient direction there ``(N, 2)``
    (pointing into the bone). ``bone``: the truth level above which a pixel is bone; pixels nearer than
    ``margin`` to the border are left out (their profiles would leave the image)."""
    t = np.asarray(truth, np.float64)
    mask = t > bone
    boundary = mask & ~ndimage.binary_erosion(mask) | ~mask & ndimage.binary_dilation(mask)
    inner = np.zeros_like(mask)
    inner[margin:-margin, margin:-margin] = True
    boundary &= inner
    gy, gx = _grad(t, 1.0)
    mag = np.hypot(gy, gx)
    idx = np.argwhere(boundary)
    if len(idx) == 0:
        return np.zeros((0, 2)), np.zeros((0, 2))
    m = mag[boundary]
    keep = m >= np.quantile(m, 1.0 - fraction)
    idx, m = idx[keep], m[keep]
    normals = np.stack([gy[boundary][keep], gx[boundary][keep]], 1) / np.maximum(m, 1e-12)[:, None]
    return idx.astype(np.float64), normals


def edge_profile(image: np.ndarray, points: np.ndarray, normals: np.ndarray, half: float = 4.0,
                 step: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Mean profile of ``image`` along ``normals`` through ``points`` (bilinear): ``(t in pixels, profile)``."""
    t = np.arange(-half, half + step / 2, step)
    coords = points[:, :, None] + normals[:, :, None] * t[None, None, :]  # (N, 2, T)
    vals = ndimage.map_coordinates(np.asarray(image, np.float64), [coords[:, 0].ravel(), coords[:, 1].ravel()],
                                   order=1, mode="nearest").reshape(len(points), len(t))
    return t, vals.mean(0)


def edge_width(image: np.ndarray, points: np.ndarray, normals: np.ndarray, pixel_mm: float = 1.0,
               half: float = 4.0) -> float:
    """10-90% width (mm) of the mean edge profile of ``image`` at ``points`` (see :func:`edge_points`);
    NaN without edge points or without a rising edge."""
    if len(points) == 0:
        return math.nan
    t, prof = edge_profile(image, points, normals, half)
    ends = max(2, len(t) // 8)
    lo, hi = prof[:ends].mean(), prof[-ends:].mean()
    if not hi > lo:
        return math.nan
    rising = np.maximum.accumulate((prof - lo) / (hi - lo))  # monotone envelope: first crossings
    t10, t90 = (float(np.interp(level, rising, t)) for level in (0.1, 0.9))
    return (t90 - t10) * float(pixel_mm)


def grey_levels(truth: np.ndarray, mask: np.ndarray | None = None) -> tuple[int, float]:
    """Distinct values of ``truth`` (inside ``mask``) and the share of horizontally or vertically adjacent pixel
    pairs (both inside ``mask``) with exactly equal values."""
    t = np.asarray(truth)
    m = np.ones(t.shape, bool) if mask is None else np.asarray(mask, bool)
    pairs = equal = 0
    for axis in (0, 1):
        a, b = np.swapaxes(t, 0, axis), np.swapaxes(m, 0, axis)
        both = b[1:] & b[:-1]
        pairs += int(both.sum())
        equal += int(((a[1:] == a[:-1]) & both).sum())
    return int(np.unique(t[m]).size), (equal / pairs if pairs else math.nan)


def edge_region(truth: np.ndarray, fraction: float = 0.1, dilate: int = 2) -> np.ndarray:
    """Pixels within ``dilate`` pixels of the truth's strong edges (Sobel magnitude above ``fraction`` of its
    maximum)."""
    t = np.asarray(truth, np.float64)
    mag = np.hypot(ndimage.sobel(t, 0), ndimage.sobel(t, 1))
    if not mag.max() > 0:
        return np.zeros(t.shape, bool)
    return ndimage.binary_dilation(mag > fraction * mag.max(), iterations=dilate)


def edge_error_share(pred: np.ndarray, truth: np.ndarray, region: np.ndarray) -> float:
    """Share of ``pred``'s squared error against ``truth`` that lies in ``region`` (nan for a perfect image)."""
    err = (np.asarray(pred, np.float64) - np.asarray(truth, np.float64)) ** 2
    total = float(err.sum())
    return float(err[region].sum()) / total if total > 0 else math.nan
