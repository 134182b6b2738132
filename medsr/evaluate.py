"""Check a model on scans whose truth is known: degrade, enhance, compare (``medsr evaluate``).

Each high-quality scan is cropped so its size divides by the factors, normalised with the model's normaliser,
degraded with a stated operator (a spec string, see :mod:`medsr.degrade`) and denormalised into a low-resolution
:class:`~medsr.io.Scan` whose coarse voxels are blocks of the fine ones (``refined_affine(low.affine, f)`` is the
truth's affine). That scan is enhanced with :func:`medsr.enhance.enhance_scan`, and three answers are compared
with the truth: interpolation of the input (bicubic 2D / trilinear 3D, SR3's baseline), one diffusion sample, and
the posterior mean. All metrics are in normalised units (the truth's normaliser, range [-1, 1], data range 2):

- PSNR and SSIM (MONAI ``PSNRMetric``/``SSIMMetric``) on the whole image and inside the body (truth above
  ``data.foreground_threshold``); SSIM of a 2D model is the mean over its slices.
- data consistency (SR3): mean/max |A(output) - input| with A the spec's noise-free linear operator.
- the posterior's uncertainty (statistics from :mod:`medsr.uncertainty`): coverage of the model's calibrated
  90% interval, its mean half-width, coverage within width quartiles, the raw-sample calibration curve, and the
  Spearman rank correlation between per-patch std and per-patch |error| of the mean (8x8 in-plane patches
  inside the body): does high uncertainty mark real error? Across scans: does the per-scan score rank them by
  error?
- λ refitted per modality (:func:`medsr.uncertainty.calibrate_scale`, one unit per scan) on a calibration split
  or, when none is given, in-sample, with v0.1's pooled single factor beside it.
- the denoise task (a ``lowdose`` spec): the low-dose slice is simulated with the slice's own pixel size (mm)
  and the CT window of the normalisation (a physical simulation); the "interpolation" row is then the noisy input
  itself, and the classical baselines of :mod:`medsr.baselines` (non-local means, total variation, BM3D if
  installed), each tuned per slice on the truth's PSNR, are scored beside it. Every row also gets the noise std
  in uniform regions (HU) and the 10-90% bone-edge width (mm) of :mod:`medsr.image_quality`, with the truth's
  own values in ``info``.

Which model runs is decided as ``medsr enhance`` decides it (:class:`medsr.model_picker.ModelPicker`), from the
geometry of the degraded input: a thick-slice degradation (a 3D block average along one axis, e.g.
``block:1x1x4`` or ``block:4x1x1``) gives thick slices, so ``auto`` runs the through-plane model along that axis
(:func:`medsr.through_plane.enhance_with_choice`, both orientations pooled); its baseline is cubic interpolation
along the thick axis with the same centring (:func:`medsr.through_plane.cubic_along`), and its metrics are 3D.
Every scan's summary says which model ran and why (``model_choice``).

Figures are drawn by :mod:`medsr.review`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric
from monai.metrics.regression import compute_ssim_and_cs

from medsr import __version__
from medsr.baselines import tuned_baselines
from medsr.degrade import (
    DegradeSpec,
    apply_degradation,
    draw_params,
    parse_spec,
    upsample,
)
from medsr.enhance import EnhanceOptions, choose_slice_axis, enhance_scan, volume_factors
from medsr.errors import MedsrError
from medsr.image_quality import edge_points, edge_width, noise_std, uniform_patches
from medsr.intensity import IntensityConfig, Normaliser, fit_normaliser
from medsr.io.paths import atomic_path
from medsr.io.scan import Scan, coarse_affine, crop_to_factors
from medsr.model import LoadedModel
from medsr.model_choice import ModelChoice
from medsr.model_picker import ModelPicker
from medsr.noise_floor import fine_noise_sigma
from medsr.review import write_evaluation_figures
from medsr.through_plane import cubic_along, enhance_with_choice
from medsr.uncertainty import (
    calibrate_scale,
    coverage,
    coverage_by_quartile,
    normalised_scores,
    patch_means,
    pooled_scale,
    spearman,
)

__all__ = ["Degraded", "degrade_scan", "pixel_size", "thick_slice_axis", "slice_scores", "ScanEvaluation",
           "Evaluation", "evaluate_scans", "write_evaluation", "format_table", "METHODS"]

METHODS = ("interpolation", "sample", "mean")  # every task; the denoise task adds its tuned baselines
BONE_HU = 300.0  # CT: bone edges for the edge-width measure are the boundary of truth > 300 HU
LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # central intervals of the calibration curve
DATA_RANGE = 2.0  # normalised units: the normaliser maps its range onto [-1, 1]
PATCH = 8  # in-plane patch size for the std-error rank correlation


@dataclass
class Degraded:
    """A truth and its degraded input. Volumes are ``(X, Y, Z)``; ``*_norm`` in normalised units."""

    truth: Scan  # cropped high-quality scan (scan units)
    low: Scan  # the degraded input on the coarse grid (scan units)
    truth_norm: np.ndarray
    low_norm: np.ndarray
    norm: Normaliser
    spec: DegradeSpec
    factors: tuple[int, int, int]
    slice_axis: int | None  # 2D operators: the axis slices are cut across; None for 3D


def _items(vol: np.ndarray | torch.Tensor, axis: int | None) -> torch.Tensor:
    """Volume ``(X, Y, Z)`` -> batch ``(S, 1, A, B)`` of slices across ``axis`` (2D) or ``(1, 1, X, Y, Z)``."""
    t = torch.as_tensor(vol, dtype=torch.float32)
    return t.movedim(axis, 0)[:, None] if axis is not None else t[None, None]


def _volume(items: torch.Tensor, axis: int | None) -> np.ndarray:
    return (items[:, 0].movedim(0, axis) if axis is not None else items[0, 0]).numpy()


def pixel_size(scan: Scan, axis: int | None) -> float:
    """In-plane pixel size (mm) of the slices across ``axis`` (3D: the mean of the first two spacings)."""
    inplane = [a for a in range(3) if a != (2 if axis is None else axis)]
    return float(np.mean([scan.spacing[a] for a in inplane]))


def degrade_scan(hr: Scan, spec: DegradeSpec | str, intensity: IntensityConfig | None = None,
                 slice_axis: int | None = None, seed: int = 0) -> Degraded:
    """Crop, normalise, degrade (in normalised units, noise seeded by ``seed``) and denormalise ``hr``.

    A 2D operator works on slices across ``slice_axis`` (default: :func:`medsr.enhance.choose_slice_axis`).
    A ``lowdose`` spec simulates CT physics: it needs a CT scan, and gets the slices' pixel size (mm) and the
    CT window of ``intensity`` (the HU the normalised values stand for).
    """
    spec = parse_spec(spec)
    axis = (choose_slice_axis(hr) if slice_axis is None else int(slice_axis)) if spec.spatial_dims == 2 else None
    if spec.kind == "lowdose" and hr.modality.upper() != "CT":
        raise MedsrError(f"{hr.source}: degradation {spec} simulates low-dose CT, but the scan's modality is "
                         f"{hr.modality}")
    factors = volume_factors(spec, axis)
    truth = crop_to_factors(hr, factors)
    norm = fit_normaliser(truth.array, truth.modality, intensity)
    truth_norm = norm.normalise(truth.array[0])
    params = draw_params(spec, np.random.default_rng(seed))
    window = tuple((intensity or IntensityConfig()).ct_window)
    low_norm = _volume(apply_degradation(_items(truth_norm, axis), params, pixel_size(truth, axis),
                                         (float(window[0]), float(window[1]))), axis)
    low = replace(truth, array=norm.denormalise(low_norm)[None], affine=coarse_affine(truth.affine, factors),
                  dicom_headers=[], series_uid="")
    return Degraded(truth, low, truth_norm, low_norm, norm, spec, factors, axis)


@dataclass
class ScanEvaluation:
    """Everything measured on one scan; ``rows`` are the CSV rows (one per method)."""

    name: str
    source: str
    modality: str
    rows: list[dict[str, Any]]
    curve: dict[str, list[Any]]  # nominal, empirical (body), inside/total counts per level (raw sample spread)
    patch_std: np.ndarray
    patch_err: np.ndarray
    planes: dict[str, np.ndarray]  # 2D planes for the side-by-side figure (normalised units)
    scores: np.ndarray  # per body voxel |truth - mean| / raw std: what calibration fits λ on
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Evaluation:
    """All scans, the overall summary (what ``summary.json`` holds) and the settings."""

    scans: list[ScanEvaluation]
    summary: dict[str, Any]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [row for s in self.scans for row in s.rows]


def _psnr(pred: np.ndarray, truth: np.ndarray) -> float:
    metric = PSNRMetric(max_val=DATA_RANGE)
    value = metric(torch.as_tensor(pred)[None, None], torch.as_tensor(truth)[None, None])
    return float(cast(torch.Tensor, value).mean())


def _ssim(pred: torch.Tensor, truth: torch.Tensor, body: torch.Tensor) -> tuple[float, float]:
    """MONAI SSIM (gaussian 11 window, sigma 1.5, or smaller on small images): whole image and inside ``body``."""
    dims = pred.ndim - 2
    win = min(11, *pred.shape[2:])
    win -= 1 - win % 2  # odd
    if win < 3:
        return math.nan, math.nan
    metric = SSIMMetric(spatial_dims=dims, data_range=DATA_RANGE, win_size=win)
    whole = float(cast(torch.Tensor, metric(pred, truth)).mean())
    ssim_map, _ = compute_ssim_and_cs(pred, truth, dims, [win] * dims, [1.5] * dims, data_range=DATA_RANGE)
    h = win // 2
    inner = body[(slice(None), slice(None), *[slice(h, s - h) for s in body.shape[2:]])]
    return whole, float(ssim_map[inner].mean()) if inner.any() else math.nan


def slice_scores(pred: np.ndarray, truth: np.ndarray, body: np.ndarray) -> dict[str, float]:
    """PSNR and SSIM (whole and in ``body``) of one 2D slice in normalised units, as the evaluation rows."""
    p, t = (torch.as_tensor(np.asarray(a, np.float32))[None, None] for a in (pred, truth))
    ssim, ssim_body = _ssim(p, t, torch.as_tensor(body)[None, None])
    return {"psnr": _psnr(pred, truth), "psnr_body": _psnr(pred[body], truth[body]) if body.any() else math.nan,
            "ssim": ssim, "ssim_body": ssim_body}


def _pick_slice(body: np.ndarray, axis: int) -> int:
    return int(np.argmax(body.sum(axis=tuple(a for a in range(3) if a != axis))))


def _posterior(truth: np.ndarray, mean: np.ndarray, std: np.ndarray, q_lo: np.ndarray, q_hi: np.ndarray,
               samples: np.ndarray, mask: np.ndarray, axis: int | None, std_factor: float, half: float,
               noise: np.ndarray | None = None,
               ) -> tuple[dict[str, Any], dict[str, list[Any]], np.ndarray, np.ndarray, np.ndarray]:
    """Uncertainty metrics of one scan (normalised units): coverage, width, quartiles, curve, rank correlation.

    ``noise`` (broadcastable to the volume): the truth's noise floor of a "std_noise" calibration, which the
    scores of the λ refit then include, as the shipped interval does."""
    counts = []
    for level in LEVELS:  # raw sample spread; one level at a time: memory of two volumes
        q = np.quantile(samples, [0.5 - level / 2, 0.5 + level / 2], axis=0).astype(np.float32)
        counts.append(int(((truth >= q[0]) & (truth <= q[1]))[mask].sum()))
    n_mask = int(mask.sum())
    curve: dict[str, list[Any]] = {"nominal": list(LEVELS), "empirical": [c / n_mask for c in counts],
                                   "inside": counts, "total": [n_mask] * len(LEVELS)}
    patch = [1 if a == axis else PATCH for a in range(3)] if axis is not None else [PATCH] * 3
    patch = [min(p, s) for p, s in zip(patch, truth.shape)]
    p_std, p_err = patch_means(std, patch), patch_means(np.abs(mean - truth), patch)
    keep = patch_means(mask.astype(np.float32), patch) >= 0.5
    p_std, p_err = p_std[keep], p_err[keep]
    halfwidth = 0.5 * (q_hi - q_lo)[mask]
    raw_std = std / std_factor
    if noise is not None:
        raw_std = np.sqrt(raw_std**2 + noise**2)
    scores = normalised_scores(truth, mean, mean - raw_std, mean + raw_std)[mask]
    posterior = {"coverage_90": coverage(truth, q_lo, q_hi), "coverage_90_body": coverage(truth, q_lo, q_hi, mask),
                 "halfwidth_body": float(halfwidth.mean()) * half, "halfwidth_body_pct": 50.0 * float(halfwidth.mean()),
                 "abs_error_body_pct": 50.0 * float(np.abs(mean - truth)[mask].mean()),
                 "spearman_std_error": spearman(p_std, p_err), "patches": int(len(p_std)),
                 "mean_std_body": float(std[mask].mean())}
    quart = coverage_by_quartile(truth, q_lo, q_hi, mask)
    posterior.update({f"coverage_q{i + 1}": v for i, v in enumerate(quart)})
    return posterior, curve, p_std, p_err, scores


def _slices(vol: np.ndarray, axis: int | None) -> list[np.ndarray]:
    """2D slices of a volume across ``axis`` (3D: axial, across the last axis)."""
    a = 2 if axis is None else axis
    return [np.take(vol, i, axis=a) for i in range(vol.shape[a])]


def _stack(planes: list[np.ndarray], axis: int | None) -> np.ndarray:
    return np.stack(planes, axis=2 if axis is None else axis)


def _tuned_baselines(deg: Degraded, axis: int | None) -> tuple[dict[str, np.ndarray], dict[str, list[float]]]:
    """Every available classical denoiser tuned per slice on the truth (normalised units, data range 2):
    the denoised volumes and the chosen strengths (x noise std) per slice."""
    outs: dict[str, list[np.ndarray]] = {}
    strengths: dict[str, list[float]] = {}
    for low, truth in zip(_slices(deg.low_norm, axis), _slices(deg.truth_norm, axis)):
        for name, tuned in tuned_baselines(low, truth, data_range=DATA_RANGE).items():
            outs.setdefault(name, []).append(tuned.output)
            strengths.setdefault(name, []).append(tuned.strength)
    return {n: _stack(v, axis) for n, v in outs.items()}, strengths


@dataclass
class _Regions:
    """Where the noise and edge measures look, per slice, chosen from the truth (scan units)."""

    patches: list[list[tuple[slice, slice]]]
    edges: list[tuple[np.ndarray, np.ndarray]]
    pixel_mm: float


def _regions(truth_scan: np.ndarray, body: np.ndarray, axis: int | None, pixel_mm: float) -> _Regions:
    return _Regions([uniform_patches(t, b) for t, b in zip(_slices(truth_scan, axis), _slices(body, axis))],
                    [edge_points(t, BONE_HU) for t in _slices(truth_scan, axis)], pixel_mm)


def _quality(pred_scan: np.ndarray, regions: _Regions, axis: int | None) -> dict[str, float]:
    """Noise std in uniform patches (RMS over slices, scan units) and bone-edge width (mean over slices, mm)."""
    planes = _slices(pred_scan, axis)
    noise = [noise_std(p, q) for p, q in zip(planes, regions.patches) if q]
    widths = [edge_width(p, pts, nrm, regions.pixel_mm) for p, (pts, nrm) in zip(planes, regions.edges)]
    widths = [w for w in widths if math.isfinite(w)]
    return {"noise_std": float(np.sqrt(np.mean(np.square(noise)))) if noise else math.nan,
            "edge_width_mm": float(np.mean(widths)) if widths else math.nan}


def thick_slice_axis(spec: DegradeSpec) -> int | None:
    """The axis a 3D block average along exactly one axis makes thick (``block:1x1x4`` → 2); None otherwise."""
    coarse = [a for a, f in enumerate(spec.factors) if f > 1]
    if spec.kind == "block" and spec.spatial_dims == 3 and len(coarse) == 1:
        return coarse[0]
    return None


def _pick(hr: Scan, spec: DegradeSpec, picker: ModelPicker) -> tuple[LoadedModel, ModelChoice, int | None]:
    """The model for ``hr`` degraded by ``spec``, chosen from the degraded input's geometry; the slice axis of a
    2D evaluation (None for 3D). A model that cannot undo ``spec`` is refused with the reason of the choice."""
    thick = thick_slice_axis(spec)
    axis = choose_slice_axis(hr) if spec.spatial_dims == 2 else None
    factors = volume_factors(spec, axis)
    low_shape = [max(1, n // f) for n, f in zip(hr.spatial_shape, factors)]
    low_spacing = [s * f for s, f in zip(hr.spacing, factors)]
    model, choice = picker.pick(low_spacing, low_shape, hr.acquisition_axis, axis if axis is not None else 2)
    ms = model.degradation
    if thick is not None:
        factor = spec.factors[thick]
        if choice.task != "throughplane":
            raise MedsrError(f"{hr.source}: {spec} makes thick slices along axis {thick}, but the model chosen is "
                             f"not a through-plane one ({choice.name}: {choice.reason})")
        if (ms.kind, max(ms.factors), ms.profile, ms.sigma) != (spec.kind, factor, spec.profile, spec.sigma):
            raise MedsrError(f"degradation {spec} is not what model {choice.name} undoes ({ms}, along one axis)")
        return model, replace(choice, axis=thick, factor=factor), None
    if spec.spatial_dims != ms.spatial_dims or tuple(spec.factors) != tuple(ms.factors):
        raise MedsrError(f"degradation {spec} has factors {tuple(spec.factors)} but the model was trained for "
                         f"{ms} (factors {tuple(ms.factors)}); use the same factors (model {choice.name}: "
                         f"{choice.reason})")
    return model, choice, axis


def _evaluate_one(hr: Scan, picker: ModelPicker, spec: DegradeSpec, opt: EnhanceOptions, seed: int,
                  name: str, progress: Callable[[int, int], None] | None) -> ScanEvaluation:
    model, choice, axis = _pick(hr, spec, picker)
    cfg = model.config
    deg = degrade_scan(hr, spec, cfg.intensity, axis, seed)
    t0 = time.perf_counter()
    through = thick_slice_axis(spec) is not None
    if through:
        result = enhance_with_choice(deg.low, model, choice, replace(opt, keep_samples=True), progress)
    else:
        result = enhance_scan(deg.low, model, replace(opt, keep_samples=True, slice_axis=axis), progress)
    enhance_s = time.perf_counter() - t0
    norm, truth = deg.norm, deg.truth_norm
    half = 0.5 * (norm.hi - norm.lo)
    mean = norm.normalise(result.mean.array[0])
    std = result.std.array[0] / half
    q_lo, q_hi = norm.normalise(result.q05.array[0]), norm.normalise(result.q95.array[0])
    samples = norm.normalise(result.samples) if result.samples is not None else mean[None]
    if mean.shape != truth.shape:
        raise MedsrError(f"{hr.source}: enhanced shape {mean.shape} differs from the truth's {truth.shape}")
    low_items = _items(deg.low_norm, axis)
    interp = (cubic_along(deg.low_norm, choice.axis, choice.factor) if through
              else _volume(upsample(low_items, spec.factors), axis))
    answers = {"interpolation": interp, "sample": samples[0], "mean": mean}
    body = truth > cfg.data.foreground_threshold
    denoise_task = spec.kind == "lowdose"
    strengths: dict[str, list[float]] = {}
    regions = None
    if denoise_task:
        baselines, strengths = _tuned_baselines(deg, axis)
        answers.update(baselines)
        regions = _regions(deg.truth.array[0], body, axis, pixel_size(deg.truth, axis))
    body_items = _items(body, axis).bool()
    truth_items = _items(truth, axis)
    rows: list[dict[str, Any]] = []
    for method, pred in answers.items():
        pred_items = _items(pred, axis)
        ssim, ssim_body = _ssim(pred_items, truth_items, body_items)
        err = (spec.forward(pred_items) - low_items).abs()
        rows.append({"scan": name, "method": method, "psnr": _psnr(pred, truth),
                     "psnr_body": _psnr(pred[body], truth[body]) if body.any() else math.nan,
                     "ssim": ssim, "ssim_body": ssim_body,
                     "consistency_mae": float(err.mean()), "consistency_max": float(err.max())})
        if regions is not None:
            rows[-1].update(_quality(norm.denormalise(pred), regions, axis))
    mask = body if body.any() else np.ones_like(body)
    cal, _ = model.calibration.for_modality(hr.modality)
    noise = None
    if cal.uses_noise_floor:  # per input slice, along the slicing axis (3D: one value)
        shape = [1, 1, 1]
        shape[axis if axis is not None else 2] = -1
        noise = fine_noise_sigma(low_items, spec).numpy().reshape(shape)
    posterior, curve, p_std, p_err, scores = _posterior(truth, mean, std, q_lo, q_hi, samples, mask, axis,
                                                        cal.std_factor, half, noise)
    for row in rows:
        row.update(posterior if row["method"] == "mean" else {key: math.nan for key in posterior})
    view = axis if axis is not None else (0 if through and choice.axis != 0 else 1 if through else 2)
    index = _pick_slice(body, view)
    planes = {"truth": truth, "interpolation": answers["interpolation"], "sample": samples[0], "mean": mean,
              "std": std, "error": np.abs(mean - truth)}
    planes = {key: np.take(v, index, axis=view).T for key, v in planes.items()}
    info: dict[str, Any] = {"source": hr.source, "modality": hr.modality, "shape": list(deg.truth.spatial_shape),
            "input_shape": list(deg.low.spatial_shape), "factors": list(deg.factors), "slice_axis": axis,
            "normaliser": norm.to_dict(), "body_voxels": int(body.sum()), "interval_method": result.interval_method,
            "uncertainty_score": result.score.value, "enhance_s": round(enhance_s, 3),
            "self_ensemble": result.info.get("self_ensemble", 1),
            "refit_basis": "std_noise" if noise is not None else "std",
            "truth_consistency_mae": float((spec.forward(truth_items) - low_items).abs().mean()),
            "interpolation": f"cubic along axis {choice.axis}" if through else
            "bicubic" if spec.spatial_dims == 2 else "trilinear",
            "model": {"path": model.path, "sha256": model.sha256, "step": model.step},
            "model_choice": {"name": choice.name, "task": choice.task, "axis": choice.axis, "factor": choice.factor,
                             "reason": choice.reason}}
    if regions is not None:
        info.update({"pixel_mm": regions.pixel_mm, "baseline_strengths": strengths,
                     "truth_quality": _quality(deg.truth.array[0], regions, axis),
                     "uniform_patches": sum(len(q) for q in regions.patches),
                     "edge_points": sum(len(p) for p, _ in regions.edges)})
    return ScanEvaluation(name, hr.source, hr.modality, rows, curve, p_std, p_err, planes, scores, info)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _refit(fit_on: list[ScanEvaluation], evaluated: list[ScanEvaluation]) -> dict[str, Any]:
    """λ per modality group fitted on ``fit_on`` (one unit per scan), checked on ``evaluated``: ``mean ± λ·std``,
    or ``mean ± λ·sqrt(std² + σ²)`` where the model's calibration has the noise floor (``basis``)."""
    out: dict[str, Any] = {}
    for group in sorted({"CT" if s.modality.upper() == "CT" else "MR" for s in fit_on}):
        def member(s: ScanEvaluation, group: str = group) -> bool:
            return ("CT" if s.modality.upper() == "CT" else "MR") == group

        fit = calibrate_scale([s.scores for s in fit_on if member(s)])
        scale, guarantee = fit.choose()
        checked = [s for s in evaluated if member(s)]
        per_scan = {s.name: float((s.scores <= scale).mean()) for s in checked}
        out[group] = {"basis": sorted({s.info["refit_basis"] for s in fit_on if member(s)}),
                      "scale": scale, "guarantee": guarantee, "n": fit.n, "empirical": fit.empirical, "crc": fit.crc,
                      "rcps": fit.rcps, "hoeffding_slack": fit.hoeffding_slack, "coverage_90_body": per_scan,
                      "single_factor": pooled_scale([s.scores for s in fit_on if member(s)])}
    return out


def evaluate_scans(scans: Sequence[Scan], model: LoadedModel | ModelPicker, degrade: str | DegradeSpec,
                   options: EnhanceOptions | None = None, calibration_scans: Sequence[Scan] = (),
                   progress: Callable[[int, int], None] | None = None) -> Evaluation:
    """Degrade each high-quality scan with ``degrade``, enhance it with ``model`` (a loaded model, or a
    :class:`~medsr.model_picker.ModelPicker`: ``auto`` chooses per scan) and score it (module docstring).

    ``calibration_scans`` (a split held out from ``scans``, by scan) are enhanced only to refit λ per modality;
    without them λ is refitted in-sample on ``scans`` (and says so).
    """
    opt = options or EnhanceOptions()
    spec = parse_spec(degrade)
    picker = model if isinstance(model, ModelPicker) else ModelPicker(model.path, opt.device, {model.path: model})
    if not scans:
        raise MedsrError("no scans to evaluate")
    for scan in scans:  # a model that cannot undo the degradation fails before anything slow
        _pick(scan, spec, picker)
    evaluated, names = [], set()
    for i, scan in enumerate(scans):
        name = scan.name if scan.name not in names else f"{scan.name}_{i}"
        names.add(name)
        evaluated.append(_evaluate_one(scan, picker, spec, opt, opt.seed + 7919 * i, name, progress))
    calib = [_evaluate_one(s, picker, spec, opt, opt.seed + 104729 + 7919 * i, f"calib_{i}", progress)
             for i, s in enumerate(calibration_scans)]
    methods = list(dict.fromkeys(r["method"] for s in evaluated for r in s.rows))  # METHODS, then baselines
    first, _, _ = _pick(scans[0], spec, picker)
    overall = {m: {key: _mean([r[key] for s in evaluated for r in s.rows if r["method"] == m])
                   for key in evaluated[0].rows[0] if key not in ("scan", "method")} for m in methods}
    for m in methods:
        if m != "mean":
            overall[m] = {k: v for k, v in overall[m].items() if math.isfinite(v)}
    inside = np.sum([s.curve["inside"] for s in evaluated], axis=0)
    total = np.sum([s.curve["total"] for s in evaluated], axis=0)
    all_std = np.concatenate([s.patch_std for s in evaluated])
    all_err = np.concatenate([s.patch_err for s in evaluated])
    mean_rows = [r for s in evaluated for r in s.rows if r["method"] == "mean"]
    summary = {
        "medsr_version": __version__,
        "model": {"path": first.path, "sha256": first.sha256, "step": first.step, "trained_for": first.config.degrade,
                  "calibration": first.calibration.to_report(),
                  "choice": evaluated[0].info["model_choice"]},  # per scan: scans[i].model_choice
        "degradation": str(spec),
        "sampling": {"sampler": opt.sampler, "steps": opt.steps, "samples": opt.samples, "seed": opt.seed,
                     "data_consistency_projection": opt.project, "first_step_shared": opt.shares_first_step,
                     "self_ensemble": evaluated[0].info["self_ensemble"]},  # turns used (per scan: scans[i])
        "metrics": {"units": "normalised (truth's normaliser, data range 2)",
                    "interpolation": ("the noisy input itself (denoise task)" if spec.kind == "lowdose" else
                                      evaluated[0].info["interpolation"]),
                    "baselines": ("classical denoisers (medsr.baselines), strength tuned per slice on the truth's "
                                  "PSNR" if spec.kind == "lowdose" else "none"),
                    "noise_std": "std in the 10% most uniform 8x8 patches inside the body (truth's gradient), "
                                 "RMS over patches, scan units (HU)",
                    "edge_width_mm": f"10-90% width of the mean profile across the truth's strongest edges of "
                                     f"truth > {BONE_HU:g} HU (mm)",
                    "body": f"truth > {first.config.data.foreground_threshold} (normalised)",
                    "consistency": "mean/max |A(output) - input|, A = the spec's noise-free operator",
                    "spearman": f"per-patch std vs |error of mean|, {PATCH}-voxel patches >= half body",
                    "halfwidth": "mean half-width of the model's calibrated 90% interval in the body (scan units; "
                                 "_pct: % of the intensity range)"},
        "overall": overall,
        "calibration": {"nominal": 0.9, "coverage_90_body": overall["mean"]["coverage_90_body"],
                        "coverage_90": overall["mean"]["coverage_90"],
                        "curve": {"nominal": list(LEVELS), "empirical": (inside / np.maximum(total, 1)).tolist(),
                                  "spread": "raw samples (before calibration)"},
                        "spearman_pooled": spearman(all_std, all_err),
                        "spearman_score_vs_error_across_scans": spearman(
                            [r["halfwidth_body_pct"] for r in mean_rows],
                            [r["abs_error_body_pct"] for r in mean_rows])},
        "refit": {"in_sample": not calib, "fitted_on": [s.source for s in (calib or evaluated)],
                  "per_modality": _refit(calib or evaluated, evaluated)},
        "scans": [{"name": s.name, **s.info, "rows": s.rows} for s in evaluated],
    }
    return Evaluation(evaluated, summary)


def _clean(value: Any) -> Any:
    """NaN/inf -> None so that summary.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


CSV_FIELDS = ["scan", "method", "psnr", "psnr_body", "ssim", "ssim_body", "consistency_mae", "consistency_max",
              "coverage_90", "coverage_90_body", "halfwidth_body", "halfwidth_body_pct", "abs_error_body_pct",
              "coverage_q1", "coverage_q2", "coverage_q3", "coverage_q4", "spearman_std_error", "patches",
              "mean_std_body", "noise_std", "edge_width_mm"]


def write_evaluation(evaluation: Evaluation, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``metrics.csv``, ``summary.json`` and the figures (:func:`medsr.review.write_evaluation_figures`)
    into ``out_dir``, each atomically; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with atomic_path(out / "metrics.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for row in evaluation.rows:
                writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else
                                     f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    written.append(out / "metrics.csv")
    written += write_evaluation_figures(evaluation.scans, evaluation.summary, out)
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(_clean(evaluation.summary), indent=2))
    written.append(out / "summary.json")
    return written


def format_table(evaluation: Evaluation) -> str:
    """A short text table: PSNR/SSIM/consistency per scan and method, overall, then calibration."""
    denoise = any("noise_std" in row for row in evaluation.rows)
    head = f"{'scan':<20} {'method':<14} {'PSNR':>7} {'PSNRbody':>8} {'SSIM':>6} {'SSIMbody':>8} {'consist':>8}"
    head += f" {'noiseHU':>8} {'edge_mm':>8}" if denoise else ""
    lines = [head, "-" * len(head)]

    def line(scan: str, method: str, r: dict[str, Any]) -> str:
        def f(key: str, width: int, digits: int) -> str:
            v = r.get(key, math.nan)
            return f"{v:>{width}.{digits}f}" if v is not None and math.isfinite(v) else f"{'n/a':>{width}}"
        text = (f"{scan[:20]:<20} {method:<14} {f('psnr', 7, 2)} {f('psnr_body', 8, 2)} {f('ssim', 6, 3)} "
                f"{f('ssim_body', 8, 3)} {f('consistency_mae', 8, 4)}")
        return text + (f" {f('noise_std', 8, 1)} {f('edge_width_mm', 8, 3)}" if denoise else "")

    for row in evaluation.rows:
        lines.append(line(row["scan"], row["method"], row))
    for method, values in evaluation.summary["overall"].items():
        lines.append(line("overall", method, values))
    cal, refit = evaluation.summary["calibration"], evaluation.summary["refit"]
    rho = f"{cal['spearman_pooled']:.3f}" if math.isfinite(cal["spearman_pooled"]) else "n/a"
    lines.append(f"coverage of the model's 90% interval: {cal['coverage_90_body']:.3f} in body, "
                 f"{cal['coverage_90']:.3f} whole image (nominal 0.900); Spearman(std, |error|) per patch: {rho}")
    for group, fit in refit["per_modality"].items():
        form = "mean ± λ·sqrt(std² + σ²)" if "std_noise" in fit["basis"] else "mean ± λ·std"
        lines.append(f"refitted λ ({group}, {form}, {fit['n']} scans, "
                     f"{'in-sample' if refit['in_sample'] else 'calibration split'}): {fit['scale']:.3f}, "
                     f"guarantee {fit['guarantee']}")
    lines.append("(PSNR dB and consistency in normalised units, data range 2)")
    return "\n".join(lines)
