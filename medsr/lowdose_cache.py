"""Whole-slice low-dose CT noise for training patches, simulated once per scan and kept on disk.

The sinogram simulator (:func:`medsr.degrade.low_dose_noise_hu`) needs the whole slice (a patch alone misses the
attenuation, and the streaks, of everything outside it) and takes seconds per slice on a CPU, far too slow per
training patch. So each scan gets a few noise realisations of every slice, made deterministically from the
seed, written atomically as ``NAME-KEY.npy`` (float16, normalised units; KEY hashes everything the noise
depends on: the spec, the physics, the scan's voxels and spacing, the seed), and memory-mapped by
:class:`medsr.data.PatchDataset`, which adds the noise cut at each patch's place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from medsr.degrade import CT_WINDOW, DegradeSpec, LowDoseModel, clean_sinogram, low_dose_noise_hu
from medsr.errors import MedsrError
from medsr.io.paths import atomic_path

if TYPE_CHECKING:
    from medsr.data import Volume

__all__ = ["noise_volumes", "realisations_for", "slice_noise"]


def realisations_for(n_slices: int, patches: int | None = None) -> int:
    """Noise realisations per slice: at least 16 noise slices per scan (a single-slice scan gets 16, a 108-slice
    volume 2), and no more than one per 4 patches drawn (a 16-patch validation set needs only a few)."""
    k = math.ceil(16 / max(1, n_slices))
    if patches is not None:
        k = min(k, math.ceil(patches / (4 * max(1, n_slices))))
    return max(2, k)


def slice_noise(hu: np.ndarray, spec: DegradeSpec, pixel_mm: float, realisations: int, seed: int,
                model: LowDoseModel | None = None) -> np.ndarray:
    """``realisations`` noise images (HU) of one slice ``(H, W)``: the sinogram once, then independent counts."""
    t = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None]
    sino = clean_sinogram(t, pixel_mm, model)
    gen = torch.Generator().manual_seed(seed)
    noise = low_dose_noise_hu(t.expand(realisations, -1, -1), spec.dose, gen, pixel_mm, model,
                              sinogram=sino.expand(realisations, -1, -1))
    return noise.numpy()


def _key(vol: Volume, spec: DegradeSpec, slice_axis: int, k: int, seed: int, model: LowDoseModel) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([str(spec), dataclasses.asdict(model), list(vol.data.shape), list(vol.spacing),
                         list(vol.window or CT_WINDOW), slice_axis, k, seed]).encode())
    h.update(np.ascontiguousarray(vol.data).tobytes())
    return h.hexdigest()[:16]


def noise_volumes(volumes: Sequence[Volume], spec: DegradeSpec, slice_axis: int, cache_dir: Path, seed: int = 0,
                  patches: int | None = None, model: LowDoseModel | None = None) -> list[np.ndarray]:
    """Per scan, ``(K, *scan.shape)`` low-dose noise in the scan's normalised units (memory-mapped from
    ``cache_dir``, made there first if missing). Slices are cut across ``slice_axis`` (the axial plane)."""
    m = model or LowDoseModel()
    out = []
    for vol in volumes:
        n_slices = vol.data.shape[slice_axis]
        k = realisations_for(n_slices, patches)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", vol.name)[:48] or "scan"
        path = Path(cache_dir) / f"{name}-{_key(vol, spec, slice_axis, k, seed, m)}.npy"
        if not path.is_file():
            lo, hi = vol.window or CT_WINDOW
            half = 0.5 * (hi - lo)
            pixel = float(np.mean([s for a, s in enumerate(vol.spacing) if a != slice_axis]))
            noise = np.zeros((k, *vol.data.shape), np.float16)
            for i in tqdm(range(n_slices), desc=f"low-dose noise {name}", leave=False):
                hu = (vol.data.take(i, axis=slice_axis).astype(np.float64) + 1.0) * half + lo
                seq = np.random.SeedSequence([seed, i, int.from_bytes(path.stem[-8:].encode(), "little")])
                s = int(seq.generate_state(1, np.uint64)[0] % (2**63))
                sl = [slice(None)] * 4
                sl[1 + slice_axis] = i
                noise[tuple(sl)] = (slice_noise(hu, spec, pixel, k, s, m) / half).astype(np.float16)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, noise)
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise MedsrError(f"{path}: unreadable low-dose noise cache ({exc}); delete it to remake it") from None
        if arr.shape != (k, *vol.data.shape):
            raise MedsrError(f"{path}: noise cache shape {arr.shape}, expected {(k, *vol.data.shape)}; delete it")
        out.append(arr)
    return out
