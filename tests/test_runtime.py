"""medsr.runtime: one definition of device, AMP, distributed rank and the shipped-model registry."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

import medsr.runtime as runtime
from medsr.config import SamplingConfig, sampling_config_from_dict
from medsr.errors import MedsrError


def test_auto_amp_is_one_definition_for_training_and_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "_cpu_has_bf16", lambda: False)
    assert runtime.resolve_amp("auto", cpu) == "none"
    assert isinstance(runtime.autocast_context(cpu, "auto"), contextlib.nullcontext)
    monkeypatch.setattr(runtime, "_cpu_has_bf16", lambda: True)
    assert runtime.resolve_amp("auto", cpu) == "bf16"
    ctx = runtime.autocast_context(cpu, "auto")  # the sampler's context follows the same rule
    with ctx:
        assert torch.is_autocast_enabled("cpu")
        y = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    assert y.dtype == torch.bfloat16


def test_explicit_amp_wins_and_unknown_amp_is_refused() -> None:
    cpu = torch.device("cpu")
    assert runtime.resolve_amp("none", cpu) == "none"
    assert runtime.resolve_amp("bf16", cpu) == "bf16"
    with pytest.raises(MedsrError, match="amp must be"):
        runtime.resolve_amp("fp8", cpu)


def test_devices() -> None:
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    assert runtime.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(MedsrError, match="device must be"):
        runtime.resolve_device("tpu")
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:1"):
            with pytest.raises(MedsrError, match="no CUDA device"):
                runtime.resolve_device(name)


def test_dist_info_reads_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert runtime.dist_info() == runtime.DistInfo(0, 0, 1) and runtime.dist_info().is_main
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    info = runtime.dist_info()
    assert (info.rank, info.local_rank, info.world, info.is_main) == (3, 1, 4, False)


def test_shipped_model_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = runtime.resolve_model(None)
    assert default == runtime.shipped_model_path("default") and default.is_file()
    assert runtime.resolve_model("default") == default
    assert runtime.resolve_model(str(tmp_path / "mine.pt")) == tmp_path / "mine.pt"  # a path stays a path
    with pytest.raises(MedsrError, match="shipped: default"):
        runtime.shipped_model("nope")
    monkeypatch.setattr(runtime, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(MedsrError, match="missing from this install"):
        runtime.resolve_model(None)


def test_sampling_config_is_typed_and_checked() -> None:
    assert (SamplingConfig().samples, SamplingConfig().steps, SamplingConfig().shares_first_step) == (8, 2, True)
    from pipelines.archive import ArchiveOptions  # the archive reads its sampling defaults from the same home

    archive = ArchiveOptions()
    assert (archive.samples, archive.steps, archive.seed) == (SamplingConfig().samples, SamplingConfig().steps, 0)
    cfg = sampling_config_from_dict({"samples": 4, "steps": 2, "overlap": 0.5})
    assert (cfg.samples, cfg.steps, cfg.overlap) == (4, 2, 0.5)
    bad = [{"samples": 1.7}, {"samples": "abc"}, {"samples": [1, 2]}, {"samples": 0}, {"steps": True},
           {"overlap": 1.0}, {"overlap": -0.5}, {"sampler": "euler"}, {"slice_axis": 5}, {"nope": 1}]
    for values in bad:
        with pytest.raises(MedsrError):
            sampling_config_from_dict(values)


def test_network_passes_count_the_shared_first_step_once_per_group() -> None:
    assert SamplingConfig(samples=8, steps=2).passes() == 9
    assert SamplingConfig(samples=8, steps=3, share_first_step=False).passes() == 24
    assert SamplingConfig(samples=8, steps=1).passes() == 8  # no sharing at one step
    assert SamplingConfig(samples=8, steps=2).passes(groups=2) == 2 + 8  # two orientations, 4 samples each
    assert SamplingConfig(samples=3, steps=3).passes(groups=2) == (1 + 2 * 2) + (1 + 1 * 2)
    assert SamplingConfig(samples=1, steps=3).passes(groups=2) == 3
    assert SamplingConfig(samples=4, sampler="ddpm").passes(num_train_timesteps=1000) == 4000  # every timestep
    with pytest.raises(ValueError, match="num_train_timesteps"):
        SamplingConfig(sampler="ddpm").passes()
