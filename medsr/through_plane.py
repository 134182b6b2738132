"""Thick slices made thin: a 2D model that refines one image axis, run on the planes that contain the thick axis.

The SMORE family's idea (Zhao et al. 2020), with diffusion samples: a 2D model trained to undo a block average of
``f`` thin slices along its second image axis (degradation ``block:1xf``) is applied on the two families of
planes that contain the scan's thick axis (for axial thick slices: sagittal and coronal). Each orientation gives
its own samples; ALL samples of both orientations are pooled into one mean and one spread (exact pooled moments,
Chan et al.'s formula), so fusing never averages two smooth estimates into a blurrier one, and disagreement
between orientations shows up as uncertainty. Each orientation's samples are projected so that block-averaging
them along the thick axis gives back the input; the block average is linear, so the pooled mean is consistent
too.

The volume is permuted so that the thick axis is the array axis the model refines (whatever array axis it is in
the file: NIfTI may be stored in any orientation), enhanced with :func:`medsr.enhance.enhance_scan` once per
orientation, and permuted back with its affine, so the output grid is refined along the thick axis only, fine
slices centred within each thick slice (:func:`medsr.io.scan.refined_affine`). The result is an ordinary
:class:`medsr.enhance.EnhanceResult`: outputs, report and DICOM writing need nothing new.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch

from medsr.config import SamplingConfig
from medsr.degrade import DegradeSpec, upsample
from medsr.enhance import EnhanceResult, enhance_scan
from medsr.errors import MedsrError
from medsr.intensity import fit_normaliser
from medsr.io.scan import Scan
from medsr.model import LoadedModel
from medsr.model_choice import ModelChoice, is_through_plane
from medsr.noise_floor import fine_noise_sigma
from medsr.uncertainty import Calibration, interval, uncertainty_score

__all__ = ["enhance_with_choice", "factor_position", "thick_axis_of", "permute_scan", "pooled_moments", "cubic_along",
           "scan_calibration", "enhance_through_plane"]


def factor_position(spec: DegradeSpec) -> int:
    """Which image axis (0 or 1) of the model's 2D plane carries the factor."""
    if not is_through_plane(spec):
        raise MedsrError(f"degradation {spec} is not a through-plane one (a 2D block average along one image axis, "
                         "e.g. block:1x4)")
    return 0 if spec.factors[0] > 1 else 1


def thick_axis_of(scan: Scan) -> int:
    """The array axis of largest spacing (ties: the last), the one thick slices are stacked along."""
    spacing = np.asarray(scan.spacing)
    return int(np.flatnonzero(spacing >= spacing.max() * (1 - 1e-3))[-1])


def permute_scan(scan: Scan, order: Sequence[int]) -> Scan:
    """The scan with its spatial axes reordered (new axis k = old axis ``order[k]``), affine moved with them, so
    every voxel keeps its world position; the acquisition axis follows its axis."""
    order = [int(a) for a in order]
    if sorted(order) != [0, 1, 2]:
        raise ValueError(f"order must be a permutation of 0, 1, 2, got {order}")
    affine = np.asarray(scan.affine, np.float64).copy()
    affine[:3, :3] = affine[:3, order]
    array = np.ascontiguousarray(np.transpose(scan.array, [0, *(a + 1 for a in order)]))
    acq = None if scan.acquisition_axis is None else order.index(int(scan.acquisition_axis))
    return replace(scan.with_array(array, affine), acquisition_axis=acq)


def pooled_moments(counts: Sequence[int], means: Sequence[np.ndarray],
                   m2s: Sequence[np.ndarray]) -> tuple[int, np.ndarray, np.ndarray]:
    """Exact count, mean and sum of squared deviations of the union of sample groups from each group's own
    (Chan et al.'s pairwise merge, as :class:`medsr.uncertainty.RunningStats` does for raw samples)."""
    n = int(counts[0])
    mean = np.asarray(means[0], np.float64)
    m2 = np.asarray(m2s[0], np.float64)
    for n_b, mean_b, m2_b in zip(counts[1:], means[1:], m2s[1:]):
        total = n + int(n_b)
        delta = np.asarray(mean_b, np.float64) - mean
        mean = mean + delta * (n_b / total)
        m2 = m2 + np.asarray(m2_b, np.float64) + delta**2 * (n * n_b / total)
        n = total
    return n, mean, m2


def cubic_along(array: np.ndarray, axis: int, factor: int) -> np.ndarray:
    """Cubic interpolation of a ``(X, Y, Z)`` volume along one axis by ``factor``, fine slices centred in each
    coarse one (the baseline a through-plane result is scored against; :func:`medsr.degrade.upsample`)."""
    vol = torch.from_numpy(np.ascontiguousarray(array, np.float32)).movedim(axis, 2)  # (A, B, Z)
    fine = upsample(vol[:, None], (1, int(factor)))[:, 0]
    return fine.movedim(2, axis).numpy()


def scan_calibration(model: LoadedModel, scan: Scan) -> tuple[Calibration, str]:
    """The calibration :func:`medsr.enhance.enhance_scan` applies to this scan (per modality) and its key."""
    return model.calibration.for_modality(scan.modality)


def _seed(seed: int, orientation: int) -> int:
    return int(np.random.SeedSequence([seed, 7919, orientation]).generate_state(1)[0])


def enhance_through_plane(scan: Scan, model: LoadedModel, options: SamplingConfig | None = None,
                          thick_axis: int | None = None,
                          progress: Callable[[int, int], None] | None = None) -> EnhanceResult:
    """Refine ``scan`` along ``thick_axis`` (default: its coarsest axis) with a through-plane ``model``.

    ``options.samples`` samples are split between the two orientations (the first gets the odd one), each
    orientation with its own seed; see the module docstring for the pooling. One sample runs the first orientation
    only (what was asked: one sample, half the cost; nothing is fused and the spread is zero).
    """
    opt = options or SamplingConfig()
    spec = model.degradation
    pos = factor_position(spec)
    factor = int(spec.factors[pos])
    thick = thick_axis_of(scan) if thick_axis is None else int(thick_axis)
    if thick not in (0, 1, 2):
        raise MedsrError(f"{scan.source}: thick axis must be 0, 1 or 2, got {thick_axis}")
    if scan.spatial_shape[thick] < 2 or sorted(scan.spatial_shape)[1] < 2:
        raise MedsrError(f"{scan.source}: through-plane enhancement needs a volume (shape {scan.spatial_shape})")
    t0 = time.perf_counter()
    others = [a for a in range(3) if a != thick]
    target = 2 if pos == 1 else 0  # where the thick axis must sit so it is the refined image axis in every plane
    order = others + [thick] if target == 2 else [thick] + others
    inverse = [int(i) for i in np.argsort(order)]
    work = permute_scan(scan, order)
    n_first = (opt.samples + 1) // 2
    counts = [n for n in (n_first, opt.samples - n_first) if n]
    slice_axes = [a for a in range(3) if a != target][:len(counts)]  # the plane families that contain the thick axis
    timesteps = model.config.diffusion.num_train_timesteps  # one orientation's passes, as enhance_scan counts them
    totals = [work.spatial_shape[sa] * replace(opt, samples=n).passes(num_train_timesteps=timesteps)
              for sa, n in zip(slice_axes, counts)]
    results: list[EnhanceResult] = []
    for k, (sa, n) in enumerate(zip(slice_axes, counts)):
        offset = sum(totals[:k])

        def report(done: int, _total: int, offset: int = offset) -> None:
            if progress is not None:
                progress(offset + done, sum(totals))

        results.append(enhance_scan(work, model, replace(opt, slice_axis=sa, samples=n, seed=_seed(opt.seed, k)),
                                    report))
    cal, cal_key = scan_calibration(model, scan)
    c = cal.std_factor  # what each orientation's std was multiplied by
    means = [r.mean.array[0] for r in results]
    m2s = [(r.std.array[0].astype(np.float64) / c) ** 2 * (n - 1) for r, n in zip(results, counts)]
    n_total, mean64, m2 = pooled_moments(counts, means, m2s)
    raw_std = np.sqrt(m2 / max(1, n_total - 1)) if n_total > 1 else np.zeros_like(m2)
    mean = mean64.astype(np.float32)
    samples = None
    if opt.keep_samples:
        samples = np.concatenate([r.samples for r in results if r.samples is not None])
    norm = fit_normaliser(work.array, work.modality, model.config.intensity)
    half_range = 0.5 * (norm.hi - norm.lo)
    noise = None
    if cal.uses_noise_floor:  # one σ for the volume, from the planes of the first orientation (scan units)
        planes = torch.from_numpy(norm.normalise(work.array[0])).movedim(slice_axes[0], 0)[:, None]
        noise = float(fine_noise_sigma(planes, spec).mean()) * half_range
    q05, q95, method = _interval(mean, raw_std.astype(np.float32), samples, cal, noise)
    std = (raw_std * c).astype(np.float32)
    volume_spec = replace(spec, factors=(factor, 1, 1) if target == 0 else (1, 1, factor))  # same slice profile
    consistency = _consistency(mean, work.array[0], volume_spec, half_range)
    body = norm.normalise(mean) > model.config.data.foreground_threshold
    score = uncertainty_score(0.5 * (q95 - q05) / half_range, std / half_range, body, half_range)

    factors = [1, 1, 1]
    factors[thick] = factor
    fine_affine = permute_scan(results[0].mean, inverse).affine

    def out(array: np.ndarray) -> Scan:
        return scan.with_array(np.transpose(array, inverse)[None], fine_affine)

    kept = None if samples is None else np.ascontiguousarray(np.transpose(samples, [0, *(a + 1 for a in inverse)]))
    timings = {"prepare_s": sum(r.timings["prepare_s"] for r in results),
               "sampling_s": sum(r.timings["sampling_s"] for r in results),
               "total_s": time.perf_counter() - t0}
    first = results[0].info
    info = {"task": "throughplane", "thick_axis": thick, "slice_axis": order[slice_axes[0]],
            "orientations": [{"slice_axis": order[sa], "samples": n, "seed": _seed(opt.seed, k),
                              "data_consistency": r.consistency}
                             for k, (sa, n, r) in enumerate(zip(slice_axes, counts, results))],
            "samples_total": n_total, "window": first["window"], "device": first["device"], "amp": first["amp"],
            "self_ensemble": first["self_ensemble"], "normaliser": norm.to_dict(),
            "calibration": cal.to_report(cal_key, opt, first["self_ensemble"])}
    return EnhanceResult(out(mean), out(std), out(q05), out(q95), score, consistency,
                         (factors[0], factors[1], factors[2]), method, timings, kept, info)


def _interval(mean: np.ndarray, raw_std: np.ndarray, samples: np.ndarray | None,
              scale: Calibration, noise_sigma: float | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """The 5-95% interval of the pooled samples, one plane at a time (quantiles of a whole volume at once would
    need all of it in one tensor): :func:`medsr.uncertainty.interval` with the model's spread scale."""
    lo, hi = np.empty_like(mean), np.empty_like(mean)
    method = "normal"
    for i in range(mean.shape[0]):
        s = None if samples is None else torch.from_numpy(np.ascontiguousarray(samples[:, i]))
        q_lo, q_hi, method = interval(torch.from_numpy(mean[i]), torch.from_numpy(raw_std[i]), s, calibration=scale,
                                      noise_sigma=noise_sigma)
        lo[i], hi[i] = q_lo.numpy(), q_hi.numpy()
    return lo, hi, method


def _consistency(mean: np.ndarray, low: np.ndarray, spec: DegradeSpec, half_range: float) -> dict[str, float]:
    """Degrade the pooled mean along the thick axis (the model's operator, its slice profile included) and
    compare with the input, in scan units and as a fraction of the normalised range (as
    :func:`medsr.enhance.enhance_scan` reports it)."""
    redeg = spec.forward(torch.from_numpy(mean).double()[None, None])[0, 0].numpy()
    err = np.abs(redeg.astype(np.float64) - low)
    return {"mean_abs_error": float(err.mean()), "max_abs_error": float(err.max()),
            "relative_mean_abs_error": float(err.mean() / (2.0 * half_range))}


def enhance_with_choice(scan: Scan, model: LoadedModel, choice: ModelChoice, options: SamplingConfig | None = None,
                        progress: Callable[[int, int], None] | None = None) -> EnhanceResult:
    """Run what ``choice`` says (through-plane along its axis, or in-plane across it) and record the choice and
    its reason in the result (report.json's ``model.choice``)."""
    opt = options or SamplingConfig()
    if choice.task == "throughplane":
        result = enhance_through_plane(scan, model, opt, choice.axis, progress)
    else:
        if is_through_plane(model.degradation):
            raise MedsrError(f"model {choice.name}: a through-plane model ({model.degradation}) cannot run in-plane")
        result = enhance_scan(scan, model, replace(opt, slice_axis=choice.axis), progress)
    result.info["model_choice"] = {"name": choice.name, "task": choice.task, "axis": choice.axis,
                                   "factor": choice.factor, "reason": choice.reason}
    return result
