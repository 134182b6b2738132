"""Per-voxel statistics over diffusion samples, and the per-scan uncertainty score.

Samples arrive in groups (as many as fit in memory at once); :class:`RunningStats` merges groups with Chan et
al.'s parallel form of Welford's algorithm, so mean and variance never need all samples at once. Exact
quantiles need the samples themselves: :func:`interval` uses kept samples when given, else the normal
approximation mean ± z·std (reported as such).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["RunningStats", "interval", "uncertainty_score", "coverage", "NORMAL_Z"]

# z of the central 90% interval of a normal distribution (5th-95th percentile)
NORMAL_Z = 1.6448536269514722


class RunningStats:
    """Streaming mean and variance over the first axis of successive sample groups ``(n, *shape)``."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, group: torch.Tensor) -> None:
        group = group.detach().double()
        n_b = group.shape[0]
        mean_b = group.mean(0)
        m2_b = ((group - mean_b) ** 2).sum(0)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (n_a * n_b / n)
        self.count = n

    def std(self, ddof: int = 1) -> torch.Tensor:
        """Sample standard deviation (ddof=1); zero when there is a single sample."""
        if self.m2 is None:
            raise ValueError("no samples yet")
        if self.count <= ddof:
            return torch.zeros_like(self.m2)
        return (self.m2 / (self.count - ddof)).sqrt()


def interval(mean: torch.Tensor, std: torch.Tensor, samples: torch.Tensor | None, lo: float = 0.05,
             hi: float = 0.95, calibration: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Central interval per voxel: empirical quantiles of kept samples, else normal approximation.

    ``calibration`` widens (> 1) or narrows the interval about the mean; it is fitted on held-out scans so that
    the 90% interval covers about 90% of true voxels.
    """
    if samples is not None and samples.shape[0] >= 2:
        q = torch.quantile(samples.float(), torch.tensor([lo, hi], device=samples.device), dim=0)
        q_lo, q_hi, method = q[0], q[1], "empirical"
    else:
        q_lo, q_hi, method = mean - NORMAL_Z * std, mean + NORMAL_Z * std, "normal"
    if calibration != 1.0:
        q_lo = mean + (q_lo - mean) * calibration
        q_hi = mean + (q_hi - mean) * calibration
    return q_lo, q_hi, method


@dataclass
class ScanScore:
    """How unsure the model is about a scan, in numbers a reviewer can sort by."""

    mean_std: float  # mean per-voxel std inside the body, as a fraction of the intensity range
    high_fraction: float  # share of body voxels whose std exceeds ``threshold`` of the range
    threshold: float
    body_voxels: int


def uncertainty_score(std_norm: np.ndarray, body: np.ndarray, threshold: float = 0.02) -> ScanScore:
    """Score from the std map in normalised units (range [-1, 1], so a fraction of range is std / 2)."""
    rel = np.asarray(std_norm, np.float64) / 2.0
    inside = rel[np.asarray(body, bool)]
    if inside.size == 0:
        inside = rel.ravel()
    return ScanScore(float(inside.mean()), float((inside > threshold).mean()), threshold, int(inside.size))


def coverage(truth: np.ndarray, q_lo: np.ndarray, q_hi: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fraction of true voxels inside their interval (nominal 0.9 for the 5-95% interval)."""
    inside = (truth >= q_lo) & (truth <= q_hi)
    return float(inside[mask].mean() if mask is not None else inside.mean())
