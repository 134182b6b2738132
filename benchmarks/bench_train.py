"""Training throughput of the SR3 model: patches/s for 2D and 3D, fp32 vs bf16 autocast, and the share of each
step spent waiting for data, through the real data pipeline (real MNI152 template, PatchDataset, DataLoader).

    .venv/bin/python benchmarks/bench_train.py            # the shipped model sizes (minutes on a CPU)
    .venv/bin/python benchmarks/bench_train.py --tiny     # a smoke run: tiny UNet, a few steps

Prints one ``machine:`` line, one ``setup:`` line, then one line per (2D|3D, fp32|bf16):
``2D fp32: 123.4 patches/s, 64.8 ms/step, data wait 12.3% of step time (...)``. Numbers from a busy machine
say little; compare runs on the same machine and load only.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from machine import machine_line  # benchmarks/machine.py (scripts run with benchmarks/ on sys.path)

from medsr.config import DiffusionConfig, ModelConfig
from medsr.data import PatchDataset, load_volumes
from medsr.degrade import parse_spec
from medsr.diffusion import diffusion_loss, make_train_scheduler
from medsr.intensity import IntensityConfig
from medsr.model import build_unet
from medsr.runtime import autocast_context, resolve_device

TRAIN_REF = "nilearn:mni152"


@dataclass
class Case:
    dims: int
    spec: str
    patch: tuple[int, ...]
    model: ModelConfig
    batch: int


def cases(tiny: bool) -> list[Case]:
    if tiny:
        small = dict(channels=(8, 16), attention_levels=(False, False), num_head_channels=8, norm_num_groups=4)
        return [Case(2, "block:4x4", (32, 32), ModelConfig(spatial_dims=2, **small), 2),  # type: ignore[arg-type]
                Case(3, "block:1x1x4", (16, 16, 16), ModelConfig(spatial_dims=3, **small), 1)]  # type: ignore[arg-type]
    return [Case(2, "block:4x4", (64, 64), ModelConfig(spatial_dims=2), 8),  # configs/sr2d_x4.yaml
            Case(3, "block:1x1x4", (32, 32, 24),  # configs/sr3d_throughplane_x4.yaml
                 ModelConfig(spatial_dims=3, attention_levels=(False, False, False)), 4)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: Case, amp: str, volumes: list, steps: int, warmup: int, workers: int,
             device: torch.device) -> tuple[float, float, float]:
    """Train ``warmup + steps`` steps; returns (patches/s, seconds/step, data-wait share) over the timed steps."""
    torch.manual_seed(0)
    net = build_unet(case.model).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4)
    cfg = DiffusionConfig()
    scheduler = make_train_scheduler(cfg)
    gen = torch.Generator(device=device).manual_seed(0)
    data = PatchDataset(volumes, parse_spec(case.spec), case.patch, (steps + warmup) * case.batch, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=case.batch, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    wait = work = 0.0
    t_prev = time.perf_counter()
    for i, batch in enumerate(loader):
        t_data = time.perf_counter()
        hr, cond = batch["hr"].to(device, non_blocking=True), batch["cond"].to(device, non_blocking=True)
        with autocast_context(device, amp):
            loss = diffusion_loss(net, scheduler, hr, cond, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        t_prev_new = time.perf_counter()
        if i >= warmup:
            wait += t_data - t_prev
            work += t_prev_new - t_data
        t_prev = t_prev_new
    total = wait + work
    return steps * case.batch / total, total / steps, wait / total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny UNet and a few steps (smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case (default 20, tiny 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, tiny 1)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    steps = args.steps or (3 if args.tiny else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    device = resolve_device(args.device)
    print(machine_line(device), flush=True)
    volumes = load_volumes([TRAIN_REF], IntensityConfig())
    print(f"setup: data={TRAIN_REF} (real pipeline: PatchDataset + DataLoader, workers={args.workers}), "
          f"steps={steps} timed after {warmup} warm-up, {'tiny' if args.tiny else 'shipped'} model sizes", flush=True)
    for case in cases(args.tiny):
        for label, amp in (("fp32", "none"), ("bf16", "bf16")):
            rate, sec, share = run_case(case, amp, volumes, steps, warmup, args.workers, device)
            print(f"{case.dims}D {label}: {rate:.1f} patches/s, {sec * 1000:.1f} ms/step, "
                  f"data wait {100 * share:.1f}% of step time "
                  f"(patch {'x'.join(map(str, case.patch))}, batch {case.batch}, {case.spec}, "
                  f"channels {list(case.model.channels)})", flush=True)


if __name__ == "__main__":
    main()
