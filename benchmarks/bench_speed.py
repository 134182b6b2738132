"""Speed and quality of ``medsr enhance`` in one run: v0.1's sampling path at 10 DDIM steps vs the new default
path, and each DDIM step count of the new path (issue 13, "cheaper passes" and "less work per sample").

v0.1 path: explicit softmax(QK^T)V attention, contiguous (NCHW) weights, windows overlapping by 0.25
(``medsr.model.configure_inference(net, fast=False)``, ``overlap=0.25``) and MONAI's own DDIM timesteps (evenly
spaced 999..0, which its ``step`` does not land on: v0.1's samples kept leftover noise). New default:
scaled-dot-product attention, channels-last 2D weights, overlap 0.125 (``SamplingConfig()``), DDIM on the timesteps
``step`` lands on (``medsr.diffusion.ddim_timesteps``).

(1) pass: one denoiser pass (1 sample, 1 step) over the README job's full size (CT_small 128² -> 512²), each
    path: seconds, windows per pass, window redundancy (window voxels / image voxels) and attention's share of
    the network time (hooks on the lowest-level attention blocks);
(2) batching: N samples in one call (all samples' windows batched) vs one sample after another, new path;
(3) table: wall time, speed-up over v0.1, and PSNR / SSIM of the posterior mean against the truth (degraded by the
    model's operator, x4), for the README scan (CT_small, centre crop) and a held-out scan of ../shared/DATA.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_speed.py --threads 1 --device cpu
    .venv/bin/python benchmarks/bench_speed.py --tiny          # smoke run: tiny random model, junk numbers

PSNR in dB and SSIM in normalised units (data range 2). Numbers from a busy machine say little: read the ratios
measured within one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from bench_sampling import SHIPPED, centre_crop, random_checkpoint
from machine import machine_line  # benchmarks/ is on sys.path when a script here runs
from monai.data.utils import dense_patch_slices

from medsr import diffusion, sampling
from medsr.config import SamplingConfig
from medsr.degrade import parse_spec, upsample
from medsr.enhance import EnhanceResult, enhance_scan
from medsr.evaluate import Degraded, _psnr, _ssim, degrade_scan
from medsr.io.refs import load_ref
from medsr.io.scan import Scan
from medsr.model import LoadedModel, configure_inference, load_model
from medsr.runtime import resolve_device

README_SCAN = "pydicom:CT_small.dcm"
HELD_OUT = "pydicom:bad_sequence.dcm"  # CT neck 512², held out in ../shared/DATA.md
V01_OVERLAP = 0.25


def windows_per_pass(size: tuple[int, ...], window: tuple[int, ...], overlap: float) -> int:
    """How many windows MONAI's sliding window lays over an image of ``size`` (what one pass costs)."""
    if all(s <= w for s, w in zip(size, window)):
        return 1
    interval = tuple(max(1, int(w * (1 - overlap))) for w in window)
    return len(dense_patch_slices(size, window, interval))


@dataclass
class Timing:
    wall: float
    cpu: float  # this process's CPU seconds: with one thread, the work done, whatever else the machine runs


def _v01_timesteps(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """MONAI's ``DDIMScheduler.set_timesteps`` spacing, as v0.1 sampled."""
    return torch.linspace(num_train_timesteps - 1, 0, steps).round().long()


def _v01_step(stride: int) -> Callable[..., torch.Tensor]:
    """v0.1's DDIM update: MONAI's ``step``, always to ``t - T//n`` whatever the next visited timestep is."""
    def step(x0: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int, alphas: torch.Tensor) -> torch.Tensor:
        return diffusion.ddim_step(x0, x_t, t, t - stride, alphas)
    return step


def timed_enhance(scan: Scan, model: LoadedModel, opts: SamplingConfig, v01: bool) -> tuple[Timing, EnhanceResult]:
    """(timing, result) of enhancing ``scan`` on one path."""
    configure_inference(model.net, fast=not v01)
    new_timesteps, new_step = diffusion.ddim_timesteps, sampling.ddim_step
    if v01:
        diffusion.ddim_timesteps = _v01_timesteps
        sampling.ddim_step = _v01_step(model.config.diffusion.num_train_timesteps // opts.steps)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        v01_opts = replace(opts, overlap=V01_OVERLAP, share_first_step=False, self_ensemble=1)  # v0.1 had neither
        result = enhance_scan(scan, model, v01_opts if v01 else opts)
        return Timing(time.perf_counter() - t0, time.process_time() - c0), result
    finally:
        configure_inference(model.net, fast=True)
        diffusion.ddim_timesteps, sampling.ddim_step = new_timesteps, new_step


def run(deg: Degraded, model: LoadedModel, opts: SamplingConfig, v01: bool) -> tuple[Timing, np.ndarray]:
    """(seconds, posterior mean in normalised units) for one path on a degraded scan."""
    sec, result = timed_enhance(deg.low, model, replace(opts, slice_axis=deg.slice_axis), v01)
    return sec, deg.norm.normalise(result.mean.array[0])


def quality(mean: np.ndarray, deg: Degraded) -> tuple[float, float]:
    pred = torch.as_tensor(mean, dtype=torch.float32).movedim(2, 0)[:, None]
    truth = torch.as_tensor(deg.truth_norm, dtype=torch.float32).movedim(2, 0)[:, None]
    return _psnr(mean, deg.truth_norm), _ssim(pred, truth, torch.ones_like(truth, dtype=torch.bool))[0]


def section_pass(model: LoadedModel, low_size: int, opts: SamplingConfig) -> None:
    """One sample, one step over the README job's full size, each path."""
    spec = parse_spec(model.config.degrade)
    scan = centre_crop(load_ref(README_SCAN), low_size)
    fine = tuple(s * f for s, f in zip(scan.spatial_shape[:2], spec.factors))
    window = tuple(opts.window or model.config.data.patch_size)
    attn = [m for m in model.net.modules() if type(m).__name__ == "SpatialAttentionBlock"]
    spent = [0.0]

    def pre(_m: torch.nn.Module, _a: object) -> None:
        spent.append(time.perf_counter())

    def post(_m: torch.nn.Module, _a: object, _o: object) -> None:
        spent[0] += time.perf_counter() - spent.pop()

    hooks = [h for m in attn for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    one = replace(opts, samples=1, steps=1, slice_axis=2)
    try:
        for label, v01 in (("v0.1", True), ("new", False)):
            timed_enhance(scan, model, one, v01)  # warm-up (oneDNN primitives, allocator)
            spent[0] = 0.0
            sec, _ = timed_enhance(scan, model, one, v01)
            ov = V01_OVERLAP if v01 else opts.overlap
            n = windows_per_pass(fine, window, ov)
            red = n * int(np.prod(window)) / int(np.prod(fine)) if n > 1 else 1.0
            print(f"(1) pass {label}: {'x'.join(map(str, fine))} image, window {'x'.join(map(str, window))} overlap "
                  f"{ov}: {n} windows ({red:.2f}x the image's voxels), {sec.wall:.2f} s ({sec.cpu:.2f} s CPU) per "
                  f"sample-step, attention {spent[0] / sec.wall:.1%} of it", flush=True)
    finally:
        for h in hooks:
            h.remove()


def section_batching(model: LoadedModel, deg: Degraded, opts: SamplingConfig) -> None:
    n = opts.samples
    run(deg, model, replace(opts, samples=1, steps=1), False)  # warm-up
    t_b, m_b = run(deg, model, replace(opts, batch_size=max(opts.batch_size, n)), False)
    t_s, m_s = run(deg, model, replace(opts, batch_size=1), False)
    print(f"(2) batching: {n} samples x {opts.steps} steps batched {t_b.wall:.2f} s ({t_b.cpu:.2f} s CPU) vs one after "
          f"another {t_s.wall:.2f} s ({t_s.cpu:.2f} s CPU): {t_s.wall / t_b.wall:.2f}x wall, "
          f"{t_s.cpu / t_b.cpu:.2f}x CPU, "
          f"max |difference| of means {np.abs(m_b - m_s).max():.2e}", flush=True)


def section_table(model: LoadedModel, scans: list[tuple[str, Degraded]], opts: SamplingConfig,
                  steps_list: list[int], shared_list: list[int], v01_model: LoadedModel | None = None) -> None:
    """Rows "new sf": the first DDIM step made once per slice and shared by its samples. ``v01_model``: the weights
    the v0.1 row runs (v0.1's own, where the shipped default has been retrained since); default ``model``."""
    print(f"(3) {opts.samples} samples; PSNR/SSIM of the posterior mean vs the truth (data range 2)", flush=True)
    print(f"{'scan':<24} {'path':<13} {'steps':>5} {'wall s':>8} {'cpu s':>8} {'x wall':>7} {'x cpu':>7} {'PSNR':>7} "
          f"{'SSIM':>7}", flush=True)
    dash = "-"
    for name, deg in scans:
        spec = parse_spec(model.config.degrade)
        low = torch.from_numpy(deg.low_norm).movedim(2, 0)[:, None]
        interp = upsample(low, spec.factors)[:, 0].movedim(0, 2).numpy()
        p, s = quality(interp, deg)
        print(f"{name:<24} {'bicubic':<13} {dash:>5} {dash:>8} {dash:>8} {dash:>7} {dash:>7} {p:7.2f} {s:7.4f}",
              flush=True)
        base, base_mean = run(deg, v01_model or model, replace(opts, steps=10), True)
        p, s = quality(base_mean, deg)
        print(f"{name:<24} {'v0.1':<13} {10:>5} {base.wall:8.2f} {base.cpu:8.2f} {1.0:6.2f}x {1.0:6.2f}x {p:7.2f} "
              f"{s:7.4f}", flush=True)
        default = SamplingConfig()
        for steps, shared in [(k, False) for k in steps_list] + [(k, True) for k in shared_list]:
            sec, mean = run(deg, model, replace(opts, steps=steps, share_first_step=shared), False)
            p, s = quality(mean, deg)
            label = ("new sf" if shared else "new") + (
                " (dflt)" if (steps, shared) == (default.steps, default.share_first_step) else "")
            print(f"{name:<24} {label:<13} {steps:>5} {sec.wall:8.2f} {sec.cpu:8.2f} {base.wall / sec.wall:6.2f}x "
                  f"{base.cpu / sec.cpu:6.2f}x {p:7.2f} {s:7.4f}"
                  + (f"   max |new - v0.1| of means {np.abs(mean - base_mean).max():.2e}" if steps == 10 else ""),
                  flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random model, small images (smoke test)")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--v01-model", type=Path, default=None,
                    help="weights of the v0.1 row (default: --model); v0.1's: pipelines/default_model/v01_step6000.pt")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--steps", default="1,2,3,4,10", help="DDIM step counts of the new path")
    ap.add_argument("--shared-steps", default="2,3", help="the same with the first step shared ('': none)")
    ap.add_argument("--crop", type=int, default=128, help="truth crop of both scans, fine voxels (table)")
    ap.add_argument("--pass-size", type=int, default=128, help="input size of the one-pass profile (README: 128)")
    ap.add_argument("--held-out", default=HELD_OUT)
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(machine_line(device), flush=True)
    steps_list = [int(s) for s in args.steps.split(",")]
    shared_list = [int(s) for s in args.shared_steps.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        path = random_checkpoint(Path(tmp) / "tiny.pt", True) if args.tiny else (args.model or SHIPPED)
        model = load_model(path, device)
        cfg = model.config
        crop, pass_size = (32, 16) if args.tiny else (args.crop, args.pass_size)
        opts = SamplingConfig(samples=args.samples, device=str(device), amp="none")
        print(f"setup: model={'random weights, tiny architecture' if args.tiny else path}; degrade {cfg.degrade}, "
              f"window {list(cfg.data.patch_size)}, new overlap {opts.overlap}, v0.1 overlap {V01_OVERLAP}; "
              f"crop {crop}, pass input {pass_size}", flush=True)
        scans = [(f"{ref.split(':')[-1]} {crop}²",
                  degrade_scan(centre_crop(load_ref(ref), crop), cfg.degrade, cfg.intensity))
                 for ref in (README_SCAN, args.held_out)]
        section_pass(model, pass_size, opts)
        section_batching(model, scans[0][1], replace(opts, steps=2))
        v01_model = load_model(args.v01_model, device) if args.v01_model else None
        if v01_model:
            print(f"v0.1 row: weights {args.v01_model}", flush=True)
        section_table(model, scans, opts, steps_list, shared_list, v01_model)


if __name__ == "__main__":
    main()
