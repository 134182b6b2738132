"""Classical denoisers as baselines for low-dose CT: non-local means, total variation (scikit-image) and BM3D
(the ``bm3d`` package, only if installed), each with its strength tuned on the truth.

Tuning on the truth is deliberately generous to the baselines (no real user can do it), so a learned denoiser
that beats them beats the best setting each classical method has on that very image. Strengths are unit-free:
multiples of the image's noise std as a wavelet estimator measures it (:func:`noise_sigma`), so one
grid serves HU and normalised images alike. Images are 2D arrays (one slice); loop over slices for a volume.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from skimage.metrics import peak_signal_noise_ratio
from skimage.restoration import denoise_nl_means, denoise_tv_chambolle

from medsr.errors import MedsrError

__all__ = ["BASELINES", "TunedBaseline", "available_baselines", "denoise", "noise_sigma", "tune_strength",
           "tuned_baselines"]

COARSE = tuple(float(s) for s in np.geomspace(0.125, 8.0, 13))  # x noise std; refined around the best
# BM3D takes the noise std itself (best near 1-1.5 x the estimate) and costs seconds per 128^2 slice per try
GRIDS = {"bm3d": tuple(float(s) for s in np.geomspace(0.5, 2.83, 6))}


def noise_sigma(image: np.ndarray) -> float:
    """Noise std of a 2D ``image`` (its units): Donoho's MAD of the finest diagonal Haar wavelet band / 0.6745
    (what scikit-image's ``estimate_sigma`` does, without its PyWavelets dependency)."""
    img = np.asarray(image, np.float64)
    h, w = (img.shape[0] // 2) * 2, (img.shape[1] // 2) * 2
    b = img[:h, :w]
    diag = (b[0::2, 0::2] - b[0::2, 1::2] - b[1::2, 0::2] + b[1::2, 1::2]) / 2.0
    return float(np.median(np.abs(diag)) / 0.6745)


def _nlm(image: np.ndarray, h: float, sigma: float) -> np.ndarray:
    return np.asarray(denoise_nl_means(image, h=h, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True))


def _tv(image: np.ndarray, h: float, sigma: float) -> np.ndarray:
    return np.asarray(denoise_tv_chambolle(image, weight=h))


def _bm3d(image: np.ndarray, h: float, sigma: float) -> np.ndarray:
    import bm3d  # optional: free for non-commercial use only, so not a declared dependency

    return np.asarray(bm3d.bm3d(image, sigma_psd=h))


BASELINES: dict[str, Callable[[np.ndarray, float, float], np.ndarray]] = {"nlm": _nlm, "tv": _tv, "bm3d": _bm3d}


def available_baselines() -> list[str]:
    """The baselines that run here: nlm and tv always, bm3d where the ``bm3d`` package is installed."""
    return [n for n in BASELINES if n != "bm3d" or importlib.util.find_spec("bm3d") is not None]


def denoise(name: str, image: np.ndarray, strength: float, sigma: float | None = None) -> np.ndarray:
    """Denoise a 2D ``image`` with baseline ``name`` at ``strength`` x the noise std (estimated if not given)."""
    if name not in BASELINES:
        raise MedsrError(f"baseline {name!r}: expected one of {sorted(BASELINES)}")
    if name not in available_baselines():
        raise MedsrError(f"baseline {name!r}: the package is not installed (pip install {name})")
    img = np.asarray(image, np.float64)
    if img.ndim != 2:
        raise MedsrError(f"baseline {name!r}: expected a 2D slice, got shape {img.shape}")
    s = noise_sigma(img) if sigma is None else float(sigma)
    return BASELINES[name](img, float(strength) * s, s).astype(np.float32)


@dataclass
class TunedBaseline:
    """A baseline at the strength that maximised PSNR against the truth, and what that gave."""

    name: str
    strength: float  # x noise std
    sigma: float  # the noise std estimate, image units
    psnr: float
    output: np.ndarray
    tried: dict[float, float]  # strength -> PSNR


def tune_strength(name: str, noisy: np.ndarray, truth: np.ndarray, data_range: float | None = None,
                  strengths: Sequence[float] | None = None, refine: int = 4) -> TunedBaseline:
    """Grid search of the strength (x noise std) on the truth's PSNR, then ``refine`` steps between the best
    value's neighbours. ``strengths``: the method's default grid (``GRIDS``, else ``COARSE``) unless given;
    ``data_range`` for PSNR: the truth's max - min unless given."""
    truth = np.asarray(truth, np.float64)
    noisy = np.asarray(noisy, np.float64)
    if truth.shape != noisy.shape:
        raise MedsrError(f"baseline tuning: noisy {noisy.shape} and truth {truth.shape} differ in shape")
    rng = float(data_range) if data_range is not None else float(truth.max() - truth.min())
    sigma = noise_sigma(noisy)
    tried: dict[float, float] = {}
    outputs: dict[float, np.ndarray] = {}

    def score(s: float) -> float:
        if s not in tried:
            outputs[s] = denoise(name, noisy, s, sigma)
            tried[s] = float(peak_signal_noise_ratio(truth, outputs[s].astype(np.float64), data_range=rng))
        return tried[s]

    grid = sorted(float(s) for s in (strengths if strengths is not None else GRIDS.get(name, COARSE)))
    best = max(grid, key=score)
    i = grid.index(best)
    lo, hi = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    for s in np.geomspace(lo, hi, refine + 2)[1:-1]:
        score(float(s))
    best = max(tried, key=lambda k: tried[k])
    return TunedBaseline(name, best, sigma, tried[best], outputs[best], dict(sorted(tried.items())))


def tuned_baselines(noisy: np.ndarray, truth: np.ndarray, names: Sequence[str] | None = None,
                    data_range: float | None = None) -> dict[str, TunedBaseline]:
    """Every available baseline (or ``names``) tuned on ``truth``."""
    return {n: tune_strength(n, noisy, truth, data_range, refine=2 if n == "bm3d" else 4)
            for n in (names or available_baselines())}
