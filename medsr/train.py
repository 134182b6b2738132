"""``train(cfg)``: the one explicit SR3 training loop (nanoGPT style), single process or DDP under torchrun.

AdamW with linear warm-up, gradient clipping, EMA weights (used for sampling), autocast (bf16/fp16 on CUDA,
bf16 on CPU where supported), checkpoints that resume bit-for-bit (model, EMA, optimiser, step, RNG state,
resolved config, normalisation), and validation on held-out scans against bicubic/trilinear.
Launched by ``torchrun --nproc_per_node=N -m medsr train CONFIG``, each rank draws its own patches and noise
(seed + rank) and only rank 0 writes.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from monai.data import DataLoader
from monai.metrics import PSNRMetric, SSIMMetric
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from medsr.config import Config, TrainConfig, to_dict
from medsr.data import PatchDataset, load_volumes
from medsr.degrade import parse_spec
from medsr.diffusion import diffusion_loss, make_train_scheduler
from medsr.errors import MedsrError
from medsr.io.paths import atomic_path
from medsr.model import build_unet, checkpoint_payload, load_checkpoint, load_model, load_state_strict, save_checkpoint
from medsr.runtime import autocast_context, dist_info, resolve_amp, resolve_device
from medsr.sampling import make_generators, sample
from medsr.turns import TURNS, ensemble_turns

__all__ = ["train", "TrainResult", "lr_factor", "truncate_log"]

# config sections that define the model; a checkpoint whose sections differ cannot be resumed or used
MODEL_SECTIONS = ("degrade", "model", "diffusion", "intensity")
TEACHER_SECTIONS = ("degrade", "diffusion", "intensity")  # a distillation teacher may differ only in its network


@dataclass
class TrainResult:
    """What a run leaves behind (paths on rank 0) and its last numbers."""

    out_dir: Path
    checkpoint: Path
    step: int
    losses: list[float]
    val: list[dict[str, float]]


def lr_factor(step: int, train: TrainConfig) -> float:
    """The learning rate at ``step`` as a fraction of ``train.lr``: linear warm-up, then constant, then (where
    ``train.lr_decay_end`` is set) a half cosine down to ``train.lr_final`` (see :class:`TrainConfig`)."""
    factor = min(1.0, (step + 1) / max(1, train.warmup_steps))
    if train.lr_decay_end > 0 and step > train.lr_decay_start:
        progress = min(1.0, (step - train.lr_decay_start) / (train.lr_decay_end - train.lr_decay_start))
        factor *= train.lr_final + (1.0 - train.lr_final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up, min(decay, (1 + n) / (10 + n)) (as in diffusers / improved-diffusion practice).

    A fixed 0.999 from the start averages the fast-moving early weights and gives a far worse sampler for the
    first several thousand steps (measured here: -5 dB PSNR at step 3000 against the raw weights).
    """
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e_buf, n_buf in zip(ema.buffers(), net.buffers()):
        e_buf.copy_(n_buf)


def check_compatible(stored: dict[str, Any], cfg: Config, where: str,
                     sections: tuple[str, ...] = MODEL_SECTIONS) -> None:
    """Refuse a checkpoint whose model-defining config differs from ``cfg``, naming the differences."""
    current = to_dict(cfg)
    diffs = [s for s in sections if stored.get(s) != current.get(s)]
    if diffs:
        detail = "; ".join(f"{s}: checkpoint {stored.get(s)} vs config {current.get(s)}" for s in diffs)
        raise MedsrError(f"{where}: checkpoint does not match the config ({detail})")


def _init_from(net: torch.nn.Module, ema: torch.nn.Module, cfg: Config) -> None:
    """Start a new run from another checkpoint's EMA weights (a student from the model it replaces); read with
    :func:`load_model`, so the same checks (config, damaged weights, float32) as any model a user loads."""
    src = cfg.train.init_from
    loaded = load_model(src)
    check_compatible(to_dict(loaded.config), cfg, src)
    state = loaded.net.state_dict()
    load_state_strict(net, state, src)
    load_state_strict(ema, state, src)


def _load_teacher(cfg: Config, device: torch.device) -> torch.nn.Module:
    """The distillation teacher: any network size, but the same degradation, diffusion and intensity sections
    (its output must mean what the student's does)."""
    loaded = load_model(cfg.train.teacher, device)
    check_compatible(to_dict(loaded.config), cfg, cfg.train.teacher, sections=TEACHER_SECTIONS)
    for p in loaded.net.parameters():
        p.requires_grad_(False)
    return loaded.net


@torch.no_grad()
def validate(ema: torch.nn.Module, cfg: Config, batches: list[dict[str, torch.Tensor]], device: torch.device,
             amp: str) -> dict[str, float]:
    """PSNR/SSIM (MONAI metrics, data range 2 in normalised units) of a few-step sample vs interpolation, and with
    ``train.val_samples`` > 1 of the mean of that many samples (``mean_*``): one sample grows sharper, and noisier
    against a noisy truth, as training goes on, while the mean is what enhancement ships, so the two can move
    apart (in-plane v2 on MR2_UNCR: one sample fell 27.51 -> 27.27 dB while the held-out mean of 8 rose)."""
    spec = parse_spec(cfg.degrade)
    dims = cfg.model.spatial_dims
    n = cfg.train.val_samples
    metrics = {key: (PSNRMetric(max_val=2.0), SSIMMetric(spatial_dims=dims, data_range=2.0))
               for key in ("sr", "interp", *(("mean",) if n > 1 else ()))}
    ema.eval()
    for i, batch in enumerate(batches):
        hr, cond, low = (batch[k].to(device) for k in ("hr", "cond", "lowres"))
        b = hr.shape[0]
        gens = make_generators(10_000 + i * b, b, device)  # the first sample: the same draws as val_samples = 1
        gens += [g for s in range(1, n) for g in make_generators(10_000 + 1_000_000 * s + i * b, b, device)]
        rep = [1] * (cond.ndim - 1)
        out = sample(ema, cfg.diffusion, cond.repeat(n, *rep), gens, steps=cfg.train.val_sampling_steps,
                     lowres=low.repeat(n, *rep), spec=spec, amp=amp)
        preds = {"sr": out[:b], "interp": cond}
        if n > 1:
            preds["mean"] = out.reshape(n, *cond.shape).mean(0)
        for key, pred in preds.items():
            metrics[key][0](pred, hr)
            metrics[key][1](pred, hr)
    result = {}
    for key, (psnr, ssim) in metrics.items():
        result[f"{key}_psnr"] = float(torch.as_tensor(psnr.aggregate()).item())
        result[f"{key}_ssim"] = float(torch.as_tensor(ssim.aggregate()).item())
    return result


def train(cfg: Config) -> TrainResult:
    """Train (or resume) the model described by ``cfg``; returns where the results are."""
    dist_env = dist_info()
    rank, local_rank, world = dist_env.rank, dist_env.local_rank, dist_env.world
    distributed = world > 1
    device = resolve_device(cfg.train.device)
    if distributed:
        if device.type == "cuda":
            device = torch.device(f"cuda:{local_rank}")
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    amp = resolve_amp(cfg.train.amp, device)
    out_dir = Path(cfg.train.out_dir)
    last = out_dir / "last.pt"
    spec = parse_spec(cfg.degrade)
    if cfg.model.spatial_dims != spec.spatial_dims:
        raise MedsrError(f"model.spatial_dims={cfg.model.spatial_dims} but degrade {spec} has {spec.spatial_dims} axes")

    torch.manual_seed(cfg.train.seed + rank)
    net = build_unet(cfg.model).to(device)
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + rank)
    start = 0
    if cfg.train.resume and last.is_file():
        ckpt = load_checkpoint(last, map_location=device)
        check_compatible(ckpt["config"], cfg, str(last))
        load_state_strict(net, ckpt["model"], str(last))
        load_state_strict(ema, ckpt["ema"], str(last))
        opt.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["step"])
        # generator states are CPU byte tensors, also for CUDA generators (map_location moved them)
        gen.set_state(ckpt["rng"][min(rank, len(ckpt["rng"]) - 1)].cpu())
    elif cfg.train.init_from:
        _init_from(net, ema, cfg)
    teacher = _load_teacher(cfg, device) if cfg.train.teacher else None
    teacher_turns = ensemble_turns(spec, len(TURNS), len(TURNS)) if cfg.train.teacher_turns else ()
    model: torch.nn.Module = DistributedDataParallel(net) if distributed else net
    scheduler = make_train_scheduler(cfg.diffusion)

    volumes = load_volumes(cfg.data.train, cfg.intensity, cfg.data.foreground_threshold, seed=cfg.train.seed)
    total = cfg.train.steps * cfg.train.batch_size
    noise_cache = out_dir / "lowdose_cache"  # whole-slice low-dose CT noise, made once ("lowdose" specs only)
    train_set = PatchDataset(volumes, spec, cfg.data.patch_size, total, cfg.train.seed, rank, cfg.data.slice_axis,
                             cfg.data.foreground_fraction, augment=cfg.data.augment, lowdose_cache=noise_cache,
                             slice_axes=cfg.data.slice_axes)
    indices = list(range(start * cfg.train.batch_size, total))
    loader = DataLoader(torch.utils.data.Subset(train_set, indices), batch_size=cfg.train.batch_size,
                        shuffle=False, num_workers=cfg.data.num_workers, drop_last=True,
                        persistent_workers=False)
    val_batches: list[dict[str, torch.Tensor]] = []
    if cfg.data.val and rank == 0:
        val_vols = load_volumes(cfg.data.val, cfg.intensity, cfg.data.foreground_threshold, seed=cfg.train.seed)
        val_set = PatchDataset(val_vols, spec, cfg.data.patch_size, cfg.train.val_patches, seed=12345,
                               slice_axis=cfg.data.slice_axis, foreground_fraction=1.0, lowdose_cache=noise_cache,
                               slice_axes=cfg.data.slice_axes)
        val_batches = list(DataLoader(val_set, batch_size=min(cfg.train.batch_size, cfg.train.val_patches)))

    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_dir / "config.json") as tmp:
            tmp.write_text(json.dumps(to_dict(cfg), indent=2))
    log_path = out_dir / "log.csv"
    if rank == 0:
        truncate_log(log_path, start)  # rows logged after the checkpoint we resume from are redone below
    losses: list[float] = []
    val_log: list[dict[str, float]] = []
    bar = tqdm(total=cfg.train.steps, initial=start, disable=rank != 0, desc="train", dynamic_ncols=True)
    wait_time = step_time = 0.0
    t_prev = time.perf_counter()
    step = start
    model.train()

    def save(step: int) -> Path:
        states = [gen.get_state()]
        if distributed:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, gen.get_state().cpu())
            states = gathered
        payload = checkpoint_payload(cfg, ema.state_dict(), model_state=net.state_dict(),
                                     optimizer_state=opt.state_dict(), step=step, rng=[s.cpu() for s in states])
        if rank == 0:
            save_checkpoint(last, payload)
        return last

    for batch in loader:
        t_data = time.perf_counter()
        wait_time += t_data - t_prev
        hr, cond = batch["hr"].to(device), batch["cond"].to(device)
        for group in opt.param_groups:
            group["lr"] = cfg.train.lr * lr_factor(step, cfg.train)
        with autocast_context(device, amp):
            loss = diffusion_loss(model, scheduler, hr, cond, cfg.diffusion, gen, teacher=teacher,
                                  focus_timesteps=cfg.train.focus_timesteps, focus_share=cfg.train.focus_share,
                                  teacher_turns=teacher_turns)
        if not math.isfinite(loss.item()):
            raise MedsrError(f"training diverged at step {step} (loss {loss.item()}); lower train.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.train.grad_clip)
        opt.step()
        _ema_update(ema, net, ema_decay_at(step, cfg.train.ema_decay))
        step += 1
        losses.append(loss.item())
        t_prev = time.perf_counter()
        step_time += t_prev - t_data
        row: dict[str, Any] = {}
        if val_batches and (step % cfg.train.val_every == 0 or step == cfg.train.steps):
            row = validate(ema, cfg, val_batches, device, amp)
            val_log.append({"step": step, **row})
            t_prev = time.perf_counter()
        if rank == 0 and (step % cfg.train.log_every == 0 or row or step == cfg.train.steps):
            _append_csv(log_path, {"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"],
                                   "data_wait_share": wait_time / max(1e-9, wait_time + step_time),
                                   "sec_per_step": (wait_time + step_time) / max(1, step - start), **row})
        if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps:
            save(step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", **({"psnr": f"{row['sr_psnr']:.2f}"} if row else {}))
    bar.close()
    if step == start and not last.is_file():  # nothing to do, but the final checkpoint must exist
        save(step)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(out_dir, last, step, losses, val_log)


CSV_FIELDS = ["step", "loss", "lr", "data_wait_share", "sec_per_step",
              "sr_psnr", "sr_ssim", "interp_psnr", "interp_ssim", "mean_psnr", "mean_ssim"]


def truncate_log(path: Path, last_step: int) -> None:
    """Drop the rows of log ``path`` past ``last_step`` (left by a run that stopped after its last checkpoint), and
    rewrite a log written before columns were added under today's header (``CSV_FIELDS``), so appends line up."""
    if not path.is_file():
        return
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        header = reader.fieldnames or []
    keep = [r for r in rows if int(r["step"]) <= last_step]
    if len(keep) == len(rows) and list(header) == CSV_FIELDS:
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(keep)


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    """One log row; the header was brought up to date by :func:`truncate_log` when the run started."""
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
