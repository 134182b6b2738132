"""Plain vs residual diffusion target, reproducibly: same UNet, same steps, same data, same seeds.

Each target trains a small 2D x4 (block:4x4) model on real MNI152 slices with ``medsr.train.train``; then, on
real slices held out by scan (nibabel's anatomical.nii T1 and pydicom-data's MR2_UNCR shoulder MR), it draws 4
posterior samples per patch (DDIM, with data consistency) and reports the PSNR of their mean and of a single
sample, next to bicubic interpolation (the condition itself).

    .venv/bin/python benchmarks/bench_targets.py                 # the comparison (long on a CPU; resumable)
    .venv/bin/python benchmarks/bench_targets.py --tiny          # smoke run: a few steps, junk numbers

PSNR in dB with data range 2 (normalised units). Everything except the target (and its scale) is fixed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from monai.metrics import PSNRMetric

from medsr.config import Config, load_config, to_dict
from medsr.data import PatchDataset, load_volumes
from medsr.degrade import parse_spec
from medsr.model import load_model
from medsr.runtime import resolve_device
from medsr.sampling import make_generators, sample
from medsr.train import train

VAL_REFS = ["nibabel:anatomical.nii", "pydicom:MR2_UNCR.dcm"]
SAMPLES = 4


def make_config(target: str, out_dir: Path, args: argparse.Namespace) -> Config:
    if args.tiny:
        model = ["model.channels=[8,16]", "model.attention_levels=[false,false]", "model.num_head_channels=8",
                 "model.norm_num_groups=4"]
    else:
        model = ["model.channels=[16,32,32]", "model.attention_levels=[false,false,false]",
                 "model.num_head_channels=16", "model.norm_num_groups=8"]
    return load_config(None, [
        "degrade=block:4x4", "data.train=[nilearn:mni152]", "data.val=[]",
        f"data.patch_size=[{args.patch},{args.patch}]", *model,
        f"diffusion.target={target}", "diffusion.residual_scale=4.0", f"diffusion.prediction={args.prediction}",
        f"train.out_dir={out_dir / target}", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
        f"train.lr={args.lr:.12f}",  # fixed-point: YAML reads "1e-05" as a string
        f"train.warmup_steps={max(1, args.steps // 20)}",
        f"train.ema_decay={0.9 if args.tiny else 0.995}", "train.seed=0", f"train.threads={args.threads}",
        f"train.amp={args.amp}", f"train.device={args.device}", f"train.log_every={max(1, args.steps // 20)}",
        f"train.ckpt_every={max(1, args.steps // 10)}",
    ])


@torch.no_grad()
def evaluate(ckpt: Path, batches: list[dict[str, torch.Tensor]], steps: int, device: torch.device) -> dict[str, float]:
    """PSNR of the 4-sample posterior mean, of one sample, and of bicubic, averaged over the held-out patches."""
    model = load_model(ckpt, device)
    spec = parse_spec(model.config.degrade)
    metrics = {k: PSNRMetric(max_val=2.0) for k in ("mean", "single", "bicubic")}
    for i, batch in enumerate(batches):
        hr, cond, low = (batch[k].to(device) for k in ("hr", "cond", "lowres"))
        n = hr.shape[0]
        reps = cond.repeat_interleave(SAMPLES, 0)
        gens = make_generators(1000 + i * n * SAMPLES, n * SAMPLES, device)
        out = sample(model.net, model.config.diffusion, reps, gens, steps=steps,
                     lowres=low.repeat_interleave(SAMPLES, 0), spec=spec)
        out = out.reshape(n, SAMPLES, *hr.shape[1:])
        metrics["mean"](out.mean(1), hr)
        metrics["single"](out[:, 0], hr)
        metrics["bicubic"](cond, hr)
    return {k: float(torch.as_tensor(m.aggregate()).item()) for k, m in metrics.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a few steps with a tiny UNet (smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per target (default 4000, tiny 4)")
    ap.add_argument("--batch", type=int, default=None, help="patches per step (default 8, tiny 2)")
    ap.add_argument("--patch", type=int, default=32, help="square patch size, training and evaluation")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--prediction", default="v_prediction", help="v_prediction (the shipped default) or epsilon")
    ap.add_argument("--val-patches", type=int, default=None, help="held-out patches per scan (default 32, tiny 2)")
    ap.add_argument("--sampling-steps", type=int, default=None, help="DDIM steps (default 50, tiny 2)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--amp", default="none")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="run folder (reused to resume); default a temp dir")
    args = ap.parse_args(argv)
    args.steps = args.steps or (4 if args.tiny else 4000)
    args.batch = args.batch or (2 if args.tiny else 8)
    val_patches = args.val_patches or (2 if args.tiny else 32)
    sampling_steps = args.sampling_steps or (2 if args.tiny else 50)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        results = {}
        for target in ("plain", "residual"):
            cfg = make_config(target, out, args)
            result = train(cfg)
            device = resolve_device(cfg.train.device)
            print(f"trained {target}: {result.step} steps, final loss {result.losses[-1] if result.losses else 'n/a'}"
                  f" -> {result.checkpoint}", flush=True)
            spec = parse_spec(cfg.degrade)
            for ref in VAL_REFS:
                vols = load_volumes([ref], cfg.intensity, cfg.data.foreground_threshold)
                data = PatchDataset(vols, spec, cfg.data.patch_size, val_patches, seed=12345,
                                    foreground_fraction=1.0)
                batches = list(torch.utils.data.DataLoader(data, batch_size=min(8, val_patches)))
                results[(target, ref)] = evaluate(result.checkpoint, batches, sampling_steps, device)
        resolved = to_dict(cfg)
        shared = {k: v for k, v in resolved["diffusion"].items() if k != "target"}
        print(f"setup: diffusion {json.dumps(shared)}; model {json.dumps(resolved['model'])}; "
              f"{args.steps} steps x {args.batch} patches of {args.patch}^2 on nilearn:mni152; "
              f"{val_patches} held-out patches per scan; {SAMPLES} samples, {sampling_steps} DDIM steps")
        header = f"{'target':<9} {'held-out scan':<28} {'mean-of-4':>10} {'1-sample':>9} {'bicubic':>8} {'gain':>7}"
        print(header)
        print("-" * len(header))
        for (target, ref), r in results.items():
            print(f"{target:<9} {ref:<28} {r['mean']:>10.2f} {r['single']:>9.2f} {r['bicubic']:>8.2f} "
                  f"{r['mean'] - r['bicubic']:>+7.2f}")
        print("(PSNR in dB, data range 2; gain = posterior mean minus bicubic)")


if __name__ == "__main__":
    main()
