"""The 8 flips/transposes ("turns") of a plane, and which of them a degradation allows.

Why: a geometric self-ensemble (``SamplingConfig.self_ensemble``; EDSR's) draws each diffusion sample on a turned
input and turns it back, and a distillation may take its teacher's output on a turned input
(``train.teacher_turns``). Both are sound only for turns the degradation commutes with: then a sample (or an
estimate) for the turned input, turned back, is one for the input as given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medsr.degrade import DegradeSpec

__all__ = ["Turn", "TURNS", "ensemble_turns", "turn", "unturn", "shape_groups"]

# One of the 8 flips/transposes of a plane: (flip rows, flip columns, then transpose) of the last two axes.
Turn = tuple[bool, bool, bool]

# The 8 flips/transposes of a plane (the dihedral group), in the order the samples use them: the four flips
# first (they keep the plane's shape), then the same four followed by a transpose.
TURNS: tuple[Turn, ...] = tuple((r, c, t) for t in (False, True) for c in (False, True) for r in (False, True))


def ensemble_turns(spec: DegradeSpec, requested: int, samples: int) -> tuple[Turn, ...]:
    """The turns (flips/transposes) a run spreads its samples over: the first ``min(requested, allowed, samples)``.

    Allowed: those the degradation is symmetric under, so a sample drawn on the turned input and turned back
    is a sample for the input as given (A commutes with them; tested): 2D block averages (any slice profile or
    blur) and low-dose noise, all 8 where both in-plane factors are equal, the 4 flips otherwise (a transpose
    would swap a through-plane model's thin and thick axes). k-space truncation and 3D models: the input as given.
    """
    if spec.spatial_dims != 2 or spec.kind not in ("block", "lowdose"):
        return TURNS[:1]
    allowed = 8 if spec.factors[0] == spec.factors[1] else 4
    return TURNS[:max(1, min(int(requested), allowed, int(samples)))]


def turn(x: torch.Tensor, o: Turn) -> torch.Tensor:
    """``x`` (..., H, W) turned by ``o``."""
    flips = [d for d, f in ((-2, o[0]), (-1, o[1])) if f]
    x = x.flip(flips) if flips else x
    return x.transpose(-1, -2) if o[2] else x


def unturn(x: torch.Tensor, o: Turn) -> torch.Tensor:
    """The inverse of :func:`turn`: ``unturn(turn(x, o), o) == x``."""
    x = x.transpose(-1, -2) if o[2] else x
    flips = [d for d, f in ((-2, o[0]), (-1, o[1])) if f]
    return x.flip(flips) if flips else x


def shape_groups(plane: Sequence[int], turns: Sequence[Turn]) -> list[list[int]]:
    """Positions in ``turns`` grouped by the shape a plane of shape ``plane`` (..., H, W) has once turned (a
    transpose swaps H and W), so that the turned planes of one group stack into a single batch."""
    groups: dict[bool, list[int]] = {}
    for i, o in enumerate(turns):
        groups.setdefault(bool(o[2]) and plane[-1] != plane[-2], []).append(i)
    return list(groups.values())
