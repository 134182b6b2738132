"""Where the error lives: the share of bicubic's squared error that lies above the input's frequency band.

    python -m pipelines.error_bands [--cache /work/runs/calib_cache]

Why: an x4 block-averaged input carries only frequencies below 1/8 cycle per fine voxel on each axis (its own
Nyquist). Whatever bicubic gets wrong *inside* that band an enhancer can in principle recover from the input;
what it gets wrong *above* it must be predicted from what the model learned images look like. If a share ``h``
of bicubic's squared error is above the band, recovering everything inside the band perfectly gains at most
``10·log10(1/h)`` dB; any more needs the content above the band predicted. Reads the held-out scans of
:mod:`pipelines.calibrate_default_model`'s cache at the sampling defaults (truth and the model's samples; the
cache may hold several models: each file is one row) and prints, per scan, ``h``, that bound, and how much of
bicubic's error inside and above the band the model's mean leaves.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from medsr.config import SamplingConfig
from medsr.degrade import upsample
from pipelines.heldout_quality import SPEC, cached_files

__all__ = ["band_errors"]

def _above_band(shape: tuple[int, int], factor: int) -> np.ndarray:
    fy = np.abs(np.fft.fftfreq(shape[0]))[:, None]
    fx = np.abs(np.fft.fftfreq(shape[1]))[None, :]
    return np.maximum(fy, fx) >= 0.5 / factor


def band_errors(truth: np.ndarray, pred: np.ndarray, factor: int = 4) -> tuple[float, float]:
    """Squared error of ``pred`` against ``truth`` (H, W, Z) inside and above the band of an x``factor`` input,
    summed over slices (Parseval: the two add up to the total)."""
    inside = above = 0.0
    for z in range(truth.shape[-1]):
        power = np.abs(np.fft.fft2(pred[..., z] - truth[..., z])) ** 2 / truth[..., z].size
        hi = _above_band(truth.shape[:2], factor)
        inside += float(power[~hi].sum())
        above += float(power[hi].sum())
    return inside, above


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/work/runs/calib_cache"))
    args = parser.parse_args()
    print("| scan | bicubic error above the band | perfect in-band recovery gains at most | mean's error / bicubic's "
          "(in band) | (above band) |")
    print("|---|---|---|---|---|")
    for path in cached_files(args.cache, SamplingConfig()):
        with np.load(path) as data:
            truth, mean = data["truth"].astype(np.float64), data["samples"].astype(np.float64).mean(0)
        low = SPEC.forward(torch.from_numpy(truth).float().movedim(-1, 0)[:, None])
        bicubic = upsample(low, SPEC.factors)[:, 0].movedim(0, -1).double().numpy()
        b_in, b_hi = band_errors(truth, bicubic)
        m_in, m_hi = band_errors(truth, mean)
        share = b_hi / (b_in + b_hi)
        name, weights = path.name.split("-")[:2]
        print(f"| {name} ({weights}) | {share:.2f} | {10 * math.log10(1 / share):+.2f} dB | {m_in / b_in:.2f} | "
              f"{m_hi / b_hi:.2f} |")


if __name__ == "__main__":
    main()
