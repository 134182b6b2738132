"""The geometric self-ensemble (``SamplingConfig.self_ensemble``): samples drawn on flips/transposes of the input
and turned back. Checked on a real CT slice with a tiny random-weight model, whose output is far from
flip-equivariant, so a turn that is not undone (or undone wrongly) shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from enhance_fixtures import count_passes, ct_small, tiny_model

from medsr.config import SamplingConfig
from medsr.degrade import parse_spec
from medsr.enhance import enhance_scan
from medsr.errors import MedsrError
from medsr.model import LoadedModel
from medsr.turns import TURNS, ensemble_turns, shape_groups, turn, unturn


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return tiny_model(tmp_path_factory.mktemp("ensemble") / "tiny.pt")


def test_the_turns_allowed_are_those_the_degradation_is_symmetric_under() -> None:
    assert ensemble_turns(parse_spec("block:4x4"), 8, 8) == TURNS
    assert len(set(TURNS)) == 8 and TURNS[0] == (False, False, False)
    assert ensemble_turns(parse_spec("block:4x4"), 8, 3) == TURNS[:3]  # never more turns than samples
    assert ensemble_turns(parse_spec("block:4x4"), 2, 8) == TURNS[:2]
    through = ensemble_turns(parse_spec("block:1x4"), 8, 8)  # a transpose would swap the thin and thick axes
    assert len(through) == 4 and not any(t[2] for t in through)
    assert ensemble_turns(parse_spec("lowdose:1x1,dose=0.25"), 8, 8) == TURNS
    assert ensemble_turns(parse_spec("kspace:2x2"), 8, 8) == TURNS[:1]
    assert ensemble_turns(parse_spec("block:2x2x2"), 8, 8) == TURNS[:1]  # 3D models: the input as given
    assert shape_groups((1, 24, 32), TURNS) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # transposed planes batch apart
    assert shape_groups((1, 32, 32), TURNS) == [list(range(8))]  # square: one batch


@pytest.mark.parametrize("spec", ["block:4x4", "block:2x2,sigma=1", "block:1x4", "block:1x4,profile=gaussian",
                                  "lowdose:2x2,dose=0.5"])
def test_every_allowed_turn_commutes_with_the_operator_and_is_undone(spec: str) -> None:
    """A(turn(x)) == turn(A(x)): a sample for the turned input, turned back, is a sample for the input. On a real,
    non-square CT block (a symmetric x would hide a wrong axis)."""
    scan = ct_small()
    x = torch.from_numpy(scan.array[0, 8:72, 16:112, 0].astype(np.float32) / 1000.0)[None, None]  # 64 x 96
    s = parse_spec(spec)
    for t in ensemble_turns(s, 8, 8):
        np.testing.assert_allclose(s.forward(turn(x, t)), turn(s.forward(x), t), atol=1e-5)
    for t in TURNS:
        assert torch.equal(unturn(turn(x, t), t), x)
        assert t == TURNS[0] or not torch.equal(turn(x, t)[..., :64, :64], x[..., :64, :64])


def test_each_sample_is_the_one_drawn_on_its_turned_input_turned_back(model: LoadedModel) -> None:
    """Sample i of a self-ensemble run is exactly what a plain run on the input turned by TURNS[i] draws with the
    same seed, turned back; on a non-square slice, where transposed turns change the plane's shape."""
    scan = ct_small()
    scan = scan.with_array(scan.array[:, 24:48, 40:72])  # 24 x 32 real CT
    opt = SamplingConfig(samples=8, steps=2, device="cpu", amp="none", keep_samples=True, share_first_step=False)
    ens = enhance_scan(scan, model, SamplingConfig(**{**opt.__dict__, "self_ensemble": 8}))
    assert ens.info["self_ensemble"] == 8 and ens.samples is not None
    for i in (0, 3, 5):
        t = TURNS[i]
        turned = scan.with_array(turn(torch.from_numpy(scan.array[..., 0].copy()), t).numpy()[..., None])
        plain = enhance_scan(turned, model, SamplingConfig(**{**opt.__dict__, "self_ensemble": 1}))
        assert plain.samples is not None
        back = unturn(torch.from_numpy(plain.samples[i][..., 0].copy()), t).numpy()
        np.testing.assert_allclose(ens.samples[i][..., 0], back, atol=1e-2)  # HU
    off = enhance_scan(scan, model, SamplingConfig(**{**opt.__dict__, "self_ensemble": 1}))
    assert off.samples is not None and off.info["self_ensemble"] == 1
    np.testing.assert_allclose(off.samples[0], ens.samples[0], atol=1e-2)  # turn 0 is the input as given
    assert float(np.abs(off.samples[5] - ens.samples[5]).mean()) > 1.0  # the turned samples differ (HU)


def test_a_shared_first_step_is_made_once_and_the_ensemble_keeps_consistency_and_reproduces(
        model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    scan = ct_small()
    scan = scan.with_array(scan.array[:, 24:48, 40:72])
    passes = count_passes(monkeypatch)
    opt = SamplingConfig(samples=8, steps=2, device="cpu", amp="none", keep_samples=True)
    a = enhance_scan(scan, model, opt)
    assert opt.self_ensemble == 8 and a.info["self_ensemble"] == 8
    assert sum(passes) == 1 + 8  # the same passes as without the ensemble
    assert a.consistency["max_abs_error"] < 0.5  # HU: block-averaging the mean gives back the input
    b = enhance_scan(scan, model, SamplingConfig(**{**opt.__dict__, "batch_size": 3}))
    assert a.samples is not None and b.samples is not None
    np.testing.assert_allclose(a.samples, b.samples, atol=1e-2)  # same seed, same result, whatever the batching


def test_a_bad_self_ensemble_is_refused() -> None:
    for bad in (3, 0, 16, True):
        with pytest.raises(MedsrError, match="self_ensemble"):
            SamplingConfig(self_ensemble=bad)


def test_a_calibration_fitted_without_the_ensemble_says_so(tmp_path: Path) -> None:
    from medsr.uncertainty import Calibration

    old = Calibration(0.3, "std_noise", details={"samples": 8.0, "steps": 2.0, "shared_first_step": 1.0})
    assert old.mismatch(8, 2, shared_first_step=True) == ""
    assert "self-ensemble of 8 turns" in old.mismatch(8, 2, shared_first_step=True, turns=8)
    new = Calibration(0.3, "std_noise", details={"samples": 8.0, "steps": 2.0, "shared_first_step": 1.0,
                                                 "self_ensemble": 8.0})
    assert new.mismatch(8, 2, shared_first_step=True, turns=8) == ""
    assert "calibrated at 8 samples x 2 DDIM steps, first step shared, self-ensemble of 8 turns" in new.mismatch(
        8, 2, shared_first_step=True, turns=1)
