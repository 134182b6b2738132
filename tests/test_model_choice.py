"""--model auto: the geometry rules of medsr.model_choice, on each kind of scan geometry."""

from __future__ import annotations

import pytest

from medsr.errors import MedsrError
from medsr.model_choice import choose_model
from medsr.runtime import SHIPPED_MODELS, ShippedModel

INPLANE = ShippedModel("inplane_x4", "a.pt", "inplane", (4, 4), "in-plane")
TP4 = ShippedModel("thick_x4", "b.pt", "throughplane", (1, 4), "through-plane x4")
TP2 = ShippedModel("thick_x2", "c.pt", "throughplane", (1, 2), "through-plane x2")
LOWDOSE = ShippedModel("lowdose_ct", "d.pt", "denoise", (1, 1), "denoise", ("CT",), auto=False)
REG = {m.name: m for m in (INPLANE, TP4, TP2, LOWDOSE)}


@pytest.mark.parametrize(("spacing", "shape", "acq", "name", "axis", "factor"), [
    ((1.0, 1.0, 4.0), (64, 64, 20), None, "thick_x4", 2, 4),  # axial thick slices, 4 mm -> 1 mm
    ((0.5, 0.5, 2.0), (64, 64, 20), 2, "thick_x4", 2, 4),  # DICOM series with thick slices
    ((4.0, 1.0, 1.0), (20, 64, 64), None, "thick_x4", 0, 4),  # thick axis is the first array axis
    ((1.0, 3.0, 1.0), (64, 20, 64), None, "thick_x2", 1, 2),  # ratio 3: x2 and x4 are equally near; smaller wins
    ((1.0, 1.0, 2.2), (64, 64, 20), None, "thick_x2", 2, 2),  # ratio 2.2 -> nearest shipped factor 2
    ((0.8, 0.8, 6.0), (64, 64, 20), None, "thick_x4", 2, 4),  # ratio 7.5 -> x4 is the nearest shipped
    ((0.5, 0.5, 5.0), (512, 512, 1), None, "inplane_x4", 2, 4),  # a 2D slice: in its plane
    ((8.0, 8.0, 3.0), (32, 32, 12), 2, "inplane_x4", 2, 4),  # coarse in-plane DICOM series: acquisition plane
    ((3.0, 3.0, 1.0), (32, 32, 64), None, "inplane_x4", 2, 4),  # two coarse axes: the plane they span
    ((3.0, 1.0, 3.0), (32, 64, 32), None, "inplane_x4", 1, 4),
    ((1.0, 1.0, 1.0), (64, 64, 64), None, "inplane_x4", 2, 4),  # isotropic: axial
    ((1.0, 1.0, 1.4), (64, 64, 64), None, "inplane_x4", 2, 4),  # below the 1.5x threshold
])
def test_auto_choice(spacing: tuple[float, ...], shape: tuple[int, ...], acq: int | None, name: str, axis: int,
                     factor: int) -> None:
    choice = choose_model(spacing, shape, acq, REG)
    assert (choice.name, choice.axis, choice.factor) == (name, axis, factor), choice.reason
    assert choice.reason


def test_inexact_factor_is_explained() -> None:
    choice = choose_model((0.8, 0.8, 6.0), (8, 8, 8), None, REG)
    assert "nearest of the shipped factors" in choice.reason and "7.50" in choice.reason


def test_auto_never_picks_a_denoiser() -> None:
    for spacing in [(1, 1, 1), (1, 1, 4), (0.5, 0.5, 5.0)]:
        assert choose_model(spacing, (8, 8, 8), None, REG).name != "lowdose_ct"
    with pytest.raises(MedsrError, match="no in-plane model"):
        choose_model((1, 1, 1), (8, 8, 8), None, {"lowdose_ct": LOWDOSE})


def test_without_a_through_plane_model_the_fallback_is_said() -> None:
    choice = choose_model((1.0, 1.0, 4.0), (8, 8, 8), None, {"inplane_x4": INPLANE})
    assert choice.task == "inplane" and "no through-plane model is shipped" in choice.reason


def test_the_shipped_registry_has_an_in_plane_default() -> None:
    assert choose_model((1, 1, 1), (8, 8, 8)).name in SHIPPED_MODELS


@pytest.mark.parametrize(("spec", "through"), [("block:1x4", True), ("block:4x1", True), ("block:4x4", False),
                                               ("block:1x1x4", False), ("lowdose:1x1,dose=0.25", False),
                                               ("kspace:1x4", False), ("block:1x1", False)])
def test_a_checkpoints_degradation_says_whether_it_is_through_plane(spec: str, through: bool) -> None:
    from medsr.degrade import parse_spec
    from medsr.model_choice import is_through_plane

    assert is_through_plane(parse_spec(spec)) is through
