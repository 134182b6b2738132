"""The shipped in-plane v2 model (by name only, never auto) and its card: quality side by side with the default,
the teacher target counted per scan, the calibration and the cost, from the calibration study's own structures."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import medsr.cli
from medsr.model import load_model
from medsr.model_choice import choose_model
from medsr.runtime import resolve_model, shipped_model
from pipelines.inplane_v2_card import METHOD, card_text


def _row(scan: str, bicubic: float, mean: float, ssim: float = 0.9) -> dict[str, Any]:
    return {"scan": scan, "slices": 1, "psnr_bicubic": bicubic, "psnr_sample": mean - 0.2, "psnr_mean": mean,
            "ssim_bicubic": 0.8, "ssim_sample": ssim, "ssim_mean": ssim}


def _study() -> dict[str, Any]:
    cal = {"scale": 0.9, "basis": "std_noise", "n": 2, "scans": ["MR2_UNCR", "inia19"], "guarantee": "none"}
    loo = {"CT_small": {"coverage": 0.79, "halfwidth_pct": 1.8}, "MR_small": {"coverage": 0.91, "halfwidth_pct": 12.0}}
    return {"methods": {METHOD: {"calibration": {"MR": cal}, "loo": loo, "loo_pooled_coverage": 0.85}},
            "spread": [{"name": "CT_small", "spearman_patch": 0.52}]}


def test_card_compares_with_the_default_and_counts_the_teacher_target() -> None:
    v2 = [_row("CT_small", 32.0, 35.5), _row("MR_small", 22.0, 23.0), _row("not_in_default", 20.0, 30.0)]
    default = [_row("CT_small", 32.0, 35.0), _row("MR_small", 22.0, 23.5)]
    text = card_text(v2, default, _study(), {"default": 4.0, "inplane_v2": 7.0}, 9500)
    assert "| CT_small | 1 | 32.00 | 35.00 | **35.50** | +0.50 | +3.50 |" in text
    assert "| MR_small | 1 | 22.00 | 23.50 | **23.00** | -0.50 | +1.00 |" in text
    assert "not_in_default" not in text  # only scans both models were scored on
    assert "Better than the default on 1 of 2 scans (mean difference +0.00 dB)" in text
    assert "**not met** (1 of 2: CT_small)" in text
    assert "MR: λ = 0.900 on 2 held-out scans (MR2_UNCR, inia19); guarantee: none" in text
    assert "| CT_small | 0.790 | 1.80 | 0.52 |" in text and "| MR_small | 0.910 | 12.00 | nan |" in text
    assert "(**1.75x**)" in text and "step 9500" in text


def test_card_says_met_only_when_every_scan_reaches_it() -> None:
    v2 = [_row("A", 30.0, 32.5), _row("B", 20.0, 22.0)]
    text = card_text(v2, [_row("A", 30.0, 31.0), _row("B", 20.0, 21.0)], _study(), None, None)
    assert "**met** (2 of 2: A, B)" in text and "## Cost" not in text
    with pytest.raises(ValueError, match="no held-out scan"):
        card_text(v2, [_row("C", 1.0, 2.0)], _study(), None, None)


def test_inplane_v2_is_shipped_by_name_only() -> None:
    entry = shipped_model("inplane_v2")
    assert (entry.task, entry.factors, entry.auto) == ("inplane", (4, 4), False) and entry.path.is_file()
    assert resolve_model("inplane_v2") == entry.path
    model = load_model(entry.path)
    assert model.config.model.channels == (48, 96, 96) and model.calibration.for_modality("CT")[0].scale > 0
    stored = torch.load(entry.path, map_location="cpu", weights_only=True)
    assert "optimizer" not in stored and "model" not in stored  # EMA weights only
    assert {v.dtype for v in stored["ema"].values() if v.is_floating_point()} == {torch.float16}
    assert "inplane_v2.yaml" in stored["provenance"]["command"]
    geometries = (((1.0, 1.0, 1.0), (64, 64, 64)), ((0.5, 0.5, 5.0), (64, 64, 1)), ((1.0, 1.0, 3.0), (64, 64, 20)))
    for spacing, shape in geometries:
        assert choose_model(spacing, shape).name != "inplane_v2"  # auto keeps the cheaper default
    res = CliRunner().invoke(medsr.cli.app, ["models", "--json"])
    assert res.exit_code == 0, res.output
    row = {r["name"]: r for r in json.loads(res.output)}["inplane_v2"]
    assert (row["task"], row["auto"], row["card"]) == ("inplane", False, "INPLANE_V2_CARD.md")
    assert (entry.path.parent / row["card"]).is_file()
