"""Which shipped model fits a scan, from its geometry alone, and why (``medsr enhance --model auto``).

The rules (stated so that a user can predict them):
- one axis coarser than both others by at least :data:`THICK_RATIO` → a *through-plane* model along that axis,
  by the shipped factor nearest to ``spacing[thick] / min(spacing of the other two)`` (so the output is as fine
  as the scan's finest axis); if no through-plane model is shipped, the in-plane model, said so;
- a 2D slice (a singleton axis), two coarse axes, or a DICOM image plane → the *in-plane* model in that plane;
- isotropic → the in-plane model on axial slices (the last array axis).
Denoising models are never chosen automatically: nothing in a scan's geometry says it is low-dose.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medsr.degrade import DegradeSpec
from medsr.errors import MedsrError
from medsr.runtime import SHIPPED_MODELS, ShippedModel

__all__ = ["THICK_RATIO", "AUTO", "ModelChoice", "choose_model", "is_through_plane", "explicit_choice"]

AUTO = "auto"  # ``--model auto``: choose from the scan's geometry

THICK_RATIO = 1.5  # one axis at least this much coarser than both others counts as thick slices


@dataclass(frozen=True)
class ModelChoice:
    """The model to run, the array axis it works across, and a sentence a user can read."""

    name: str
    task: str  # "inplane", "throughplane" or "denoise"
    axis: int  # in-plane: the slice axis (the plane is the other two); through-plane: the thick axis
    factor: int  # through-plane: the refinement along ``axis``; in-plane: the model's in-plane factor
    reason: str


def _by_task(registry: Mapping[str, ShippedModel], task: str) -> list[ShippedModel]:
    return [m for m in registry.values() if m.task == task and m.auto]


def choose_model(spacing: Sequence[float], shape: Sequence[int], acquisition_axis: int | None = None,
                 registry: Mapping[str, ShippedModel] | None = None) -> ModelChoice:
    """Pick a shipped model for a scan of voxel ``spacing`` (mm) and ``shape``; see the module docstring.

    ``acquisition_axis`` is the array axis normal to a DICOM image plane (None for NIfTI).
    """
    models = SHIPPED_MODELS if registry is None else registry
    sp = np.asarray(spacing, np.float64)
    inplane = _by_task(models, "inplane")
    if not inplane:
        raise MedsrError("no in-plane model is shipped; pass --model NAME or PATH")
    inp = inplane[0]

    def in_plane(axis: int, why: str) -> ModelChoice:
        return ModelChoice(inp.name, "inplane", axis, inp.factors[0], why)

    singleton = [a for a in range(3) if int(shape[a]) == 1]
    if singleton:
        return in_plane(singleton[-1], f"a 2D image: in-plane model {inp.name!r} on its plane")
    order = np.argsort(sp)
    finest, middle, coarsest = (int(a) for a in order)
    if sp[coarsest] >= THICK_RATIO * sp[middle]:
        ratio = sp[coarsest] / sp[finest]
        through = sorted(_by_task(models, "throughplane"), key=lambda m: (abs(m.factors[-1] - ratio), m.factors[-1]))
        spacing_text = "x".join(f"{v:g}" for v in sp)
        if not through:
            return in_plane(acquisition_axis if acquisition_axis is not None else coarsest,
                            f"thick slices along axis {coarsest} ({spacing_text} mm) but no through-plane model is "
                            f"shipped: in-plane model {inp.name!r} on the acquired planes")
        best = through[0]
        factor = int(best.factors[-1])
        exact = abs(factor - ratio) < 0.25
        why = (f"thick slices along axis {coarsest} ({spacing_text} mm, {ratio:.2f}x the finest axis): "
               f"through-plane model {best.name!r} x{factor}")
        if not exact:
            offered = ", ".join(f"x{m.factors[-1]}" for m in through)
            why += (f" (nearest of the shipped factors {offered} to {ratio:.2f}; "
                    f"output spacing {sp[coarsest] / factor:g} mm)")
        return ModelChoice(best.name, "throughplane", coarsest, factor, why)
    if acquisition_axis is not None:
        return in_plane(acquisition_axis, f"DICOM image plane: in-plane model {inp.name!r} on the acquired planes")
    if sp[middle] >= THICK_RATIO * sp[finest]:  # two coarse axes: enhance the plane they span
        return in_plane(finest, f"two coarse axes: in-plane model {inp.name!r} on the plane they span")
    return in_plane(2, f"near-isotropic voxels: in-plane model {inp.name!r} on axial slices")


def is_through_plane(spec: DegradeSpec) -> bool:
    """A 2D block average along exactly one image axis (``block:1x4``): a model that refines one axis, used on
    the planes that contain a scan's thick axis (:mod:`medsr.through_plane`)."""
    return spec.kind == "block" and spec.spatial_dims == 2 and min(spec.factors) == 1 and max(spec.factors) > 1


def explicit_choice(name_or_path: str, spec: DegradeSpec, spacing: Sequence[float], slice_axis: int) -> ModelChoice:
    """What ``--model NAME|PATH`` runs: the checkpoint's own degradation decides the task (a 2D spec with one
    factor 1 is through-plane, along the scan's coarsest axis; a low-dose spec denoises; anything else works as
    before, across ``slice_axis``)."""
    if is_through_plane(spec):
        sp = np.asarray(spacing, np.float64)
        thick = int(np.flatnonzero(sp >= sp.max() * (1 - 1e-3))[-1])
        return ModelChoice(name_or_path, "throughplane", thick, max(spec.factors),
                           f"--model {name_or_path}: a through-plane model ({spec}), along the scan's coarsest "
                           f"axis {thick}")
    where = "on the whole volume" if spec.spatial_dims == 3 else f"slices across axis {slice_axis}"
    if spec.kind == "lowdose":  # a denoiser: same grid out as in
        return ModelChoice(name_or_path, "denoise", slice_axis, 1,
                           f"--model {name_or_path}: a low-dose CT denoiser ({spec}), {where}; output grid = input "
                           "grid")
    return ModelChoice(name_or_path, "inplane", slice_axis, max(spec.factors),
                       f"--model {name_or_path} ({spec}), {where}")
