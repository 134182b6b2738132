"""Invertible intensity normalisation to about [-1, 1], per modality, stored with the model.

CT uses a fixed Hounsfield window (the same numbers for every scan, so HU keep their meaning); MRI and
unknown modalities use robust percentiles of each scan (MR intensities have no absolute unit). Values are never
clipped, so ``denormalise(normalise(x)) == x`` exactly up to float rounding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["IntensityConfig", "Normaliser", "fit_normaliser"]


@dataclass
class IntensityConfig:
    """How to normalise; saved in every checkpoint.

    Attributes:
        ct_window: HU mapped to -1 and +1 for CT.
        mr_percentiles: percentiles of the scan mapped to -1 and +1 for MR / unknown modality.
    """

    ct_window: tuple[float, float] = (-1024.0, 1024.0)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)


@dataclass
class Normaliser:
    """``y = 2 (x - lo) / (hi - lo) - 1``; ``lo``/``hi`` in the scan's units (HU for CT)."""

    lo: float
    hi: float
    kind: str  # "ct_window" (fixed HU window) or "percentile" (fitted to this scan)

    def normalise(self, x: np.ndarray) -> np.ndarray:
        return (2.0 * (np.asarray(x, np.float32) - self.lo) / (self.hi - self.lo) - 1.0).astype(np.float32)

    def denormalise(self, y: np.ndarray) -> np.ndarray:
        return ((np.asarray(y, np.float32) + 1.0) * 0.5 * (self.hi - self.lo) + self.lo).astype(np.float32)

    def scale_std(self, s: np.ndarray) -> np.ndarray:
        """A spread (std, interval width) in normalised units back to scan units: no offset."""
        return (np.asarray(s, np.float32) * 0.5 * (self.hi - self.lo)).astype(np.float32)

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


def fit_normaliser(array: np.ndarray, modality: str, cfg: IntensityConfig | None = None) -> Normaliser:
    """The normaliser for one scan: the CT window for CT, robust percentiles otherwise."""
    cfg = cfg or IntensityConfig()
    if modality.upper() == "CT":
        return Normaliser(float(cfg.ct_window[0]), float(cfg.ct_window[1]), "ct_window")
    lo, hi = np.percentile(np.asarray(array, np.float32), cfg.mr_percentiles)
    if not hi > lo:  # a constant image: keep the mapping invertible
        hi = lo + 1.0
    return Normaliser(float(lo), float(hi), "percentile")
