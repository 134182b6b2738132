"""Per-scan self-supervised adaptation of a through-plane model (``medsr enhance --adapt STEPS``).

A thick-slice scan carries its own high-resolution examples: its in-plane images are sampled finely along both
in-plane axes. Degrading them along one in-plane axis by the model's factor (the same block average the model
undoes through-plane) gives training pairs of exactly this scan's contrast and anatomy; fine-tuning a copy of
the model on them for a few hundred steps adapts it to the scan (the idea SMORE and ECLARE use to train from
scratch; here it starts from the shipped model). The input scan is never changed; the adapted network lives only
in memory for this scan.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from medsr.data import PatchDataset, Volume
from medsr.diffusion import diffusion_loss, make_train_scheduler
from medsr.errors import MedsrError
from medsr.intensity import fit_normaliser
from medsr.io.scan import Scan
from medsr.model import LoadedModel
from medsr.model_choice import is_through_plane

__all__ = ["adapt_model", "adapt_patch_size"]


def _volume(name: str, data: np.ndarray, threshold: float) -> Volume:
    return Volume(name, data, np.argwhere(data > threshold).astype(np.int32))


def adapt_patch_size(train_patch: Sequence[int], plane: Sequence[int], factors: Sequence[int],
                     multiple: int = 8) -> tuple[int, int]:
    """The square patch to adapt on: the training patch, or the largest multiple of ``multiple`` and of the factors
    that fits inside the in-plane image (both orientations), so that a small scan's patches are its own anatomy
    rather than mostly edge padding (a 33 x 41 plane padded to 64 x 64 is 65% copies of its border)."""
    step = int(np.lcm.reduce([multiple, *(int(f) for f in factors)]))
    fits = min(plane) // step * step
    size = min(int(min(train_patch)), fits) if fits else step
    return size, size


def adapt_model(model: LoadedModel, scan: Scan, thick_axis: int, steps: int, *, lr: float = 1e-4,
                batch_size: int = 8, seed: int = 0) -> tuple[LoadedModel, dict[str, float]]:
    """A copy of the through-plane ``model`` fine-tuned for ``steps`` steps on ``scan``'s in-plane slices
    (the planes across ``thick_axis``), degraded along one in-plane axis; and what it cost.

    Both in-plane axes take the role of the degraded axis (the slices are used as they are and transposed).
    Patches are the model's training patch size, or smaller on a small scan (:func:`adapt_patch_size`); the
    network's EMA copy is not used: the fine-tuned weights are.
    """
    spec = model.degradation
    if not is_through_plane(spec):
        raise MedsrError(f"--adapt needs a through-plane model (block:1xF); {model.path} has {spec}")
    if steps < 1:
        raise MedsrError(f"--adapt STEPS must be >= 1, got {steps}")
    cfg = model.config
    device = next(model.net.parameters()).device
    t0 = time.perf_counter()
    norm = fit_normaliser(scan.array, scan.modality, cfg.intensity)
    data = np.moveaxis(norm.normalise(scan.array[0]), int(thick_axis), 2)  # in-plane slices across axis 2
    if min(data.shape[:2]) < 2 * max(spec.factors):
        raise MedsrError(f"{scan.source}: in-plane size {data.shape[:2]} too small to adapt on")
    thr = cfg.data.foreground_threshold
    patch = adapt_patch_size(cfg.data.patch_size, data.shape[:2], spec.factors)
    volumes = [_volume("in-plane", np.ascontiguousarray(data), thr),
               _volume("in-plane transposed", np.ascontiguousarray(data.transpose(1, 0, 2)), thr)]
    dataset = PatchDataset(volumes, spec, patch, steps * batch_size, seed=seed, slice_axis=2,
                           foreground_fraction=cfg.data.foreground_fraction)
    net = copy.deepcopy(model.net).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=cfg.train.weight_decay)
    scheduler = make_train_scheduler(cfg.diffusion)
    gen = torch.Generator(device=device).manual_seed(seed)
    losses = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=True):
        loss = diffusion_loss(net, scheduler, batch["hr"].to(device), batch["cond"].to(device), cfg.diffusion, gen)
        if not bool(torch.isfinite(loss)):
            raise MedsrError(f"{scan.source}: --adapt diverged (loss {loss.item()})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.train.grad_clip)
        opt.step()
        losses.append(float(loss.item()))
    net.eval()
    cost = {"steps": float(steps), "seconds": time.perf_counter() - t0,
            "first_loss": float(np.mean(losses[:10])), "last_loss": float(np.mean(losses[-10:]))}
    return replace(model, net=net, path=f"{model.path} (adapted {steps} steps on this scan)"), cost
