"""PSNR/SSIM of the default model on the held-out scans of shared/DATA.md, from the calibration study's cache.

``python -m pipelines.calibrate_default_model`` enhances every held-out scan once (central 256² crops, block
average x4, the sampling defaults (8 samples x 2 DDIM steps, first step shared), seed 0) and caches truth and
samples (normalised units); this reads that cache, so the model card's quality table and its calibration come
from the very same samples. The bicubic baseline is recomputed from the truth with the model's own (noise-free)
operator.

    python -m pipelines.heldout_quality [--cache /work/runs/calib_cache]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric

from medsr.config import SamplingConfig
from medsr.degrade import parse_spec, upsample
from medsr.turns import ensemble_turns
from pipelines.calibrate_default_model import cache_glob

SPEC = parse_spec("block:4x4")


def _metrics(pred: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    psnr = float(torch.as_tensor(PSNRMetric(max_val=2.0)(pred, truth)).mean())
    ssim = float(torch.as_tensor(SSIMMetric(spatial_dims=2, data_range=2.0)(pred, truth)).mean())
    return psnr, ssim


def cached_files(cache: Path, opt: SamplingConfig) -> list[Path]:
    """The calibration-cache files (:mod:`pipelines.calibrate_default_model`) of an x4 in-plane model sampled as
    ``opt`` says (the cache may hold other settings too), one per scan and model."""
    turns = len(ensemble_turns(SPEC, opt.self_ensemble, opt.samples))
    return sorted(cache.glob(cache_glob(opt.samples, opt.steps, opt.shares_first_step, turns)))


def table(cache: Path, samples: int = SamplingConfig().samples, steps: int = SamplingConfig().steps,
          share_first_step: bool = SamplingConfig().share_first_step,
          self_ensemble: int = SamplingConfig().self_ensemble) -> list[dict[str, float | str]]:
    """One row per cached scan enhanced with ``samples`` x ``steps`` over up to ``self_ensemble`` turns of the input
    (the cache may hold other settings too)."""
    rows: list[dict[str, float | str]] = []
    opt = SamplingConfig(samples=samples, steps=steps, share_first_step=share_first_step, self_ensemble=self_ensemble)
    for path in cached_files(cache, opt):
        data = np.load(path)
        truth = torch.from_numpy(data["truth"]).float().permute(2, 0, 1)[:, None]  # (Z, 1, X, Y)
        mean = torch.from_numpy(data["samples"].mean(0)).float().permute(2, 0, 1)[:, None]
        one = torch.from_numpy(data["samples"][0]).float().permute(2, 0, 1)[:, None]
        bicubic = upsample(SPEC.forward(truth), SPEC.factors)
        row: dict[str, float | str] = {"scan": path.name.split("-")[0], "slices": int(truth.shape[0])}
        for key, pred in (("bicubic", bicubic), ("sample", one), ("mean", mean)):
            row[f"psnr_{key}"], row[f"ssim_{key}"] = _metrics(pred, truth)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("/work/runs/calib_cache"))
    parser.add_argument("--samples", type=int, default=SamplingConfig().samples)
    parser.add_argument("--steps", type=int, default=SamplingConfig().steps)
    parser.add_argument("--share-first-step", action=argparse.BooleanOptionalAction,
                        default=SamplingConfig().share_first_step)
    parser.add_argument("--self-ensemble", type=int, default=SamplingConfig().self_ensemble)
    args = parser.parse_args()
    rows = table(args.cache, args.samples, args.steps, args.share_first_step, args.self_ensemble)
    print("| scan | slices | PSNR bicubic | PSNR one sample | PSNR mean | gain | SSIM bicubic | SSIM mean | gain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        v = {k: float(x) for k, x in r.items() if k != "scan"}
        print(f"| {r['scan']} | {int(v['slices'])} | {v['psnr_bicubic']:.2f} | {v['psnr_sample']:.2f} | "
              f"**{v['psnr_mean']:.2f}** | {v['psnr_mean'] - v['psnr_bicubic']:+.2f} | {v['ssim_bicubic']:.3f} | "
              f"**{v['ssim_mean']:.3f}** | {v['ssim_mean'] - v['ssim_bicubic']:+.3f} |")


if __name__ == "__main__":
    main()
