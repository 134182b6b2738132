"""Statistics of diffusion samples: streaming moments, intervals, the per-scan score, and calibration.

Samples arrive in groups (as many as fit in memory at once); :class:`RunningStats` merges groups with Chan et
al.'s parallel form of Welford's algorithm, so mean and variance never need all samples at once.

Calibration (why the interval can be trusted): the raw spread of a few samples is too narrow, so the 90%
interval is ``mean ± λ·spread`` with λ fitted on held-out scans (:func:`calibrate_scale`). Each calibration
*scan* is one unit; its risk at λ is the fraction of its body voxels outside the interval. Conformal risk
control (CRC, Angelopoulos et al. 2022) then bounds the expected miscoverage of a new scan by α, and RCPS
(Bates et al. 2021, Hoeffding-Bentkus bound) bounds it by α with probability 1 - δ, provided the new scan is
exchangeable with the calibration scans (same kind of scanner, anatomy, degradation). Both need enough scans
(CRC n >= 1/α - 1 = 9, RCPS n >= 22 for α = δ = 0.1); with fewer, λ is the plain empirical fit and the
stored calibration says ``guarantee: none``. A :class:`ModelCalibration` holds one :class:`Calibration` per
modality and is what checkpoints store.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medsr.config import SamplingConfig
from medsr.errors import MedsrError

__all__ = ["RunningStats", "interval", "BASES", "ScanScore", "uncertainty_score", "coverage", "coverage_by_quartile",
           "NORMAL_Z", "normalised_scores", "image_risk", "hb_p_value", "ScaleFit", "calibrate_scale", "Calibration",
           "ModelCalibration", "as_model_calibration", "fit_spread_calibration", "pooled_scale", "patch_means",
           "spearman"]

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
             hi: float = 0.95, calibration: Calibration | float = 1.0,
             noise_sigma: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Central interval per voxel, drawn as the calibration says (:class:`Calibration`).

    Basis "std": ``mean ± λ·std`` (λ fitted so that the interval covers 90% on held-out scans). Basis
    "std_noise": ``mean ± λ·sqrt(std² + σ²)`` with ``noise_sigma`` σ the truth's white noise estimated from the
    input (:mod:`medsr.noise_floor`; broadcast against ``mean``). Basis "quantile" (v0.1, and uncalibrated
    models): empirical quantiles of kept samples, else the normal approximation ``mean ± z·std``, scaled about
    the mean by λ. Returns (low, high, "normal" | "empirical").
    """
    cal = calibration if isinstance(calibration, Calibration) else Calibration(float(calibration), "quantile")
    if cal.uses_noise_floor:
        if noise_sigma is None:
            raise ValueError("calibration basis 'std_noise' needs the input's noise_sigma")
        spread = torch.sqrt(std.float() ** 2 + torch.as_tensor(noise_sigma, dtype=torch.float32) ** 2)
        return mean - cal.scale * spread, mean + cal.scale * spread, "normal"
    if cal.basis == "std":
        return mean - cal.scale * std, mean + cal.scale * std, "normal"
    if samples is not None and samples.shape[0] >= 2:
        q = torch.quantile(samples.float(), torch.tensor([lo, hi], device=samples.device), dim=0)
        q_lo, q_hi, method = q[0], q[1], "empirical"
    else:
        q_lo, q_hi, method = mean - NORMAL_Z * std, mean + NORMAL_Z * std, "normal"
    if cal.scale != 1.0:
        q_lo = mean + (q_lo - mean) * cal.scale
        q_hi = mean + (q_hi - mean) * cal.scale
    return q_lo, q_hi, method


@dataclass
class ScanScore:
    """How unsure the model is about a scan, in numbers a reviewer can sort by.

    ``value`` (the ranking score) is the mean half-width of the calibrated 90% interval inside the body, in
    percent of the intensity range (CT: the 2048 HU window, so 1% = 20.48 HU; MR: the 0.5-99.5 percentile
    range): "on average, the true value lies within ± this of the enhanced one, 9 times in 10".
    """

    halfwidth_pct: float  # mean calibrated half-width inside the body, % of the intensity range
    halfwidth: float  # the same in scan units (HU for CT)
    mean_std: float  # mean per-voxel (calibrated) std inside the body, as a fraction of the intensity range
    body_voxels: int

    @property
    def value(self) -> float:
        return self.halfwidth_pct


def uncertainty_score(halfwidth_norm: np.ndarray, std_norm: np.ndarray, body: np.ndarray,
                      half_range: float) -> ScanScore:
    """Score from maps in normalised units (range [-1, 1], so a fraction of range is value / 2).

    ``half_range`` is half the normaliser's range in scan units (normalised 1 = that many HU). Without body
    voxels the whole image counts.
    """
    mask = np.asarray(body, bool)
    if not mask.any():
        mask = np.ones_like(mask)
    hw = float(np.asarray(halfwidth_norm, np.float64)[mask].mean())
    sd = float(np.asarray(std_norm, np.float64)[mask].mean())
    return ScanScore(100.0 * hw / 2.0, hw * float(half_range), sd / 2.0, int(mask.sum()))


def coverage(truth: np.ndarray, q_lo: np.ndarray, q_hi: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fraction of true voxels inside their interval (nominal 0.9 for the 5-95% interval)."""
    inside = (truth >= q_lo) & (truth <= q_hi)
    return float(inside[mask].mean() if mask is not None else inside.mean())


# ---------------------------------------------------------------------------------------------------------------
# Calibration of the interval: a scale λ on normalised scores, fitted on held-out scans (units = whole scans)
# ---------------------------------------------------------------------------------------------------------------

ALPHA = 0.1  # tolerated miscoverage per image: the interval is a 90% interval
DELTA = 0.1  # RCPS: the risk bound may fail with probability at most DELTA over the calibration draw
BASES = ("std", "quantile", "std_noise")


def normalised_scores(truth: np.ndarray, mean: np.ndarray, q_lo: np.ndarray, q_hi: np.ndarray) -> np.ndarray:
    """Per voxel, the smallest λ for which ``mean + λ (q - mean)`` contains the truth (inf if none does).

    With ``q = mean ± std`` this is the normalised residual ``|y - mean| / std``; with empirical quantiles it is
    the scale the 5-95% interval needs about the mean (v0.1's "needed scale").
    """
    truth, mean = np.asarray(truth, np.float64), np.asarray(mean, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(truth >= mean, (truth - mean) / (np.asarray(q_hi) - mean),
                      (mean - truth) / (mean - np.asarray(q_lo)))
    up = np.where(truth == mean, 0.0, up)
    return np.where(np.isfinite(up) & (up >= 0), up, np.inf)


def image_risk(scores: np.ndarray, scale: float) -> float:
    """Miscoverage of one image at scale λ: the fraction of its voxels with score above λ."""
    s = np.asarray(scores).ravel()
    return float((s > scale).mean()) if s.size else 0.0


def _binom_cdf(k: int, n: int, p: float) -> float:
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * math.log(p)
            + (n - j) * math.log1p(-p) for j in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def hb_p_value(risk: float, n: int, alpha: float) -> float:
    """Hoeffding-Bentkus p-value of "true risk > alpha" given empirical risk ``risk`` over n images in [0, 1]
    (Bates et al. 2021, RCPS). Small p: the risk is below alpha with confidence 1 - p."""
    r = min(max(risk, 0.0), alpha)

    def kl(y: float, mu: float) -> float:
        a = y * math.log(y / mu) if y > 0 else 0.0
        return a + (1 - y) * math.log((1 - y) / (1 - mu))

    hoeffding = math.exp(-n * kl(r, alpha))
    bentkus = math.e * _binom_cdf(math.ceil(n * risk), n, alpha)
    return min(hoeffding, bentkus, 1.0)


def _max_risk(ok: Any, hi: float) -> float:
    """The largest empirical risk r in [0, hi] with ``ok(r)`` (ok is monotone: true below a threshold)."""
    lo_r, hi_r = 0.0, hi
    if not ok(0.0):
        return -1.0
    for _ in range(60):
        mid = 0.5 * (lo_r + hi_r)
        lo_r, hi_r = (mid, hi_r) if ok(mid) else (lo_r, mid)
    return lo_r


def _smallest_scale(sorted_scores: Sequence[np.ndarray], target: float) -> float:
    """Smallest λ whose mean per-image risk is <= target (exact: λ is one of the scores; inf if none)."""
    if target < 0:
        return math.inf

    def risk(lam: float) -> float:
        return float(np.mean([1.0 - np.searchsorted(s, lam, side="right") / max(len(s), 1)
                              for s in sorted_scores]))

    cands = np.unique(np.concatenate([s[np.isfinite(s)] for s in sorted_scores] + [np.zeros(1)]))
    if risk(float(cands[-1])) > target:
        return math.inf
    lo, hi = 0, len(cands) - 1  # invariant: risk(cands[hi]) <= target
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if risk(float(cands[mid])) <= target else (mid + 1, hi)
    return float(cands[hi])


@dataclass(frozen=True)
class ScaleFit:
    """λ fitted on n calibration images, with the three rules side by side and what the data allows.

    ``empirical``: mean per-image risk <= alpha on the calibration images (no finite-sample guarantee).
    ``crc``: conformal risk control (Angelopoulos et al. 2022): E[risk of a new image] <= alpha, needs
    n >= 1/alpha - 1 images. ``rcps``: Hoeffding-Bentkus upper confidence bound (Bates et al. 2021):
    P(risk > alpha) <= delta, needs (1 - alpha)^n < delta. Non-finite when n is too small.
    """

    empirical: float
    crc: float
    rcps: float
    n: int
    alpha: float
    delta: float

    @property
    def hoeffding_slack(self) -> float:
        """How far the Hoeffding bound sits above the empirical risk for n images: sqrt(log(1/δ) / 2n)."""
        return math.sqrt(math.log(1 / self.delta) / (2 * self.n)) if self.n else math.inf

    @property
    def crc_min_n(self) -> int:
        return math.ceil(1 / self.alpha - 1)

    @property
    def rcps_min_n(self) -> int:
        return math.floor(math.log(self.delta) / math.log(1 - self.alpha)) + 1

    def choose(self) -> tuple[float, str]:
        """The scale to ship and the guarantee it carries: rcps if finite, else crc, else empirical ("none")."""
        for value, name in ((self.rcps, "rcps"), (self.crc, "crc")):
            if math.isfinite(value):
                return value, name
        return self.empirical, "none"


def calibrate_scale(scores: Sequence[np.ndarray], alpha: float = ALPHA, delta: float = DELTA) -> ScaleFit:
    """Fit λ on per-image score arrays (one per calibration scan; see :func:`normalised_scores`).

    Each image's risk is its miscoverage at λ (bounded by 1), so the guarantees hold for images exchangeable
    with the calibration images, not for voxels.
    """
    sorted_scores = [np.sort(np.asarray(s, np.float64).ravel()) for s in scores]
    n = len(sorted_scores)
    if n == 0 or not any(len(s) for s in sorted_scores):
        raise ValueError("calibration needs at least one image with voxels")
    empirical = _smallest_scale(sorted_scores, alpha)
    crc = _smallest_scale(sorted_scores, (alpha * (n + 1) - 1) / n)
    r_max = _max_risk(lambda r: hb_p_value(r, n, alpha) < delta, alpha)
    rcps = _smallest_scale(sorted_scores, r_max) if r_max >= 0 else math.inf
    return ScaleFit(empirical, crc, rcps, n, alpha, delta)


@dataclass(frozen=True)
class Calibration:
    """How the 90% interval is drawn for one modality: ``mean ± λ · spread``.

    ``basis`` "std": spread = sample std (symmetric, normal-shaped; std is reported as λ/z · std so that
    mean ± z·std is the interval). "std_noise": spread = sqrt(std² + σ²), σ the truth's white noise implied by
    the input (:mod:`medsr.noise_floor`); the std output stays the model's part, λ/z · std. "quantile": the
    5-95% empirical quantiles of the samples scaled about the mean by λ (v0.1; std reported as λ · std).
    ``guarantee`` says which rule chose λ (see :class:`ScaleFit`).
    """

    scale: float = 1.0
    basis: str = "quantile"
    alpha: float = ALPHA
    delta: float = DELTA
    guarantee: str = "none"
    n: int = 0
    scans: tuple[str, ...] = ()
    details: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.basis not in BASES:
            raise ValueError(f"calibration basis must be one of {BASES}, got {self.basis!r}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"calibration scale must be finite and positive, got {self.scale}")

    @property
    def uses_noise_floor(self) -> bool:
        """Whether the interval needs the input's noise floor σ (basis "std_noise"; :mod:`medsr.noise_floor`)."""
        return self.basis == "std_noise"

    @property
    def std_factor(self) -> float:
        """What the raw sample std is multiplied by in the std output."""
        return self.scale / NORMAL_Z if self.basis in ("std", "std_noise") else self.scale

    def mismatch(self, samples: int, steps: int, sampler: str = "ddim", shared_first_step: bool = False,
                 turns: int = 1) -> str:
        """Why λ does not apply to a run with these sampling settings ("" when it does, or nothing is recorded).

        λ is fitted at one number of samples and DDIM steps, with or without a shared first step, over one
        number of turns of the input (``self_ensemble``; a calibration that does not record it was fitted on the
        input as given), all stored in ``details``: the spread, and so the coverage of ``mean ± λ·spread``,
        changes with each, so another setting has no measured coverage.
        """
        fitted = {k: int(self.details[k]) for k in ("samples", "steps", "shared_first_step")
                  if math.isfinite(self.details.get(k, math.inf))}
        if not fitted:
            return ""
        fitted["self_ensemble"] = int(self.details.get("self_ensemble", 1))
        used = {"samples": int(samples), "steps": int(steps) if sampler == "ddim" else -1,
                "shared_first_step": int(bool(shared_first_step) and sampler == "ddim"),
                "self_ensemble": int(turns)}
        if all(used[k] == v for k, v in fitted.items()):
            return ""

        def said(n: int, k: int, shared: int, turns: int) -> str:
            return (f"{n} samples x " + (f"{k} DDIM steps" if k > 0 else "DDPM") + (", first step shared" * shared)
                    + (f", self-ensemble of {turns} turns" if turns > 1 else ""))

        at = said(fitted.get("samples", 0), fitted.get("steps", 0), fitted.get("shared_first_step", 0),
                  fitted["self_ensemble"])
        return f"calibrated at {at}; this run used {said(*used.values())}, where its coverage was not measured"

    def to_report(self, key: str, opt: SamplingConfig, turns: int = 1) -> dict[str, Any]:
        """What report.json says about the interval of one run (``opt``: its SamplingConfig; ``turns``: how
        many turns of the input it spread its samples over, :func:`medsr.turns.ensemble_turns`): which
        calibration, and whether it applies."""
        return {"applied": key or "none", **self.to_dict(),
                "mismatch": self.mismatch(opt.samples, opt.steps, opt.sampler, opt.shares_first_step, turns)}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (a bound that does not exist, inf, is stored as None)."""
        return {"scale": float(self.scale), "basis": self.basis, "alpha": float(self.alpha),
                "delta": float(self.delta), "guarantee": self.guarantee, "n": int(self.n),
                "scans": list(self.scans),
                "details": {k: float(v) if math.isfinite(v) else None for k, v in self.details.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(float(d["scale"]), str(d.get("basis", "std")), float(d.get("alpha", ALPHA)),
                   float(d.get("delta", DELTA)), str(d.get("guarantee", "none")), int(d.get("n", 0)),
                   tuple(str(s) for s in d.get("scans", ())),
                   {k: math.inf if v is None else float(v) for k, v in d.get("details", {}).items()})


CALIBRATION_FORMAT = 2  # v0.1 checkpoints store a bare float (the single spread factor)


@dataclass(frozen=True)
class ModelCalibration:
    """A model's calibrations by modality. CT scans use "CT"; every other scan (MR, unknown) uses "MR"."""

    per_modality: dict[str, Calibration] = field(default_factory=dict)
    legacy: bool = False  # read from a v0.1 float

    def summary(self) -> str:
        """One line for listings: the scale per modality, its basis and the number of calibration scans."""
        if not self.per_modality:
            return "none"
        return ", ".join(f"{k}: x{c.scale:.3g} ({c.basis}, n={c.n})" for k, c in sorted(self.per_modality.items()))

    def for_modality(self, modality: str) -> tuple[Calibration, str]:
        """The calibration for a scan of ``modality`` and the key it was filed under ("" for none)."""
        key = "CT" if modality.upper() == "CT" else "MR"
        for k in (key, "*"):
            if k in self.per_modality:
                return self.per_modality[k], k
        return Calibration(), ""

    def to_checkpoint(self) -> float | dict[str, Any]:
        if not self.per_modality:
            return 1.0
        if self.legacy:
            return float(self.per_modality["*"].scale)
        return {"format": CALIBRATION_FORMAT, "per_modality": {k: c.to_dict() for k, c in self.per_modality.items()}}

    def to_report(self) -> dict[str, Any]:
        return {"calibrated": bool(self.per_modality), "legacy_single_factor": self.legacy,
                "per_modality": {k: c.to_dict() for k, c in self.per_modality.items()}}

    @classmethod
    def from_checkpoint(cls, value: Any, where: str = "checkpoint") -> ModelCalibration:
        """Read what a checkpoint stores: a v0.1 float (one factor on the empirical interval) or the dict."""
        try:
            if value is None:
                return cls()
            if isinstance(value, (int, float)):
                if isinstance(value, bool) or not 0.0 < float(value) < 1e6:  # NaN fails this too
                    raise ValueError(f"a v0.1 spread factor must be a positive number, got {value!r}")
                if float(value) == 1.0:
                    return cls()
                return cls({"*": Calibration(float(value), "quantile", guarantee="none")}, legacy=True)
            if isinstance(value, dict) and int(value.get("format", 0)) == CALIBRATION_FORMAT:
                return cls({str(k): Calibration.from_dict(v) for k, v in value["per_modality"].items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise MedsrError(f"{where}: stored calibration is invalid ({exc})") from None
        raise MedsrError(f"{where}: stored calibration has an unknown layout ({type(value).__name__})")


def as_model_calibration(value: float | dict[str, Any] | ModelCalibration | None) -> ModelCalibration:
    """Accept what callers pass when writing a checkpoint: a factor, the stored dict, or the object."""
    return value if isinstance(value, ModelCalibration) else ModelCalibration.from_checkpoint(value)


def fit_spread_calibration(truth: np.ndarray | Sequence[np.ndarray], mean: np.ndarray | Sequence[np.ndarray],
                           q_lo: np.ndarray | Sequence[np.ndarray], q_hi: np.ndarray | Sequence[np.ndarray],
                           mask: np.ndarray | Sequence[np.ndarray] | None = None, target: float = 0.9) -> float:
    """v0.1's single factor: the ``target`` quantile of the scores pooled over all voxels of all scans.

    Kept to compare against (it has no guarantee: voxels are not exchangeable). inf when no finite c reaches it.
    """
    def listed(a: Any) -> list[np.ndarray]:
        return [np.asarray(v) for v in a] if isinstance(a, (list, tuple)) else [np.asarray(a)]

    truths, means, los, his = listed(truth), listed(mean), listed(q_lo), listed(q_hi)
    masks = listed(mask) if mask is not None else [np.ones(t.shape, bool) for t in truths]
    return pooled_scale([normalised_scores(t, m, lo, hi)[k.astype(bool)]
                         for t, m, lo, hi, k in zip(truths, means, los, his, masks)], target)


def pooled_scale(scores: Sequence[np.ndarray], target: float = 0.9) -> float:
    """The ``target`` quantile of scores pooled over every voxel of every image (v0.1's single factor)."""
    need = np.concatenate([np.asarray(s, np.float64).ravel() for s in scores]) if len(scores) else np.zeros(0)
    if need.size == 0:
        raise MedsrError("spread calibration: no voxels to fit on")
    return float(np.quantile(need, target, method="higher"))


def coverage_by_quartile(truth: np.ndarray, q_lo: np.ndarray, q_hi: np.ndarray,
                         mask: np.ndarray | None = None) -> list[float]:
    """Coverage within each quartile of interval width (narrowest first): a good interval covers evenly."""
    m = np.ones(np.shape(truth), bool) if mask is None else np.asarray(mask, bool)
    width = (np.asarray(q_hi) - np.asarray(q_lo))[m]
    inside = ((truth >= q_lo) & (truth <= q_hi))[m]
    if width.size == 0:
        return [math.nan] * 4
    order = np.argsort(width, kind="stable")
    return [float(part.mean()) if part.size else math.nan for part in np.array_split(inside[order], 4)]


def patch_means(vol: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """Means over non-overlapping patches of a 3D volume (a partial patch at the end is dropped), flattened."""
    n = [s // p for s, p in zip(vol.shape, patch)]
    v = vol[tuple(slice(0, k * p) for k, p in zip(n, patch))]
    return v.reshape(n[0], patch[0], n[1], patch[1], n[2], patch[2]).mean(axis=(1, 3, 5)).ravel()


def spearman(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN with fewer than 3 values or a constant input."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(x.size)
        r[order] = np.arange(x.size, dtype=np.float64)
        _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return (sums / counts)[inv]

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])
