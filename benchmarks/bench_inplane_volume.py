"""Throughput and peak memory of the default in-plane enhancement of a whole volume (issue 13's 3D figure).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_inplane_volume.py [--size 128 --slices 32]

A real MR volume (the held-out inia19 template, centre-cropped, mirrored out where it is smaller than the grid)
taken as the low-resolution input, ``size x size x slices`` -> ``4 size x 4 size x slices`` with the shipped default
model at the sampling defaults, in this process, one torch thread. Only time and memory are measured (no truth,
no quality). Prints wall and CPU seconds, network passes, output voxels per second and peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine_line  # benchmarks/ is on sys.path when a script here runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout root, for pipelines/

from medsr.config import SamplingConfig  # noqa: E402
from medsr.enhance import enhance_scan  # noqa: E402
from medsr.io.refs import load_ref  # noqa: E402
from medsr.io.scan import crop_scan  # noqa: E402
from medsr.model import load_model  # noqa: E402
from medsr.runtime import DEFAULT_MODEL_NAME, shipped_model  # noqa: E402
from pipelines.calibrate_default_model import INIA19  # noqa: E402
from pipelines.throughplane_card import mirrored_to, peak_rss_mb  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    defaults = SamplingConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(shipped_model(DEFAULT_MODEL_NAME).path))
    ap.add_argument("--size", type=int, default=128, help="in-plane size of the input")
    ap.add_argument("--slices", type=int, default=32)
    ap.add_argument("--samples", type=int, default=defaults.samples)
    ap.add_argument("--steps", type=int, default=defaults.steps)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(machine_line(torch.device("cpu")), flush=True)
    rss0 = peak_rss_mb()
    model = load_model(args.model, "cpu")
    want = (args.size, args.size, args.slices)
    scan = load_ref(INIA19, "MR")
    scan = crop_scan(scan, [max(0, (n - w) // 2) for n, w in zip(scan.spatial_shape, want)], want)
    scan = mirrored_to(scan, want)
    rss_loaded = peak_rss_mb()
    opt = SamplingConfig(samples=args.samples, steps=args.steps, device="cpu", slice_axis=2)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = enhance_scan(scan, model, opt)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    out = result.mean.spatial_shape
    voxels = int(np.prod(out))
    passes = opt.passes(num_train_timesteps=model.config.diffusion.num_train_timesteps)
    print(f"in-plane x{model.degradation.factors[0]}: {'x'.join(map(str, scan.spatial_shape))} -> "
          f"{'x'.join(map(str, out))}, {args.samples} samples x {args.steps} DDIM steps"
          f"{' (first step shared)' if opt.shares_first_step else ''} = {passes} network passes per slice, "
          f"amp {result.info['amp']}", flush=True)
    peak = peak_rss_mb()
    print(f"wall {wall:.1f} s ({wall / 60:.1f} min), CPU {cpu:.1f} s, {voxels / wall:.0f} output voxels/s "
          f"({voxels / cpu:.0f} per CPU second), peak RSS {peak:.0f} MB ({rss_loaded:.0f} MB after loading model and "
          f"scan, {rss0:.0f} MB at start); outputs (mean, std, q05, q95) {4 * 4 * voxels / 2**20:.0f} MiB", flush=True)
    print(json.dumps({"input": list(scan.spatial_shape), "output": list(out), "samples": args.samples,
                      "steps": args.steps, "passes_per_slice": passes, "wall_s": wall, "cpu_s": cpu,
                      "peak_rss_mb": peak, "rss_loaded_mb": rss_loaded, "amp": result.info["amp"]}))


if __name__ == "__main__":
    main()
