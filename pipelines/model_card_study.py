"""Measure the default model for its model card: held-out evaluation, calibration, steps/samples study.

    python -m pipelines.model_card_study --model medsr/weights/default_x4.pt --out runs/model_card

Held-out scans are package images that the model never saw (none is a training file of ../shared/DATA.md);
``medsr evaluate`` refits λ per modality on a separate calibration split (by scan). The shipped calibration
itself comes from :mod:`pipelines.calibrate_default_model`. The steps/samples
study runs on centred crops so that the 1000-step DDPM reference fits in minutes on a CPU. Prints markdown
tables and writes ``study.json`` plus the ``medsr evaluate`` outputs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsr.enhance import EnhanceOptions
from medsr.evaluate import evaluate_scans, format_table, write_evaluation
from medsr.io.paths import atomic_path
from medsr.io.refs import load_ref
from medsr.io.scan import Scan
from medsr.model import load_model
from medsr.turns import ensemble_turns

# held-out reporting scans of shared/DATA.md (never training); the calibration split is separate, by scan
HELD_OUT = ["pydicom:CT_small.dcm", "pydicom:MR_small.dcm", "nibabel:anatomical.nii"]
CALIBRATION = ["pydicom:bad_sequence.dcm", "pydicom:MR2_UNCR.dcm"]


def centre_crop(scan: Scan, size: int) -> Scan:
    """A centred in-plane crop (X, Y) of at most ``size`` voxels, affine shifted to match."""
    x, y = scan.spatial_shape[:2]
    sx, sy = min(size, x), min(size, y)
    x0, y0 = (x - sx) // 2, (y - sy) // 2
    shift = np.eye(4)
    shift[:2, 3] = (x0, y0)
    return scan.with_array(scan.array[:, x0:x0 + sx, y0:y0 + sy], scan.affine @ shift)


def load(refs: list[str], crop: int | None) -> list[Scan]:
    scans = [load_ref(r) for r in refs]
    return [centre_crop(s, crop) if crop else s for s in scans]


def summarise(ev: Any) -> dict[str, float]:
    o = ev.summary["overall"]
    return {"psnr_interp": o["interpolation"]["psnr"], "psnr_sample": o["sample"]["psnr"],
            "psnr_mean": o["mean"]["psnr"], "ssim_interp": o["interpolation"]["ssim"],
            "ssim_mean": o["mean"]["ssim"], "coverage_90": ev.summary["calibration"]["coverage_90_body"],
            "spearman": ev.summary["calibration"]["spearman_pooled"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="medsr/weights/default_x4.pt")
    parser.add_argument("--out", default="runs/model_card")
    parser.add_argument("--samples", type=int, default=EnhanceOptions().samples)
    parser.add_argument("--steps", type=int, default=EnhanceOptions().steps)
    parser.add_argument("--crop", type=int, default=128, help="in-plane crop of the study scans")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-study", action="store_true")
    parser.add_argument("--step-counts", default="1,2,3,5,10,20,50", help="DDIM step counts of the study (8 samples)")
    parser.add_argument("--shared-step-counts", default="2,3",
                        help="DDIM step counts with the first step shared by an image's samples (8 samples)")
    parser.add_argument("--ddpm-samples", type=int, default=4, help="samples of the 1000-step DDPM row (0: none)")
    parser.add_argument("--skip-eval", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model = load_model(args.model)
    result: dict[str, Any] = {"model": args.model, "sha256": model.sha256, "step": model.step}

    # 1. held-out evaluation at the chosen defaults, λ refitted on the calibration split
    if not args.skip_eval:
        evaluate_held_out(args, model, out, result)
    run_study(args, model, result)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "study.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=lambda v: None))


def evaluate_held_out(args: argparse.Namespace, model: Any, out: Path, result: dict[str, Any]) -> None:
    t = time.perf_counter()
    opt = EnhanceOptions(samples=args.samples, steps=args.steps, seed=0, keep_samples=True)
    ev = evaluate_scans(load(HELD_OUT, None), model, model.config.degrade, opt,
                        calibration_scans=load(CALIBRATION, 256))
    write_evaluation(ev, out / "evaluate")
    print(format_table(ev))
    result["evaluation"] = ev.summary
    result["evaluation_seconds"] = time.perf_counter() - t
    for group, fit in ev.summary["refit"]["per_modality"].items():
        print(f"refitted λ {group} (fitted on {CALIBRATION}): {fit['scale']:.3f}, guarantee {fit['guarantee']}")


def run_study(args: argparse.Namespace, model: Any, result: dict[str, Any]) -> None:
    """Steps and samples study on centred crops."""
    if not args.skip_study:
        scans = load(HELD_OUT, args.crop)
        rows = []
        counts = [int(k) for k in args.step_counts.split(",") if k]
        shared_counts = [int(k) for k in args.shared_step_counts.split(",") if k]
        default = EnhanceOptions()
        turns = default.self_ensemble
        settings = [("ddim", k, 8, False, turns) for k in counts] + [("ddim", k, 8, True, turns) for k in shared_counts]
        settings += [("ddpm", 1000, args.ddpm_samples, False, 1)] if args.ddpm_samples else []
        settings += [("ddim", args.steps, n, default.share_first_step, turns) for n in (1, 2, 4, 16)]
        settings += [("ddim", args.steps, 8, default.share_first_step, 1)]  # the default without the self-ensemble
        for sampler, steps, samples, shared, ensemble in settings:
            t = time.perf_counter()
            opt = EnhanceOptions(samples=samples, steps=steps, sampler=sampler, seed=0, keep_samples=True,
                                 share_first_step=shared, self_ensemble=ensemble)
            e = evaluate_scans(scans, model, model.config.degrade, opt)
            used = len(ensemble_turns(model.degradation, ensemble, samples))
            row = {"sampler": sampler + (", first step shared" if opt.shares_first_step else "")
                   + (f", self-ensemble {used}" if used > 1 else ""), "steps": steps,
                   "samples": samples, "seconds": time.perf_counter() - t, **summarise(e)}
            rows.append(row)
            print(json.dumps(row))
        result["study"] = rows
        print("\n| sampler | steps | samples | PSNR mean | PSNR bicubic | SSIM mean | SSIM bicubic "
              "| coverage 90% | s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['sampler']} | {r['steps']} | {r['samples']} | {r['psnr_mean']:.2f} | {r['psnr_interp']:.2f} | "
                  f"{r['ssim_mean']:.4f} | {r['ssim_interp']:.4f} | {r['coverage_90']:.3f} | {r['seconds']:.0f} |")
if __name__ == "__main__":
    main()
