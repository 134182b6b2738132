"""The shipped through-plane model: registered by name, chosen by --model auto for thick slices, listed by
`medsr models`, exported (EMA, float16) by the generic export script."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from enhance_fixtures import tiny_config, write_tiny_checkpoint
from typer.testing import CliRunner

import medsr.cli
from medsr.model import load_model
from medsr.model_choice import choose_model, is_through_plane
from medsr.runtime import SHIPPED_MODELS, resolve_model, shipped_model


def test_throughplane_x4_is_registered_and_installed() -> None:
    entry = shipped_model("throughplane_x4")
    assert (entry.task, entry.factors, entry.auto) == ("throughplane", (1, 4), True)
    assert set(entry.modalities) == {"CT", "MR"} and entry.path.is_file()
    assert resolve_model("throughplane_x4") == entry.path
    model = load_model(entry.path)
    assert is_through_plane(model.degradation) and max(model.degradation.factors) == 4
    stored = torch.load(entry.path, map_location="cpu", weights_only=True)
    assert "optimizer" not in stored and "model" not in stored  # EMA weights only
    assert {v.dtype for v in stored["ema"].values() if v.is_floating_point()} == {torch.float16}
    assert "throughplane_x4.yaml" in stored["provenance"]["command"]


@pytest.mark.parametrize(("spacing", "shape", "axis"), [((0.9, 0.9, 4.0), (64, 64, 10), 2),
                                                        ((4.0, 1.0, 1.0), (10, 64, 64), 0),
                                                        ((0.5, 2.0, 0.5), (64, 16, 64), 1)])
def test_auto_picks_it_for_thick_slices_on_any_axis(spacing: tuple[float, ...], shape: tuple[int, ...],
                                                    axis: int) -> None:
    choice = choose_model(spacing, shape)
    assert (choice.name, choice.task, choice.axis, choice.factor) == ("throughplane_x4", "throughplane", axis, 4)
    assert choose_model((1.0, 1.0, 1.0), (64, 64, 64)).name == "default"  # isotropic: still the in-plane model
    assert choose_model((0.5, 0.5, 5.0), (64, 64, 1)).name == "default"  # a 2D slice


def test_models_lists_it_with_its_card() -> None:
    res = CliRunner().invoke(medsr.cli.app, ["models", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    row = rows["throughplane_x4"]
    assert (row["task"], row["factors"], row["modalities"], row["auto"]) == ("throughplane", "1x4", "CT,MR", True)
    assert row["card"] == "THROUGHPLANE_X4_CARD.md"
    assert (SHIPPED_MODELS["throughplane_x4"].path.parent / row["card"]).is_file()


def test_export_script_writes_a_named_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import export_model

    ckpt = write_tiny_checkpoint(tmp_path / "last.pt", tiny_config("block:1x4"))
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"format": 2, "per_modality": {"MR": {"scale": 2.5, "basis": "std", "n": 2}}}))
    out = tmp_path / "tp.pt"
    monkeypatch.setattr(sys, "argv", ["export", str(ckpt), "--name", "throughplane_x4", "--out", str(out),
                                      "--calibration-json", str(cal)])
    export_model.main()
    model = load_model(out)
    assert is_through_plane(model.degradation)
    assert model.calibration.for_modality("MR")[0].scale == 2.5
    stored = torch.load(out, map_location="cpu", weights_only=True)
    assert stored["provenance"]["command"] == "medsr train configs/throughplane_x4.yaml"
    assert stored["provenance"]["source"] == str(ckpt)


@pytest.mark.slow
def test_card_script_scores_thick_held_out_scans_against_cubic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The card pipeline on a tiny model: one row per held-out scan and thick axis (a non-last one included),
    gains = mean - cubic, adaptation only where the scan has in-plane images, timing extrapolated by voxels."""
    from pipelines import throughplane_card

    ckpt = write_tiny_checkpoint(tmp_path / "tp.pt", tiny_config("block:1x4"))
    card, out = tmp_path / "CARD.md", tmp_path / "card.json"
    monkeypatch.setattr(sys, "argv", ["card", str(ckpt), "--samples", "2", "--steps", "1", "--adapt", "1",
                                      "--only", "anatomical", "--only", "CT_small", "--timing-size", "16",
                                      "--timing-slices", "2", "--card", str(card), "--json", str(out)])
    throughplane_card.main()
    result = json.loads(out.read_text())
    cases = result["cases"]
    assert [(c["scan"], c["thick_axis"]) for c in cases] == [("anatomical", 2), ("anatomical", 0), ("CT_small", 1)]
    for c in cases:
        assert c["gain_db"] == pytest.approx(c["mean_psnr"] - c["cubic_psnr"])
        assert c["consistency_mae"] < 1e-4  # projected: averaging the thin slices gives the input back
        assert 0.0 <= c["coverage_90_body"] <= 1.0 and c["halfwidth_body_pct"] > 0  # the pooled interval, measured
    assert cases[0]["interpolation"] == "cubic along axis 2" and cases[1]["interpolation"] == "cubic along axis 0"
    assert cases[0]["adapt"]["steps"] == 1 and "adapt" not in cases[2]
    assert result["timing"]["output"] == [16, 16, 8]
    assert result["timing"]["extrapolated"]["voxel_ratio"] == pytest.approx(256 * 256 * 160 / (16 * 16 * 8))
    text = card.read_text()
    verdict = "yes" if min(c["gain_db"] for c in cases) >= 2 else "NO"
    assert f"Target met without adaptation: {verdict}" in text
    assert text.count("| anatomical |") == 2 and "| CT_small |" in text
    assert f"| {cases[2]['coverage_90_body']:.3f} |" in text
    assert "indicative only" in text  # 2 samples x 1 step: not the calibration settings
