"""Enhance a whole scan: N diffusion samples → posterior mean, per-voxel spread, interval, score.

A 2D model works slice by slice in the plane orthogonal to its slice axis (a singleton axis if there is one,
else the axis of largest spacing); a 3D model works on the volume. Slices are processed in chunks, and for each
chunk all samples are drawn (batched, ``batch_size`` images per network call), so memory is bounded by the
chunk, never by the scan: the outputs are the only whole-scan arrays. Every (sample, slice) pair has its own
generator seeded from (seed, sample, slice), so results do not depend on chunking or batching.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medsr.config import SamplingConfig
from medsr.degrade import DegradeSpec, upsample
from medsr.errors import Category, MedsrError
from medsr.intensity import Normaliser, fit_normaliser
from medsr.io.scan import Scan, refined_affine
from medsr.model import LoadedModel
from medsr.noise_floor import fine_noise_sigma
from medsr.runtime import resolve_amp, resolve_device
from medsr.sampling import sample
from medsr.turns import Turn, ensemble_turns, shape_groups, turn, unturn
from medsr.uncertainty import RunningStats, ScanScore, interval, uncertainty_score

__all__ = ["SamplingConfig", "EnhanceOptions", "EnhanceResult", "enhance_scan", "choose_slice_axis", "volume_factors"]


EnhanceOptions = SamplingConfig  # the name notebooks and v0.1 code use; the one sampling config lives in medsr.config


@dataclass
class EnhanceResult:
    """Everything ``medsr enhance`` writes, as arrays on the refined grid (scan units: HU for CT)."""

    mean: Scan
    std: Scan
    q05: Scan
    q95: Scan
    score: ScanScore
    consistency: dict[str, float]
    factors: tuple[int, int, int]
    interval_method: str
    timings: dict[str, float]
    samples: np.ndarray | None = None  # (N, X, Y, Z) when keep_samples
    info: dict[str, Any] = field(default_factory=dict)


def choose_slice_axis(scan: Scan) -> int:
    """The axis a 2D model slices across: a singleton axis, else the acquisition axis where the file gives one
    (DICOM: the model works in the plane the images were acquired in, even when its pixels are coarser than
    the slice spacing), else the one of largest spacing (thick slices).

    Spacings equal to within 0.1% count as equal (they often differ by float noise), and ties go to the last
    axis, Z: an isotropic volume is sliced axially, as 2D models are trained, not along X by accident.
    """
    shape = scan.spatial_shape
    singleton = [a for a in range(3) if shape[a] == 1]
    if singleton:
        return singleton[-1]
    if scan.acquisition_axis is not None:
        return int(scan.acquisition_axis)
    spacing = np.asarray(scan.spacing)
    return int(np.flatnonzero(spacing >= spacing.max() * (1 - 1e-3))[-1])


def volume_factors(spec: DegradeSpec, slice_axis: int | None) -> tuple[int, int, int]:
    """The model's factors placed on the scan's three axes (1 along a 2D model's slice axis)."""
    if spec.spatial_dims == 3:
        return tuple(int(f) for f in spec.factors)  # type: ignore[return-value]
    full = [1, 1, 1]
    in_plane = [a for a in range(3) if a != slice_axis]
    full[in_plane[0]], full[in_plane[1]] = (int(f) for f in spec.factors)
    return tuple(full)  # type: ignore[return-value]


FIRST_STEP_STREAM = 2**32 - 1  # the seed stream of a shared first step (sample indices never reach it)


def _seed(seed: int, sample_index: int, slice_index: int) -> int:
    return int(np.random.SeedSequence([seed, sample_index, slice_index]).generate_state(1)[0])


def enhance_scan(scan: Scan, model: LoadedModel, options: SamplingConfig | None = None,
                 progress: Callable[[int, int], None] | None = None) -> EnhanceResult:
    """Enhance ``scan`` (the low-resolution input) with ``model``; see the module docstring."""
    opt = options or SamplingConfig()
    cfg = model.config
    spec = model.degradation
    device = resolve_device(opt.device)
    amp = resolve_amp(opt.amp, device)  # auto: bf16 where native (CPU: 1.4x faster, same PSNR; RESULTS.md)
    t0 = time.perf_counter()
    two_d = spec.spatial_dims == 2
    axis = (choose_slice_axis(scan) if opt.slice_axis is None else int(opt.slice_axis)) if two_d else None
    if axis is not None and axis not in (0, 1, 2):
        raise MedsrError(f"slice_axis must be 0, 1 or 2, got {opt.slice_axis}")
    factors = volume_factors(spec, axis)
    turns_used = ensemble_turns(spec, opt.self_ensemble, opt.samples)  # a geometric self-ensemble (SamplingConfig)
    norm = fit_normaliser(scan.array, scan.modality, cfg.intensity)
    cal, cal_key = model.calibration.for_modality(scan.modality)
    low = torch.from_numpy(norm.normalise(scan.array[0]))
    if axis is not None:  # 2D model
        low = low.movedim(axis, 0)[:, None]  # (S, 1, A, B): slices as a batch
    else:
        low = low[None, None]
    if any(s < 2 for s in low.shape[2:]):
        raise MedsrError(f"{scan.source}: image too small to enhance (in-plane size {tuple(low.shape[2:])})",
                          Category.TOO_SMALL)
    window = tuple(opt.window) if opt.window else tuple(cfg.data.patch_size)
    n_items = low.shape[0]
    chunk = max(1, opt.batch_size // opt.samples) if two_d else 1
    fine_shape = [s * f for s, f in zip(low.shape[2:], spec.factors)]
    outs = {k: torch.empty((n_items, *fine_shape)) for k in ("mean", "std", "q05", "q95")}
    kept = torch.empty((opt.samples, n_items, *fine_shape)) if opt.keep_samples else None
    work = _Progress(n_items * opt.passes(num_train_timesteps=cfg.diffusion.num_train_timesteps), progress)
    method = "normal"
    t1 = time.perf_counter()
    for start in range(0, n_items, chunk):
        stop = min(n_items, start + chunk)
        y = low[start:stop].to(device)
        cond = upsample(y, spec.factors)
        first = None
        if opt.shares_first_step:  # one first-step pass per slice, from its own noise; turned for each sample's turn
            first = sample(model.net, cfg.diffusion, cond,
                           [torch.Generator(device=device).manual_seed(_seed(opt.seed, FIRST_STEP_STREAM, j))
                            for j in range(start, stop)], steps=opt.steps, lowres=y, spec=spec, project=opt.project,
                           roi_size=window, overlap=opt.overlap, sw_batch_size=opt.batch_size, amp=amp,
                           first_only=True)
            work.add(stop - start)  # one pass per slice, counted once
        all_samples = _draw_chunk(model, opt, y, cond, first, start, turns_used, window, amp, work)
        if not bool(torch.isfinite(all_samples).all()):  # never write an all-NaN "result" (damaged weights, overflow)
            raise MedsrError(f"{scan.source}: the model {model.path} produced NaN/Inf values; its weights may "
                             "be damaged (no output written)")
        stats = RunningStats()
        stats.update(all_samples)
        mean = stats.mean.float()  # type: ignore[union-attr]
        raw_std = stats.std().float()
        std = raw_std * cal.std_factor
        noise = None
        if cal.uses_noise_floor:  # the truth's own white noise, implied by this input (medsr.noise_floor)
            noise = fine_noise_sigma(y, spec).reshape(-1, *[1] * (mean.ndim - 1))
        q_lo, q_hi, method = interval(mean, raw_std, all_samples, calibration=cal, noise_sigma=noise)
        for key, value in (("mean", mean), ("std", std), ("q05", q_lo), ("q95", q_hi)):
            outs[key][start:stop] = value
        if kept is not None:
            kept[:, start:stop] = all_samples
    t2 = time.perf_counter()
    consistency = _consistency(outs["mean"], low, spec, norm)
    body = outs["mean"].numpy() > cfg.data.foreground_threshold
    score = uncertainty_score(0.5 * (outs["q95"] - outs["q05"]).numpy(), outs["std"].numpy(), body,
                              0.5 * (norm.hi - norm.lo))

    def to_volume(t: torch.Tensor) -> np.ndarray:
        v = t.movedim(0, axis) if axis is not None else t[0]
        return v.numpy()

    affine = refined_affine(scan.affine, factors)
    mean_s = scan.with_array(norm.denormalise(to_volume(outs["mean"]))[None], affine)
    std_s = scan.with_array(norm.scale_std(to_volume(outs["std"]))[None], affine)
    q05_s = scan.with_array(norm.denormalise(to_volume(outs["q05"]))[None], affine)
    q95_s = scan.with_array(norm.denormalise(to_volume(outs["q95"]))[None], affine)
    kept_np = None
    if kept is not None:
        kept_np = np.stack([norm.denormalise(to_volume(kept[i])) for i in range(kept.shape[0])])
    timings = {"prepare_s": t1 - t0, "sampling_s": t2 - t1, "total_s": time.perf_counter() - t0}
    info = {"slice_axis": axis, "window": list(window), "device": str(device), "amp": amp,
            "self_ensemble": len(turns_used), "normaliser": norm.to_dict(),
            "calibration": cal.to_report(cal_key, opt, len(turns_used))}
    return EnhanceResult(mean_s, std_s, q05_s, q95_s, score, consistency, factors, method, timings, kept_np, info)


@dataclass
class _Progress:
    """Network passes done out of ``total``, reported to ``callback`` (progress bars) as they happen."""

    total: int
    callback: Callable[[int, int], None] | None
    done: int = 0

    def add(self, passes: int) -> None:
        self.done += passes
        if self.callback is not None:
            self.callback(self.done, self.total)


def _draw_chunk(model: LoadedModel, opt: SamplingConfig, y: torch.Tensor, cond: torch.Tensor,
                first: torch.Tensor | None, start: int, turns_used: Sequence[Turn], window: tuple[int, ...], amp: str,
                work: _Progress) -> torch.Tensor:
    """Every sample of one chunk of slices ``y`` (its first slice is item ``start`` of the scan), as
    ``(samples, slices, *fine)`` on the CPU: sample i drawn on turn ``i mod len(turns_used)`` of the input (and of the
    shared first step) and turned back. Samples whose turned planes share a shape go through the network together,
    ``opt.batch_size`` images per call; each keeps its own seeded generator, so batching never changes a result."""
    n = y.shape[0]
    group = max(1, opt.batch_size // n)
    drawn: dict[int, torch.Tensor] = {}
    for s0 in range(0, opt.samples, group):
        members = list(range(s0, min(opt.samples, s0 + group)))
        member_turns = [turns_used[i % len(turns_used)] for i in members]
        for positions in shape_groups(cond.shape, member_turns):
            ids = [members[p] for p in positions]
            turns = [member_turns[p] for p in positions]
            gens = [torch.Generator(device=y.device).manual_seed(_seed(opt.seed, i, j))
                    for i in ids for j in range(start, start + n)]

            def step_done(i: int, _steps: int, reps: int = len(ids), shared: bool = first is not None) -> None:
                if not (shared and i == 1):  # the shared first step: no pass here, it was counted when made
                    work.add(reps * n)

            x = sample(model.net, model.config.diffusion, torch.cat([turn(cond, o) for o in turns]), gens,
                       sampler=opt.sampler, steps=opt.steps, lowres=torch.cat([turn(y, o) for o in turns]),
                       spec=model.degradation, project=opt.project, roi_size=window, overlap=opt.overlap,
                       sw_batch_size=opt.batch_size, amp=amp, on_step=step_done,
                       first=None if first is None else torch.cat([turn(first, o) for o in turns]))
            x = x.reshape(len(ids), n, *x.shape[1:])
            drawn.update({i: unturn(x[k], o)[:, 0].float().cpu() for k, (i, o) in enumerate(zip(ids, turns))})
    return torch.stack([drawn[i] for i in range(opt.samples)])


def _consistency(mean: torch.Tensor, low: torch.Tensor, spec: DegradeSpec, norm: Normaliser) -> dict[str, float]:
    """Degrade the enhanced mean with the model's operator and compare to the input (SR3's consistency check)."""
    redeg = spec.forward(mean[:, None])
    err = (redeg - low).abs()
    half_range = 0.5 * (norm.hi - norm.lo)
    return {"mean_abs_error": float(err.mean()) * half_range, "max_abs_error": float(err.max()) * half_range,
            "relative_mean_abs_error": float(err.mean() / 2.0)}
