"""Patch datasets over real scans: (condition, target) pairs made on the fly, reproducibly.

Each scan is loaded once, normalised (:mod:`medsr.intensity`) and kept in memory (scans are small next to a
training run). Item ``i`` of a :class:`PatchDataset` is a pure function of ``(seed, rank, i)``: which scan, which
slice and where (foreground-weighted, so patches of empty air are rare), and the degradation noise. Resuming
a run at step ``s`` therefore sees exactly the patches the uninterrupted run would have seen, with any number
of DataLoader workers. Train/validation split is by scan, by listing scans in ``data.train`` / ``data.val``.

Optional training-time augmentation (:class:`medsr.config.AugmentConfig`, MONAI array transforms) changes the
high-resolution patch before it is degraded, so every pair stays consistent; its random state comes from its
own stream of ``(seed, rank, i)``, so turning it on changes neither which patch is cut nor the degradation.
Zoom-out (``zoom_out_prob``) is the exception by its nature: it cuts a larger window and block-averages it to the
patch, drawing from the item's own generator only when it is on (so configs without it keep their items).
Low-dose CT noise is made in the sinogram of a whole slice (streaks from bone far outside a patch), which is too
slow per patch (seconds per slice): with ``lowdose_cache`` set, a few noise realisations of every slice are
simulated once (:mod:`medsr.lowdose_cache`) and patches add the noise cut at the same place.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandFlip,
    RandGaussianNoise,
    RandHistogramShift,
    RandRotate90,
    Transform,
)
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from medsr.config import AugmentConfig
from medsr.degrade import DegradeSpec, apply_degradation, draw_params, upsample
from medsr.errors import MedsrError
from medsr.intensity import IntensityConfig, fit_normaliser
from medsr.io.refs import load_ref
from medsr.lowdose_cache import noise_volumes

__all__ = ["Volume", "load_volumes", "PatchDataset", "build_augment"]


@dataclass
class Volume:
    """One normalised training scan ``(X, Y, Z)`` with a sample of its foreground voxel coordinates."""

    name: str
    data: np.ndarray
    foreground: np.ndarray  # (N, 3) int32 voxel coordinates
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # mm per array axis (the low-dose simulator needs it)
    window: tuple[float, float] | None = None  # HU window of the normalisation, CT only


def load_volumes(refs: Sequence[str], intensity: IntensityConfig, threshold: float = -0.8,
                 max_foreground: int = 200_000, seed: int = 0) -> list[Volume]:
    """Load and normalise scans (named references or paths); ``modality`` can be forced as ``ref@CT``."""
    rng = np.random.default_rng(seed)
    volumes = []
    for ref in refs:
        path, _, modality = str(ref).partition("@")
        scan = load_ref(path, modality or None)
        norm = fit_normaliser(scan.array, scan.modality, intensity)
        data = norm.normalise(scan.array[0])
        fg = np.argwhere(data > threshold).astype(np.int32)
        if len(fg) > max_foreground:
            fg = fg[rng.choice(len(fg), max_foreground, replace=False)]
        window = (norm.lo, norm.hi) if norm.kind == "ct_window" else None
        volumes.append(Volume(scan.name, data, fg, scan.spacing, window))
    return volumes


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise MedsrError(f"data.augment.{name} must be a probability in [0, 1], got {value}")


def _rotation_axes(patch_size: Sequence[int], factors: Sequence[int]) -> tuple[int, int] | None:
    """First pair of patch axes that a 90 degree rotation maps onto each other (equal size and factor)."""
    n = len(patch_size)
    for a in range(n):
        for b in range(a + 1, n):
            if patch_size[a] == patch_size[b] and factors[a] == factors[b]:
                return a, b
    return None


def build_augment(cfg: AugmentConfig, patch_size: Sequence[int], factors: Sequence[int]) -> Compose | None:
    """The MONAI transform chain for one channel-first HR patch, or None when every option is off.

    Order: geometry (flips, 90 degree rotation), then intensity (monotone curve, gamma), then noise, so the
    noise is not reshaped by the curves.
    """
    for name in ("flip_prob", "rot90_prob", "curve_prob", "gamma_prob", "noise_prob"):
        _check_prob(name, getattr(cfg, name))
    lo_pts, hi_pts = cfg.curve_points
    if not 3 <= lo_pts <= hi_pts:
        raise MedsrError(f"data.augment.curve_points must be (min, max) with 3 <= min <= max, got {cfg.curve_points}")
    g_lo, g_hi = cfg.gamma_range
    if not 0.0 < g_lo <= g_hi:
        raise MedsrError(f"data.augment.gamma_range must be (min, max) with 0 < min <= max, got {cfg.gamma_range}")
    if cfg.noise_std < 0:
        raise MedsrError(f"data.augment.noise_std must be >= 0, got {cfg.noise_std}")
    chain: list[Transform] = []
    if cfg.flip_prob > 0:
        chain += [RandFlip(prob=cfg.flip_prob, spatial_axis=a) for a in range(len(patch_size))]
    if cfg.rot90_prob > 0:
        axes = _rotation_axes(patch_size, factors)
        if axes is None:
            raise MedsrError(f"data.augment.rot90_prob: patch {tuple(patch_size)} with factors {tuple(factors)} has "
                             "no two axes of equal size and factor to rotate in")
        chain.append(RandRotate90(prob=cfg.rot90_prob, max_k=3, spatial_axes=axes))
    if cfg.curve_prob > 0:
        chain.append(RandHistogramShift(num_control_points=(lo_pts, hi_pts), prob=cfg.curve_prob))
    if cfg.gamma_prob > 0:
        chain.append(RandAdjustContrast(prob=cfg.gamma_prob, gamma=(g_lo, g_hi)))
    if cfg.noise_prob > 0 and cfg.noise_std > 0:
        chain.append(RandGaussianNoise(prob=cfg.noise_prob, std=cfg.noise_std))
    return Compose(chain) if chain else None


def _lowdose_range(augment: AugmentConfig | None, name: str, off: tuple[float, float], zero_ok: bool,
                   spec: DegradeSpec, lowdose_cache: str | Path | None) -> tuple[float, float] | None:
    """The checked range ``augment.<name>`` of a factor on the cached low-dose noise, or None when it is off."""
    if augment is None or tuple(getattr(augment, name)) == off:
        return None
    lo, hi = (float(x) for x in getattr(augment, name))
    if not (0.0 <= lo <= hi and hi > 0.0 and (zero_ok or lo > 0.0)):
        bound = "0 <= min <= max, max > 0" if zero_ok else "0 < min <= max"
        raise MedsrError(f"data.augment.{name} must be (min, max) with {bound}, got {(lo, hi)}")
    if spec.kind != "lowdose" or spec.dose >= 1.0 or lowdose_cache is None:
        raise MedsrError(f"data.augment.{name} scales the cached low-dose noise; degradation {spec} "
                         "has none (it needs a lowdose spec with dose < 1 and a noise cache)")
    return lo, hi


def _zoom_out(augment: AugmentConfig | None) -> tuple[float, int] | None:
    """The checked ``(zoom_out_prob, zoom_out_max)`` of ``augment``, or None when zoom-out is off."""
    if augment is None or augment.zoom_out_prob == 0.0:
        return None
    _check_prob("zoom_out_prob", augment.zoom_out_prob)
    if int(augment.zoom_out_max) != augment.zoom_out_max or augment.zoom_out_max < 2:
        raise MedsrError(f"data.augment.zoom_out_max must be an integer >= 2, got {augment.zoom_out_max}")
    return float(augment.zoom_out_prob), int(augment.zoom_out_max)


class PatchDataset(Dataset):
    """``length`` reproducible patch pairs from ``volumes``.

    Args:
        volumes: normalised scans.
        spec: degradation applied to each high-resolution patch.
        patch_size: 2 values (2D patches from slices across ``slice_axis``) or 3 (3D patches).
        length: number of items (training: steps x batch; validation: a fixed set).
        seed, rank: with the item index, all that decides an item.
        foreground_fraction: share of patches centred on a foreground voxel.
        slice_axes: 2D patches: several axes to cut slices across, one drawn per item; empty or None:
            ``slice_axis`` alone (and then no draw is made, so items are exactly those of older versions).
        augment: training-time augmentation of the high-resolution patch before degradation (None: none).
        lowdose_cache: folder for whole-slice low-dose noise (made once, reused); "lowdose" specs only. Without
            it the noise is simulated on the patch alone (no attenuation from outside it: tests, quick runs).

    Items are dicts of float32 tensors: ``hr`` and ``cond`` ``(1, *patch_size)``, ``lowres`` ``(1, *patch/f)``.
    """

    def __init__(self, volumes: Sequence[Volume], spec: DegradeSpec, patch_size: Sequence[int], length: int,
                 seed: int = 0, rank: int = 0, slice_axis: int = 2, foreground_fraction: float = 0.9,
                 augment: AugmentConfig | None = None, lowdose_cache: str | Path | None = None,
                 slice_axes: Sequence[int] | None = None) -> None:
        if not volumes:
            raise MedsrError("no scans to cut patches from (data.train / data.val is empty)")
        if len(patch_size) != spec.spatial_dims:
            raise MedsrError(f"patch_size {tuple(patch_size)} and degradation {spec} differ in dimensions")
        if any(p % f for p, f in zip(patch_size, spec.factors)):
            raise MedsrError(f"patch_size {tuple(patch_size)} is not divisible by the factors of {spec}")
        self.volumes = list(volumes)
        self.spec = spec
        self.patch_size = tuple(int(p) for p in patch_size)
        self.length = int(length)
        self.seed, self.rank = int(seed), int(rank)
        self.slice_axis = int(slice_axis)
        self.slice_axes = tuple(int(a) for a in slice_axes) if slice_axes else (self.slice_axis,)
        if any(a not in (0, 1, 2) for a in self.slice_axes):
            raise MedsrError(f"slice axes must be among 0, 1, 2, got {self.slice_axes}")
        self.foreground_fraction = float(foreground_fraction)
        self.augment = build_augment(augment, self.patch_size, spec.factors) if augment is not None else None
        self._augment_state: np.random.RandomState | None = None
        if self.augment is not None:
            self._augment_state = np.random.RandomState(0)
            for transform in self.augment.transforms:
                transform.set_random_state(state=self._augment_state)
        self.noise: list[np.ndarray] | None = None
        self.noise_scale = _lowdose_range(augment, "lowdose_noise_scale", (1.0, 1.0), False, spec, lowdose_cache)
        self.target_noise = _lowdose_range(augment, "lowdose_target_noise", (0.0, 0.0), True, spec, lowdose_cache)
        self.zoom_out = _zoom_out(augment)
        if lowdose_cache is not None and spec.kind == "lowdose" and spec.dose < 1.0:
            if self.zoom_out is not None:
                raise MedsrError("data.augment.zoom_out_prob: the low-dose noise cache is made at the scans' own "
                                 "voxel size; it cannot serve zoomed-out patches (set zoom_out_prob: 0)")
            if len(self.slice_axes) > 1:  # the cached noise is simulated in the planes across slice_axis only
                raise MedsrError(f"low-dose noise cache is made across slice_axis {self.slice_axis}; it cannot serve "
                                 f"patches cut across several axes {self.slice_axes} (use one slice axis)")
            self.noise = noise_volumes(self.volumes, spec, self.slice_axis, Path(lowdose_cache), seed=self.seed,
                                       patches=self.length)

    def __len__(self) -> int:
        return self.length

    def _window(self, vol: Volume, rng: np.random.Generator,
                zoom: int = 1) -> tuple[list[tuple[int, int]], tuple[slice, ...], int]:
        """Where the patch is: padding for scans smaller than it, the slices into the padded scan, and (2D) the
        axis the slice is cut across. ``zoom``: the window is that many times the patch (zoom-out augmentation)."""
        data = vol.data
        shape = data.shape
        axis = self.slice_axis
        if len(self.patch_size) == 2:
            if len(self.slice_axes) > 1:  # drawn only then: single-axis items stay those of older versions
                # planes of a single slice (Z = 1) have one real axis: such a scan is cut in its own plane only
                usable = [a for a in self.slice_axes if all(data.shape[b] > 1 for b in range(3) if b != a)]
                usable = usable or [self.slice_axis]
                axis = usable[int(rng.integers(len(usable)))]
            size = [0, 0, 0]
            in_plane = [a for a in range(3) if a != axis]
            size[in_plane[0]], size[in_plane[1]] = (p * zoom for p in self.patch_size)
            size[axis] = 1
        else:
            size = [p * zoom for p in self.patch_size]
        if len(vol.foreground) and rng.random() < self.foreground_fraction:
            centre = vol.foreground[rng.integers(len(vol.foreground))]
        else:
            centre = np.array([rng.integers(s) for s in shape])
        # pad where the scan is smaller than the patch (edge values: no artificial borders)
        pad = [(max(0, (s - n + 1) // 2), max(0, s - n - (s - n + 1) // 2)) for s, n in zip(size, shape)]
        centre = centre + np.array([p[0] for p in pad])
        padded = [n + a + b for n, (a, b) in zip(shape, pad)]
        start = [int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip(centre, size, padded)]
        return pad, tuple(slice(b, b + s) for b, s in zip(start, size)), axis

    def _cut(self, data: np.ndarray, pad: list[tuple[int, int]], where: tuple[slice, ...], axis: int) -> np.ndarray:
        if any(p != (0, 0) for p in pad):
            data = np.pad(data, pad, mode="edge")
        patch = data[where]
        return patch.squeeze(axis) if len(self.patch_size) == 2 else patch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, int(index)])
        v = int(rng.integers(len(self.volumes)))
        vol = self.volumes[v]
        zoom = 1
        if self.zoom_out is not None:  # drawn only then: items without it stay those of older versions
            prob, largest = self.zoom_out
            zoom = int(rng.integers(2, largest + 1)) if rng.random() < prob else 1
        pad, where, axis = self._window(vol, rng, zoom)
        hr = torch.from_numpy(np.ascontiguousarray(self._cut(vol.data, pad, where, axis)))[None, None].float()
        if zoom > 1:  # coarser voxels, each the mean of the finer ones it covers
            pool = torch.nn.functional.avg_pool2d if len(self.patch_size) == 2 else torch.nn.functional.avg_pool3d
            hr = pool(hr, zoom)
        if self.augment is not None:  # before degradation: the input is always the degradation of the target
            hr = self._augment(hr[0], int(index))[None]
        params = draw_params(self.spec, rng)
        if self.noise is not None:  # whole-slice low-dose noise, made once, cut at the patch's place
            realisations = len(self.noise[v])
            k = int(rng.integers(realisations))
            noise = self._cut(self.noise[v][k], pad, where, axis).astype(np.float32)
            if self.noise_scale is not None:  # drawn only then: items without it stay those of older versions
                noise *= np.float32(np.exp(rng.uniform(*np.log(self.noise_scale))))
            if self.target_noise is not None:  # the full-dose target's own grain: another realisation (the cache
                # holds at least two per slice: medsr.lowdose_cache.realisations_for)
                other = (k + 1 + int(rng.integers(realisations - 1))) % realisations
                own = self._cut(self.noise[v][other], pad, where, axis).astype(np.float32)
                hr = hr + torch.from_numpy(own * np.float32(rng.uniform(*self.target_noise)))[None, None]
            lowres = self.spec.forward(hr + torch.from_numpy(noise)[None, None])
        else:
            in_plane = [s * zoom for a, s in enumerate(vol.spacing) if a != axis or len(self.patch_size) == 3]
            lowres = apply_degradation(hr, params, float(np.mean(in_plane[:2])), vol.window or (-1024.0, 1024.0))
        cond = upsample(lowres, self.spec.factors)
        return {"hr": hr[0], "cond": cond[0], "lowres": lowres[0]}

    def _augment(self, patch: torch.Tensor, index: int) -> torch.Tensor:
        """Augment one ``(1, *spatial)`` patch from the item's own augmentation stream (see module doc)."""
        assert self.augment is not None and self._augment_state is not None
        self._augment_state.seed([self.seed, self.rank, index, 1])  # all transforms draw from this one state
        tracking = get_track_meta()
        set_track_meta(False)  # plain tensors: MetaTensor bookkeeping would cost more than the transforms
        try:
            with warnings.catch_warnings():  # a constant patch (air) has no histogram to shift: unchanged is right
                warnings.filterwarnings("ignore", message="The image's intensity is a single value")
                out = self.augment(patch)
        finally:
            set_track_meta(tracking)
        return convert_to_tensor(out, track_meta=False, dtype=torch.float32).contiguous()
