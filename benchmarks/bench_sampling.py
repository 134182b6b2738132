"""Sampling benchmarks of ``medsr enhance``, every figure measured in this one run, on real scans:

(a) speed and quality: voxels/s of the default sampler (DDIM, K steps) and of SR3's reference sampler (DDPM, all
    T steps) on the same degraded slice, with the PSNR of each posterior mean against the truth;
(b) overhead: a whole sampling step (sliding window, gaussian blending, scheduler, data-consistency projection)
    over the bare network forward on the same windows (target: within 10%);
(c) N samples batched in one network call vs drawn one after another;
(d) memory: peak RSS growth of enhancing a volume at two slice counts, each in a fresh subprocess (peak RSS,
    VmHWM, reset after a warm-up; tracemalloc does not see torch; glibc's mmap threshold fixed so that RSS
    follows live memory), next to the size of the output arrays;
(e) fp32 vs bf16 autocast: sampling time and PSNR of the mean.

    .venv/bin/python benchmarks/bench_sampling.py                    # default size: a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_sampling.py --tiny             # smoke run: tiny random model, junk numbers
    .venv/bin/python benchmarks/bench_sampling.py --model PATH       # a trained checkpoint

Default model: ``medsr/weights/default_x4.pt`` if present, else a random network of the architecture in
``configs/default_model.yaml`` (timings are representative; its PSNRs say nothing about quality). PSNR in dB,
normalised units (data range 2). Numbers from a busy machine say little: compare runs on one machine and load.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from machine import machine_line  # benchmarks/machine.py (scripts run with benchmarks/ on sys.path)
from monai.metrics import PSNRMetric

from medsr.config import load_config
from medsr.degrade import parse_spec, upsample
from medsr.enhance import EnhanceOptions, enhance_scan
from medsr.evaluate import Degraded, degrade_scan
from medsr.io.refs import load_ref
from medsr.io.scan import Scan, crop_scan
from medsr.model import LoadedModel, load_model, write_untrained_checkpoint
from medsr.runtime import DEFAULT_MODEL_NAME, resolve_device, shipped_model
from medsr.sampling import sample

REPO = Path(__file__).resolve().parents[1]
SHIPPED = shipped_model(DEFAULT_MODEL_NAME).path
TINY_MODEL = ["model.channels=[8,16]", "model.attention_levels=[false,false]", "model.num_head_channels=8",
              "model.norm_num_groups=4", "data.patch_size=[16,16]", "diffusion.prediction=v_prediction",
              "diffusion.num_train_timesteps=100"]


@dataclass
class Sizes:
    """What each section runs on (fine-grid sizes)."""

    slice_ref: str
    crop: int  # (a), (c), (e): centre crop of the slice, fine voxels
    ddim_steps: int
    ddim_samples: int
    ddpm_samples: int
    big_ref: str
    big_crop: int  # (b): an image larger than the sliding window
    overhead_samples: int
    overhead_steps: int
    batch_samples: int  # (c)
    batch_steps: int
    memory_slices: tuple[int, int]  # (d)
    memory_crop: int
    amp_samples: int  # (e)
    amp_steps: int


SIZES = {
    "default": Sizes("pydicom:CT_small.dcm", 48, 20, 8, 2, "pydicom:MR2_UNCR.dcm", 192, 2, 3, 8, 5, (128, 256), 64,
                     4, 10),
    "tiny": Sizes("pydicom:CT_small.dcm", 32, 4, 3, 2, "pydicom:CT_small.dcm", 64, 2, 2, 3, 2, (32, 64), 32, 2, 2),
}


def random_checkpoint(path: Path, tiny: bool) -> Path:
    """A random network (output conv randomised: MONAI zero-initialises it) of the tiny or default architecture."""
    cfg = load_config(None, TINY_MODEL) if tiny else load_config(REPO / "configs" / "default_model.yaml")
    return write_untrained_checkpoint(path, cfg, out_std=0.02)


def centre_crop(scan: Scan, size: int) -> Scan:
    keep = [min(s, size) for s in scan.spatial_shape]
    return crop_scan(scan, [(s - k) // 2 for s, k in zip(scan.spatial_shape, keep)], keep)


def psnr(pred: np.ndarray, truth: np.ndarray) -> float:
    value = PSNRMetric(max_val=2.0)(torch.as_tensor(pred)[None, None], torch.as_tensor(truth)[None, None])
    return float(torch.as_tensor(value).mean())


def run_enhance(deg: Degraded, model: LoadedModel, options: EnhanceOptions) -> tuple[float, np.ndarray]:
    """(seconds, posterior mean in the truth's normalised units)."""
    t0 = time.perf_counter()
    result = enhance_scan(deg.low, model, replace(options, slice_axis=deg.slice_axis))
    return time.perf_counter() - t0, deg.norm.normalise(result.mean.array[0])


def section_speed(model: LoadedModel, deg: Degraded, sz: Sizes, device: str) -> None:
    voxels = int(np.prod(deg.truth.spatial_shape))
    spec = parse_spec(model.config.degrade)
    interp = upsample(torch.from_numpy(deg.low_norm).movedim(2, 0)[:, None], spec.factors)[:, 0].movedim(0, 2)
    print(f"(a) scan: {sz.slice_ref} crop {'x'.join(map(str, deg.truth.spatial_shape))} "
          f"({voxels} voxels), {deg.spec}; bicubic PSNR {psnr(interp.numpy(), deg.truth_norm):.2f} dB", flush=True)
    rates = {}
    big_t = model.config.diffusion.num_train_timesteps
    for sampler, steps, samples in (("ddim", sz.ddim_steps, sz.ddim_samples), ("ddpm", big_t, sz.ddpm_samples)):
        sec, mean = run_enhance(deg, model, EnhanceOptions(samples=samples, steps=steps, sampler=sampler,
                                                           device=device, amp="none"))
        rates[sampler] = voxels * samples / sec
        print(f"sampler {sampler} ({steps} steps, {samples} samples): {voxels / sec:.1f} voxels/s "
              f"({voxels * samples / sec:.1f} voxel-samples/s), {sec:.2f} s, PSNR of mean "
              f"{psnr(mean, deg.truth_norm):.2f} dB", flush=True)
    print(f"sampler speed-up per sample: ddim {sz.ddim_steps} steps is {rates['ddim'] / rates['ddpm']:.1f}x "
          f"ddpm {big_t} steps", flush=True)


def section_overhead(model: LoadedModel, sz: Sizes, device: torch.device, repeats: int) -> None:
    cfg = model.config
    spec = parse_spec(cfg.degrade)
    deg = degrade_scan(centre_crop(load_ref(sz.big_ref), sz.big_crop), spec, cfg.intensity)
    y = torch.from_numpy(deg.low_norm).movedim(2, 0)[:, None].to(device)
    n = sz.overhead_samples
    y = y.repeat(n, 1, 1, 1)
    cond = upsample(y, spec.factors)
    window = tuple(2 * p for p in cfg.data.patch_size)
    calls: list[tuple[torch.Size, int]] = []
    hook = model.net.register_forward_pre_hook(
        lambda _m, args, kwargs: calls.append((args[0].shape, int(kwargs["timesteps"][0]))), with_kwargs=True)

    def one_run() -> list[float]:
        stamps = [time.perf_counter()]
        gens = [torch.Generator(device=device).manual_seed(i) for i in range(n)]
        sample(model.net, cfg.diffusion, cond, gens, steps=sz.overhead_steps + 1, lowres=y, spec=spec,
               roi_size=window, overlap=0.25, sw_batch_size=16, amp="none",
               on_step=lambda i, k: stamps.append(time.perf_counter()))
        return list(np.diff(stamps)[1:])  # drop the first step (warm-up)

    one_run()
    hook.remove()
    per_step = [c for c in calls[: len(calls) // (sz.overhead_steps + 1)]]
    windows = sum(shape[0] for shape, _ in per_step)
    inputs = [(torch.randn(shape, device=device), torch.full((shape[0],), t, device=device, dtype=torch.long))
              for shape, t in per_step]
    step_times, bare_times = [], []
    with torch.no_grad():
        for _ in range(repeats):
            step_times += one_run()
            t0 = time.perf_counter()
            for x, t in inputs:
                model.net(x, timesteps=t)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            bare_times.append(time.perf_counter() - t0)
    step, bare = statistics.median(step_times), statistics.median(bare_times)
    ratio = step / bare
    print(f"(b) image {'x'.join(map(str, deg.truth.spatial_shape[:2]))} x {n} samples, window "
          f"{'x'.join(map(str, window))}, overlap 0.25", flush=True)
    print(f"overhead: sampling step {step * 1000:.1f} ms vs bare network {bare * 1000:.1f} ms on the same "
          f"{windows} windows ({len(per_step)} network calls): ratio {ratio:.3f}, target <= 1.10: "
          f"{'met' if ratio <= 1.10 else 'not met'}", flush=True)


def network_batch_ceiling(model: LoadedModel, batch: int, device: str, repeats: int = 3) -> tuple[float, float]:
    """Seconds per window of the bare network on training-size windows, one per call vs ``batch`` per call (the
    best of ``repeats``): the most that batching samples can buy on this device, whatever the sampler does."""
    dev = resolve_device(device)
    size = tuple(model.config.data.patch_size)
    per_window = []
    with torch.no_grad():
        for b in (1, batch):
            x = torch.randn(b, 2, *size, device=dev)
            t = torch.full((b,), 500, device=dev, dtype=torch.long)
            model.net(x, timesteps=t)  # warm-up
            calls = max(1, batch // b)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(calls):
                    model.net(x, timesteps=t)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                best = min(best, (time.perf_counter() - t0) / (calls * b))
            per_window.append(best)
    return per_window[0], per_window[1]


def section_batching(model: LoadedModel, deg: Degraded, sz: Sizes, device: str) -> None:
    opts = EnhanceOptions(samples=sz.batch_samples, steps=sz.batch_steps, device=device, amp="none")
    t_batched, m_batched = run_enhance(deg, model, replace(opts, batch_size=sz.batch_samples))
    t_serial, m_serial = run_enhance(deg, model, replace(opts, batch_size=1))
    print(f"samples: {sz.batch_samples} batched {t_batched:.2f} s vs one after another {t_serial:.2f} s: "
          f"{t_serial / t_batched:.2f}x, max |difference| of means {np.abs(m_batched - m_serial).max():.2e}",
          flush=True)
    one, many = network_batch_ceiling(model, sz.batch_samples, device)
    print(f"network alone: {one * 1000:.1f} ms per window one at a time vs {many * 1000:.1f} ms in batches of "
          f"{sz.batch_samples}: {one / many:.2f}x, the ceiling of batching on this device", flush=True)


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: enhance a volume of ``args.memory_child`` slices; print RSS figures as JSON."""
    sz = SIZES["tiny" if args.tiny else "default"]
    model = load_model(args.model)
    spec = parse_spec(model.config.degrade)
    vol = load_ref("nilearn:mni152").array[0]  # real T1 template, 197x233x189
    n, c = args.memory_child, sz.memory_crop
    x0, y0 = (vol.shape[0] - c) // 2, (vol.shape[1] - c) // 2
    fine = vol[x0:x0 + c, y0:y0 + c]
    fine = np.concatenate([fine, fine[..., ::-1]] * (n // (2 * fine.shape[2]) + 1), axis=2)[..., :n]
    low = fine.reshape(c // spec.factors[0], spec.factors[0], c // spec.factors[1], spec.factors[1], n).mean((1, 3))
    scan = Scan(low[None].astype(np.float32), np.diag([4.0, 4.0, 1.0, 1.0]), modality="MR", source="mni152")
    # small batches keep the per-chunk working memory (network activations) small next to the outputs
    opts = EnhanceOptions(samples=2, steps=1, device=args.device, amp="none", slice_axis=2, batch_size=4)
    del vol, fine
    enhance_scan(scan.with_array(scan.array[..., :8]), model, opts)  # warm-up: one-time buffers, full chunks
    gc.collect()
    reset = _reset_peak()  # else the peak of loading the template (freed since) would hide enhance's
    rss_before = _status("VmRSS")
    peak_before = _peak()
    result = enhance_scan(scan, model, opts)
    peak_after = _peak()
    outputs = sum(getattr(result, k).array.nbytes for k in ("mean", "std", "q05", "q95"))
    print(json.dumps({"slices": n, "rss_before": rss_before, "peak_before": peak_before, "peak_after": peak_after,
                      "outputs": outputs, "shape": list(result.mean.spatial_shape), "reset": reset}))


def _reset_peak() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS: Linux >= 4.0, ``clear_refs`` 5."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _status(key: str) -> int:
    """A ``/proc/self/status`` memory figure in bytes (0 where there is no /proc)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _peak() -> int:
    """Peak RSS of this process: VmHWM where /proc has it, else ``getrusage`` maxrss.

    In a child started by fork + exec, ``ru_maxrss`` also counts the parent's RSS at the fork (Linux keeps the
    pre-exec image's high-water mark in the signal struct, and clear_refs does not reset that), so a child of a big
    parent reports the parent's size; VmHWM is the child's own address space only.
    """
    return _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def section_memory(args: argparse.Namespace, model_path: Path, sz: Sizes) -> None:
    mib = 2**20
    rows = []
    for n in sz.memory_slices:
        cmd = [sys.executable, __file__, "--memory-child", str(n), "--model", str(model_path), "--device", args.device,
               "--threads", str(args.threads)] + (["--tiny"] if args.tiny else [])
        # a fixed mmap threshold: large freed blocks go back to the OS, so RSS follows live memory (glibc's
        # adaptive threshold otherwise parks freed buffers in the heap, and the figures depend on history)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        growth = r["peak_after"] - max(r["rss_before"], 0)
        rows.append((n, growth, r["outputs"]))
        print(f"memory: {n} slices (output {'x'.join(map(str, r['shape']))}): peak RSS growth {growth / mib:.1f} MiB, "
              f"output arrays {r['outputs'] / mib:.1f} MiB"
              + ("" if r["reset"] else " (peak RSS could not be reset: growth from the process's overall peak)"),
              flush=True)
    (n1, g1, o1), (n2, g2, o2) = rows
    print(f"memory: from {n1} to {n2} slices growth rose {(g2 - g1) / mib:.1f} MiB for {(o2 - o1) / mib:.1f} MiB more "
          f"output arrays ({(g2 - g1) / max(1, o2 - o1):.2f} x; windows and chunks are the same at both sizes)",
          flush=True)


def section_amp(model: LoadedModel, deg: Degraded, sz: Sizes, device: str) -> None:
    opts = EnhanceOptions(samples=sz.amp_samples, steps=sz.amp_steps, device=device)
    t32, m32 = run_enhance(deg, model, replace(opts, amp="none"))
    t16, m16 = run_enhance(deg, model, replace(opts, amp="bf16"))
    p32, p16 = psnr(m32, deg.truth_norm), psnr(m16, deg.truth_norm)
    print(f"amp fp32: {t32:.2f} s, PSNR of mean {p32:.2f} dB ({sz.amp_samples} samples, {sz.amp_steps} steps)",
          flush=True)
    print(f"amp bf16: {t16:.2f} s ({t32 / t16:.2f}x fp32 speed), PSNR of mean {p16:.2f} dB, difference "
          f"{p16 - p32:+.3f} dB, max |bf16 - fp32| of means {np.abs(m16 - m32).max():.2e}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random model, small images (smoke test)")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: shipped model, else random)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--repeats", type=int, default=None, help="overhead repeats (default 3, tiny 2)")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        memory_child(args)
        return
    sz = SIZES["tiny" if args.tiny else "default"]
    device = resolve_device(args.device)
    print(machine_line(device), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or (SHIPPED if SHIPPED.is_file() and not args.tiny else None)
        label = str(model_path)
        if model_path is None:
            model_path = random_checkpoint(Path(tmp) / "random.pt", args.tiny)
            label = "random weights, " + ("tiny architecture" if args.tiny else "configs/default_model.yaml "
                                          "architecture (PSNRs say nothing about quality)")
        model = load_model(model_path, device)
        cfg = model.config
        print(f"setup: model={label}; degrade {cfg.degrade}, {cfg.diffusion.prediction}, T="
              f"{cfg.diffusion.num_train_timesteps}, channels {list(cfg.model.channels)}, window "
              f"{[2 * p for p in cfg.data.patch_size]}; {'tiny' if args.tiny else 'default'} sizes", flush=True)
        deg = degrade_scan(centre_crop(load_ref(sz.slice_ref), sz.crop), cfg.degrade, cfg.intensity)
        section_speed(model, deg, sz, args.device)
        section_overhead(model, sz, device, args.repeats or (2 if args.tiny else 3))
        section_batching(model, deg, sz, args.device)
        section_memory(args, model_path, sz)
        section_amp(model, deg, sz, args.device)


if __name__ == "__main__":
    main()
