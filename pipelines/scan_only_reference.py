"""What a thick scan's own in-plane slices teach, from scratch: the SMORE recipe as a reference for issue 14.

    python -m pipelines.scan_only_reference [--iterations 300 --width 16 --depth 3] [--crop 40]

Why: a thick-slice scan carries its own high-resolution examples, its in-plane images (Zhao et al., SMORE, 2021).
Block-averaging them by 4 along one in-plane axis and interpolating back with cubic makes (input, truth) pairs
with the same degradation as the thick axis; a small residual CNN trained on those pairs alone, then run on the
planes that contain the thick axis (both orientations averaged), says how much the scan itself can teach — the
ceiling of any per-scan adaptation that has nothing else to learn from. For each of the through-plane card's
held-out MR volumes (:data:`pipelines.throughplane_card.VOLUMES`) it prints the gain over cubic along the thick
axis, per orientation and fused (PSNR in normalised units, range 2, as :mod:`medsr.evaluate`).

The network is a plain stack of MONAI convolution blocks predicting a residual on the cubic input: no diffusion,
no uncertainty, trained with MSE (what PSNR rewards). It is a measurement, not a shipped model.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from medsr.evaluate import degrade_scan, thick_slice_axis
from medsr.io.refs import load_ref
from medsr.through_plane import cubic_along
from pipelines.throughplane_card import VOLUMES, centre, with_template_crop

__all__ = ["inplane_pairs", "ResidualCNN", "fit_on_pairs", "upsample_planes", "psnr"]


def psnr(pred: np.ndarray, truth: np.ndarray) -> float:
    """PSNR for normalised units (range 2)."""
    return 10 * math.log10(4.0 / float(np.mean((np.asarray(pred, np.float64) - truth) ** 2)))


def inplane_pairs(thick: np.ndarray, axis: int, factor: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(cubic input, truth) pairs from the in-plane images of ``thick`` (the planes across ``axis``): each image,
    in both transposes and the four flips, block-averaged by ``factor`` along its first axis and cubic back.
    One pair per (transpose, flip), each a stack (S, H, W) with H a multiple of ``factor``."""
    planes = np.moveaxis(np.asarray(thick, np.float32), axis, 0)
    pairs = []
    for stack in (planes, np.swapaxes(planes, 1, 2)):
        for flipped in (stack, stack[:, ::-1], stack[:, :, ::-1], stack[:, ::-1, ::-1]):
            height = flipped.shape[1] // factor * factor
            truth = np.ascontiguousarray(flipped[:, :height])
            coarse = truth.reshape(truth.shape[0], height // factor, factor, truth.shape[2]).mean(2)
            pairs.append((cubic_along(coarse, 1, factor).astype(np.float32), truth))
    return pairs


class ResidualCNN(nn.Module):
    """``depth`` 3x3 convolutions (MONAI blocks, ReLU between), adding a residual to the cubic input."""

    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        chans = [1] + [width] * (depth - 1) + [1]
        self.body = nn.Sequential(*[Convolution(2, a, b, kernel_size=3, act=None if i == depth - 1 else "relu",
                                                norm=None, conv_only=i == depth - 1)
                                    for i, (a, b) in enumerate(zip(chans[:-1], chans[1:]))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def fit_on_pairs(pairs: list[tuple[np.ndarray, np.ndarray]], iterations: int, width: int = 16, depth: int = 3,
                 seed: int = 0) -> tuple[ResidualCNN, list[float]]:
    """Adam (1e-3, cosine to 1e-5) on the MSE of every pair at every iteration; returns the network and the loss
    at each iteration."""
    torch.manual_seed(seed)
    net = ResidualCNN(width, depth)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(iterations, 1), 1e-5)
    data = [(torch.from_numpy(x)[:, None], torch.from_numpy(y)[:, None]) for x, y in pairs]
    losses = []
    for _ in range(iterations):
        loss = sum(F.mse_loss(net(x), y) for x, y in data) / len(data)
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))  # type: ignore[union-attr]
    return net, losses


@torch.no_grad()
def upsample_planes(net: nn.Module, thick: np.ndarray, axis: int, factor: int) -> list[np.ndarray]:
    """The network on cubic along ``axis``, run on the planes containing ``axis`` (one result per orientation)."""
    cubic = np.moveaxis(cubic_along(thick, axis, factor), axis, 0)  # (fS, A, B)
    out = []
    for other in (2, 1):  # planes (fS, A) stacked along B, then (fS, B) stacked along A
        stack = np.ascontiguousarray(np.moveaxis(cubic, other, 0), np.float32)
        pred = net(torch.from_numpy(stack)[:, None])[:, 0].numpy()
        out.append(np.moveaxis(np.moveaxis(pred, 0, other), 0, axis))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--crop", type=int, default=40, help="the template's centred crop (the card's --crop)")
    args = parser.parse_args()
    print("| volume, made thick | cubic PSNR | orientation 1 | orientation 2 | fused | loss first → last |")
    print("|---|---|---|---|---|---|")
    for case in (with_template_crop(c, args.crop) for c in VOLUMES):
        deg = degrade_scan(centre(load_ref(case.ref, case.modality), case.crop), case.spec)
        axis = thick_slice_axis(deg.spec)
        assert axis is not None  # VOLUMES are thick along one axis
        factor = deg.factors[axis]
        net, losses = fit_on_pairs(inplane_pairs(deg.low_norm, axis, factor), args.iterations, args.width,
                                   args.depth)
        truth, cubic = deg.truth_norm, cubic_along(deg.low_norm, axis, factor)
        one, two = upsample_planes(net, deg.low_norm, axis, factor)
        base = psnr(cubic, truth)
        gains = [psnr(p, truth) - base for p in (one, two, 0.5 * (one + two))]
        print(f"| {case.name} {case.spec} | {base:.2f} | " + " | ".join(f"{g:+.2f} dB" for g in gains)
              + f" | {losses[0]:.4f} → {losses[-1]:.4f} |", flush=True)


if __name__ == "__main__":
    main()
