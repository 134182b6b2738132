"""Time and peak memory of one through-plane enhancement at the size issue 14 names, measured, not extrapolated.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_throughplane_volume.py [--size 256 --slices 40]

A real MR volume (the held-out inia19 template, mirrored out where it is smaller than the grid) made thick by a
block average of 4 slices along Z, 256 x 256 x 40 -> 256 x 256 x 160, enhanced with the shipped
``throughplane_x4`` model at the sampling defaults (both orientations, all samples pooled), in this process,
one torch thread. Prints wall seconds, network passes, output voxels per second and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from machine import machine_line  # benchmarks/ is on sys.path when a script here runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout root, for pipelines/

from medsr.config import SamplingConfig  # noqa: E402
from medsr.runtime import WEIGHTS_DIR  # noqa: E402
from pipelines.throughplane_card import timing  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    defaults = SamplingConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(WEIGHTS_DIR / "throughplane_x4.pt"))
    ap.add_argument("--size", type=int, default=256, help="in-plane size of the thick volume")
    ap.add_argument("--slices", type=int, default=40, help="thick slices (output: 4x as many)")
    ap.add_argument("--samples", type=int, default=defaults.samples)
    ap.add_argument("--steps", type=int, default=defaults.steps)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(machine_line(torch.device("cpu")), flush=True)
    opt = SamplingConfig(samples=args.samples, steps=args.steps)
    r = timing(args.model, args.size, args.slices, args.samples, args.steps)
    voxels = r["output"][0] * r["output"][1] * r["output"][2]
    print(f"through-plane x4: {'x'.join(map(str, r['input']))} -> {'x'.join(map(str, r['output']))}, "
          f"{args.samples} samples x {args.steps} DDIM steps{' (first step shared)' if opt.shares_first_step else ''}"
          f" = {opt.passes(groups=2)} network passes over the images of both orientations, amp {r['amp']}", flush=True)
    print(f"wall {r['seconds']:.1f} s ({r['seconds'] / 60:.1f} min), {voxels / r['seconds']:.0f} output voxels/s, "
          f"peak RSS {r['peak_rss_mb']:.0f} MB ({r['rss_loaded_mb']:.0f} MB after loading model and scan)", flush=True)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
