"""Where the error lives: the share of bicubic's squared error that lies above the input's frequency band.

    python -m pipelines.error_bands [--cache /work/runs/calib_cache]
    python -m pipelines.error_bands --through-plane [--crop 40]

Why: an x4 block-averaged input carries only frequencies below 1/8 cycle per fine voxel on each axis (its own
Nyquist). Whatever bicubic gets wrong *inside* that band an enhancer can in principle recover from the input;
what it gets wrong *above* it must be predicted from what the model learned images look like. If a share ``h``
of bicubic's squared error is above the band, recovering everything inside the band perfectly gains at most
``10·log10(1/h)`` dB; any more needs the content above the band predicted. Reads the held-out scans of
:mod:`pipelines.calibrate_default_model`'s cache at the sampling defaults (truth and the model's samples; the
cache may hold several models: each file is one row) and prints, per scan, ``h``, that bound, and how much of
bicubic's error inside and above the band the model's mean leaves.

``--through-plane`` does the same along the thick axis for the through-plane card's held-out MR volumes made 4x
thick (:data:`pipelines.throughplane_card.VOLUMES`): the band is the thick input's, 1/8 cycle per thin slice along
that axis only; the baseline is cubic along it; the model is what ``auto`` picks for the thick input at the
sampling defaults.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from medsr.config import SamplingConfig
from medsr.degrade import upsample
from medsr.evaluate import degrade_scan
from medsr.io.refs import load_ref
from medsr.model_picker import ModelPicker
from medsr.through_plane import cubic_along, enhance_with_choice
from pipelines.heldout_quality import SPEC, cached_files
from pipelines.throughplane_card import VOLUMES, centre, with_template_crop

__all__ = ["band_errors", "axis_band_errors"]

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


def axis_band_errors(truth: np.ndarray, pred: np.ndarray, axis: int, factor: int = 4) -> tuple[float, float]:
    """Squared error of ``pred`` against ``truth`` inside and above the band of an input ``factor`` times coarser
    along ``axis`` only (1D spectra along that axis; the two add up to the total)."""
    diff = np.moveaxis(np.asarray(pred, np.float64) - np.asarray(truth, np.float64), axis, -1)
    power = np.abs(np.fft.fft(diff, axis=-1)) ** 2 / diff.shape[-1]
    hi = np.abs(np.fft.fftfreq(diff.shape[-1])) >= 0.5 / factor
    return float(power[..., ~hi].sum()), float(power[..., hi].sum())


def _row(name: str, share: float, model_in: float, model_hi: float) -> str:
    return f"| {name} | {share:.2f} | {10 * math.log10(1 / share):+.2f} dB | {model_in:.2f} | {model_hi:.2f} |"


def through_plane(crop: int) -> None:
    """The table for the through-plane card's MR volumes (module docstring)."""
    print("| volume, made thick | cubic's error above the band | perfect in-band recovery gains at most "
          "| mean's error / cubic's (in band) | (above band) | mean's gain over cubic |")
    print("|---|---|---|---|---|---|")
    picker = ModelPicker()
    for case in (with_template_crop(c, crop) for c in VOLUMES):
        scan = centre(load_ref(case.ref, case.modality), case.crop)
        deg = degrade_scan(scan, case.spec)
        low = deg.low
        model, choice = picker.pick(low.spacing, low.spatial_shape, low.acquisition_axis, 2)
        result = enhance_with_choice(low, model, choice, SamplingConfig())
        mean = deg.norm.normalise(result.mean.array[0])
        cubic = cubic_along(deg.low_norm, choice.axis, choice.factor)
        c_in, c_hi = axis_band_errors(deg.truth_norm, cubic, choice.axis, choice.factor)
        m_in, m_hi = axis_band_errors(deg.truth_norm, mean, choice.axis, choice.factor)
        gain = 10 * math.log10((c_in + c_hi) / (m_in + m_hi))
        print(_row(f"{case.name} {case.spec}", c_hi / (c_in + c_hi), m_in / c_in, m_hi / c_hi) + f" {gain:+.2f} dB |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/work/runs/calib_cache"))
    parser.add_argument("--through-plane", action="store_true", help="the through-plane card's MR volumes instead")
    parser.add_argument("--crop", type=int, default=40, help="the template's centred crop (the card's --crop)")
    args = parser.parse_args()
    if args.through_plane:
        through_plane(args.crop)
        return
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
        print(_row(f"{name} ({weights})", share, m_in / b_in, m_hi / b_hi))


if __name__ == "__main__":
    main()
