"""Every picture medsr draws: the review figure of ``enhance`` and the figures of ``medsr evaluate``.

Review figure, one row: the input (on the fine grid, nearest neighbour, so its blockiness is honest), the
enhanced posterior mean, the half-width of the calibrated 90% interval as a heat map over the enhanced image
(colour bar in scan units), and a zoom on the most uncertain region, input beside enhanced. The slice shown is
the one with most body. Evaluation figures: the calibration curve, error vs uncertainty per patch, and a
side-by-side comparison per scan.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from medsr.io.paths import atomic_path, sanitize_component

__all__ = ["review_figure", "heat_caption", "through_plane_figure", "write_evaluation_figures"]


def _pick_slice(vol: np.ndarray, axis: int) -> int:
    if vol.shape[axis] == 1:
        return 0
    lo = np.percentile(vol, 5)
    body = (vol > lo + 0.1 * (np.percentile(vol, 99) - lo)).sum(axis=tuple(a for a in range(3) if a != axis))
    return int(np.argmax(body))


def _plane(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A plane of a RAS-ordered volume for ``origin="lower"`` display in radiological convention.

    Rows run along the second remaining axis (anterior / superior up), columns along the first, flipped when it
    is the R-L axis so the patient's right is on the viewer's left.
    """
    plane = np.take(vol, index, axis=axis).T
    return plane[:, ::-1] if axis != 0 else plane


def _to_ras(vols: list[np.ndarray], affine: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Reorder arrays to the closest RAS axes (from the affine); returns them and the axis permutation."""
    ornt = nib.orientations.io_orientation(affine)
    return [nib.orientations.apply_orientation(v, ornt) for v in vols], ornt[:, 0].astype(int)


NEARLY_UNIFORM = 0.25  # a heat map varying by less than this share of its top value is said to be nearly uniform


def heat_caption(plane: np.ndarray, title: str, units: str = "") -> str:
    """``title``, plus a second line when the shown plane is nearly uniform (1st to 99.5th percentile within
    :data:`NEARLY_UNIFORM` of the top): the colour scale starts at the map's floor, so small differences fill the
    whole colour range, and a reader should not take them for structure."""
    lo, hi = (float(v) for v in np.percentile(plane, [1, 99.5]))
    if hi <= 0 or hi - lo >= NEARLY_UNIFORM * hi:
        return title
    return f"{title}\nnearly uniform here: {lo:.3g} to {hi:.3g} {units}".rstrip()


def review_figure(
    low: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    factors: tuple[int, int, int],
    path: str | os.PathLike[str],
    title: str = "",
    units: str = "",
    slice_axis: int = 2,
    affine: np.ndarray | None = None,
    heat_label: str = "std",
    heat_title: str = "uncertainty (per-voxel std)",
) -> Path:
    """Write the review PNG atomically. Arrays are ``(X, Y, Z)``: ``low`` coarse, ``mean``/``std`` fine.

    ``std`` is the map shown as heat (``enhance`` passes the calibrated interval half-width, ``heat_label`` and
    ``heat_title`` say so). With the scan's ``affine`` the planes are shown in radiological convention.
    """
    low_fine = low
    for axis, f in enumerate(factors):
        low_fine = np.repeat(low_fine, f, axis=axis)
    if affine is not None:
        (low_fine, mean, std), perm = _to_ras([low_fine, mean, std], affine)
        slice_axis = int(perm[slice_axis])
    index = _pick_slice(mean, slice_axis)
    planes = [_plane(v, slice_axis, index) for v in (low_fine, mean, std)]
    vmin, vmax = np.percentile(planes[1], [1, 99.5])
    smax = max(float(np.percentile(planes[2], 99.5)), 1e-6)
    # the scale starts at the map's floor (its 1st percentile: the input's noise, everywhere), so what stands out
    # is where the model is less sure than that; the colour bar gives the values in scan units
    smin = min(float(np.percentile(planes[2], 1)), 0.9 * smax)
    heat_title = heat_caption(planes[2], heat_title, units)
    # zoom on the most uncertain window (a quarter of the plane)
    h, w = planes[1].shape
    zh, zw = max(8, h // 4), max(8, w // 4)
    blur = _box_mean(planes[2], zh, zw)
    r, c = np.unravel_index(int(np.argmax(blur)), blur.shape)
    zoom = (slice(r, r + zh), slice(c, c + zw))

    fig = Figure(figsize=(16, 4.6), layout="constrained")
    axes = fig.subplots(1, 4)
    axes[0].imshow(planes[0], cmap="gray", vmin=vmin, vmax=vmax, origin="lower")
    axes[0].set_title("input (as acquired)")
    axes[1].imshow(planes[1], cmap="gray", vmin=vmin, vmax=vmax, origin="lower")
    axes[1].set_title("enhanced (posterior mean)")
    axes[1].add_patch(Rectangle((c - 0.5, r - 0.5), zw, zh, fill=False, ec="yellow", lw=1.5))
    axes[2].imshow(planes[1], cmap="gray", vmin=vmin, vmax=vmax, origin="lower")
    heat = axes[2].imshow(planes[2], cmap="inferno", vmin=smin, vmax=smax, alpha=0.75, origin="lower")
    fig.colorbar(heat, ax=axes[2], fraction=0.046, pad=0.02, label=f"{heat_label} {units}".strip())
    axes[2].set_title(heat_title)
    detail = np.concatenate([planes[0][zoom], np.full((zh, max(1, zw // 16)), vmax), planes[1][zoom]], axis=1)
    axes[3].imshow(detail, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest")
    axes[3].set_title("detail: input | enhanced")
    return _finish(fig, axes, title, Path(path))


def _box_mean(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Mean over every h x w window (valid positions), via a summed-area table."""
    s = np.pad(np.cumsum(np.cumsum(a, 0), 1), ((1, 0), (1, 0)))
    out = s[h:, w:] - s[:-h, w:] - s[h:, :-w] + s[:-h, :-w]
    return out / (h * w) if out.size else np.zeros((1, 1))


def _finish(fig: Any, axes: Sequence[Any], title: str, path: Path) -> Path:
    """The review figures' common end: images without ticks, the title above, written by :func:`_save`."""
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    """Render once and write a fast-compressed PNG atomically.

    ``savefig`` draws a figure with a layout engine twice (once only to lay it out) and compresses at zlib level
    6; one Agg draw (which runs the layout) and level 1 give the same pixels in about 60% of the time, which
    every enhance and archive item pays.
    """
    fig.set_dpi(100)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(canvas.buffer_rgba())).save(tmp, format="png", compress_level=1)
    return path


def write_evaluation_figures(scans: Sequence[Any], summary: dict[str, Any], out: Path) -> list[Path]:
    """``calibration.png``, ``error_vs_uncertainty.png`` and ``compare_NAME.png`` per scan (``ScanEvaluation``s)."""
    written = [_calibration_plot(scans, summary, out / "calibration.png"),
               _scatter_plot(scans, summary, out / "error_vs_uncertainty.png")]
    return written + [_compare_figure(s, out / f"compare_{sanitize_component(s.name)}.png") for s in scans]


def _calibration_plot(scans: Sequence[Any], summary: dict[str, Any], path: Path) -> Path:
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
    for s in scans:
        ax.plot(s.curve["nominal"], s.curve["empirical"], "-", lw=1, alpha=0.6, label=s.name)
    curve = summary["calibration"]["curve"]
    ax.plot(curve["nominal"], curve["empirical"], "o-", lw=2, color="black", label="all scans")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="nominal coverage of the central interval",
           ylabel="empirical coverage (body voxels)", title="raw sample spread, before calibration")
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def _scatter_plot(scans: Sequence[Any], summary: dict[str, Any], path: Path) -> Path:
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    for s in scans:
        ax.scatter(s.patch_std, s.patch_err, s=6, alpha=0.5, label=s.name)
    rho = summary["calibration"]["spearman_pooled"]
    ax.set(xlabel="per-patch mean std (normalised units)", ylabel="per-patch mean |error| of the mean",
           title=f"error vs uncertainty (Spearman {rho:.2f})")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _compare_figure(s: Any, path: Path) -> Path:
    p = s.planes
    vmin, vmax = np.percentile(p["truth"], [1, 99.5])
    hot = max(float(np.percentile(np.concatenate([p["std"].ravel(), p["error"].ravel()]), 99.5)), 1e-6)
    titles = {"truth": "truth", "interpolation": "interpolation", "sample": "one sample", "mean": "posterior mean",
              "std": "std", "error": "|mean - truth|"}
    fig = Figure(figsize=(18, 3.6), layout="constrained")
    axes = fig.subplots(1, 6)
    for ax, key in zip(axes, titles):
        gray = key not in ("std", "error")
        im = ax.imshow(p[key], cmap="gray" if gray else "inferno", vmin=vmin if gray else 0,
                       vmax=vmax if gray else hot, origin="lower", interpolation="nearest")
        ax.set_title(titles[key])
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[-2:], fraction=0.046, pad=0.02, label="normalised units")
    fig.suptitle(s.name, fontsize=10)
    return _save(fig, path)


def through_plane_figure(
    low: np.ndarray,
    cubic: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    thick_axis: int,
    factor: int,
    path: str | os.PathLike[str],
    title: str = "",
    units: str = "",
    affine: np.ndarray | None = None,
) -> Path:
    """The review PNG of a through-plane job: one reformatted plane that contains the thick axis (where a reader
    sees thick slices), as input (thick slices repeated) | cubic along the thick axis | medsr mean | std.

    ``low`` is ``(X, Y, Z)`` coarse along ``thick_axis``; the others are on the fine grid; ``affine`` (the
    input's) orders the planes radiologically, as :func:`review_figure` does.
    """
    low_fine = np.repeat(low, factor, axis=thick_axis)
    vols = [low_fine, cubic, mean, std]
    shown_axis = [a for a in range(3) if a != thick_axis][0]  # slice across an in-plane axis: a reformatted plane
    if affine is not None:
        vols, perm = _to_ras(vols, affine)
        shown_axis = int(perm[shown_axis])
    index = _pick_slice(vols[2], shown_axis)
    planes = [_plane(v, shown_axis, index) for v in vols]
    vmin, vmax = np.percentile(planes[2], [1, 99.5])
    smax = max(float(np.percentile(planes[3], 99.5)), 1e-6)
    fig = Figure(figsize=(16, 4.6), layout="constrained")
    axes = fig.subplots(1, 4)
    for ax, plane, name in zip(axes[:3], planes[:3], ("input (thick slices)", "cubic along the thick axis",
                                                      "medsr (posterior mean)")):
        ax.imshow(plane, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest")
        ax.set_title(name)
    heat = axes[3].imshow(planes[3], cmap="inferno", vmin=0, vmax=smax, origin="lower", interpolation="nearest")
    fig.colorbar(heat, ax=axes[3], fraction=0.046, pad=0.02, label=f"std {units}".strip())
    axes[3].set_title("uncertainty (per-voxel std)")
    return _finish(fig, axes, title, Path(path))
