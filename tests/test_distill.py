"""Distillation (issue 13): the training goal becomes a teacher network's output, a student starts from trained
weights, and part of each batch is spent on the timesteps the sampler visits. Tiny networks, real MNI152 patches."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from enhance_fixtures import ct_small
from test_train import tiny_config

from medsr.config import DiffusionConfig, ModelConfig, SamplingConfig
from medsr.data import PatchDataset, load_volumes
from medsr.degrade import parse_spec, upsample
from medsr.diffusion import diffusion_loss, make_train_scheduler
from medsr.errors import MedsrError
from medsr.intensity import IntensityConfig, fit_normaliser
from medsr.model import build_unet, denoise, load_checkpoint, load_model, write_untrained_checkpoint
from medsr.sampling import make_generators, sample
from medsr.train import train

TINY_NET = ModelConfig(spatial_dims=2, channels=(8, 16), attention_levels=(False, False), num_head_channels=8,
                       norm_num_groups=4)
CFG = DiffusionConfig(prediction="v_prediction", target="residual", residual_scale=8.0, loss="l1")


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    vols = load_volumes(["nilearn:mni152"], IntensityConfig())
    ds = PatchDataset(vols, parse_spec("block:4x4"), (32, 32), 8, foreground_fraction=1.0)
    items = [ds[i] for i in range(8)]
    return torch.stack([it["hr"] for it in items]), torch.stack([it["cond"] for it in items])


class _Recorder(torch.nn.Module):
    """A network that remembers the timesteps it was asked about."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.seen = net, []  # type: ignore[var-annotated]

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.seen.extend(int(t) for t in timesteps)
        return self.net(x, timesteps=timesteps)


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_unet(TINY_NET)
    with torch.no_grad():
        for p in net.out.parameters():  # MONAI zero-initialises the output layer
            torch.nn.init.normal_(p, std=0.05)
    return net


def test_the_goal_is_the_teachers_output(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    hr, cond = batch
    sch = make_train_scheduler(CFG)
    student = _net(0)
    same = diffusion_loss(student, sch, hr, cond, CFG, torch.Generator().manual_seed(1), teacher=copy.deepcopy(student))
    other = diffusion_loss(student, sch, hr, cond, CFG, torch.Generator().manual_seed(1), teacher=_net(1))
    plain = diffusion_loss(student, sch, hr, cond, CFG, torch.Generator().manual_seed(1))
    assert same.item() == 0.0  # a student identical to its teacher has nothing to learn
    assert other.item() > 0.0
    assert plain.item() > 10 * other.item()  # the analytic v target is far from what two small nets output


def test_turned_teacher_goals_are_the_teachers_output_on_a_turned_item_turned_back(
        batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """train.teacher_turns: each item's goal is one of the 8 candidates unturn(teacher(turn(item))), more than one
    turn is drawn over a batch, and with the identity as the only turn the goal is the plain teacher's."""
    from medsr.diffusion import _turned_teacher
    from medsr.turns import TURNS, turn, unturn

    hr, cond = batch
    teacher = _net(1)
    x_t = torch.randn(hr.shape, generator=torch.Generator().manual_seed(3))
    t = torch.full((hr.shape[0],), 499)
    with torch.no_grad():
        goal = _turned_teacher(teacher, x_t, cond, t, TURNS, torch.Generator().manual_seed(4))
        candidates = torch.stack([unturn(denoise(teacher, turn(x_t, o), turn(cond, o), t), o) for o in TURNS])
        plain = denoise(teacher, x_t, cond, t)
        same = _turned_teacher(teacher, x_t, cond, t, TURNS[:1], torch.Generator().manual_seed(4))
    err = (candidates - goal[None]).abs().flatten(2).amax(-1)  # (turn, item)
    assert bool((err.amin(0) < 1e-5).all())  # every goal is one of its item's candidates
    assert len(set(err.argmin(0).tolist())) > 1  # and the turns drawn differ between items
    assert float((candidates[1:] - candidates[:1]).abs().mean()) > 1e-3  # the teacher is not turn-equivariant
    torch.testing.assert_close(same, plain.float())
    sch = make_train_scheduler(CFG)
    student = _net(0)
    with_turns = diffusion_loss(student, sch, hr, cond, CFG, torch.Generator().manual_seed(1), teacher=teacher,
                                teacher_turns=TURNS)
    assert with_turns.item() > 0.0 and torch.isfinite(with_turns)


def test_teacher_turns_need_a_teacher_and_train_with_one(tmp_path: Path) -> None:
    with pytest.raises(MedsrError, match="train.teacher_turns"):
        tiny_config(tmp_path, "train.teacher_turns=true")
    result = train(tiny_config(tmp_path / "run", f"train.teacher={_teacher(tmp_path)}", "train.teacher_turns=true",
                               "train.steps=2", "train.batch_size=4"))
    assert result.step == 2 and load_checkpoint(result.checkpoint)["config"]["train"]["teacher_turns"] is True


def test_focus_draws_the_sampler_timesteps_and_off_keeps_plain_draws(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    hr, cond = batch
    sch = make_train_scheduler(CFG)
    rec = _Recorder(_net(0))
    for seed in range(8):
        diffusion_loss(rec, sch, hr, cond, CFG, torch.Generator().manual_seed(seed), focus_timesteps=[999, 499],
                       focus_share=1.0)
    assert set(rec.seen) == {999, 499}
    rec.seen.clear()
    for seed in range(8):
        diffusion_loss(rec, sch, hr, cond, CFG, torch.Generator().manual_seed(seed), focus_timesteps=[999, 499],
                       focus_share=0.5)
    focused = sum(t in (999, 499) for t in rec.seen) / len(rec.seen)
    assert 0.3 < focused < 0.7 and len(set(rec.seen)) > 10, (focused, sorted(set(rec.seen)))
    off = diffusion_loss(rec, sch, hr, cond, CFG, torch.Generator().manual_seed(3), focus_timesteps=[999],
                         focus_share=0.0)
    plain = diffusion_loss(rec, sch, hr, cond, CFG, torch.Generator().manual_seed(3))
    assert off.item() == plain.item()


def _teacher(tmp_path: Path, *extra: str) -> Path:
    cfg = tiny_config(tmp_path / "unused", "model.channels=[16,16]", *extra)
    return write_untrained_checkpoint(tmp_path / "teacher.pt", cfg, seed=7, out_std=0.05)


def test_a_student_learns_its_teacher_from_the_weights_it_starts_from(
        tmp_path: Path, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    init = write_untrained_checkpoint(tmp_path / "init.pt", tiny_config(tmp_path / "unused"), seed=3, out_std=0.05)
    teacher = _teacher(tmp_path)
    common = [f"train.init_from={init}", f"train.teacher={teacher}", "train.focus_timesteps=[999,499]",
              "train.focus_share=0.5", "train.lr=0.003", "train.batch_size=4"]
    # one step at a negligible rate: the network is still the one it was told to start from
    first = train(tiny_config(tmp_path / "one", *common, "train.steps=1", "train.lr=1e-12"))
    start, started = load_checkpoint(init)["ema"], load_checkpoint(first.checkpoint)["model"]
    assert all(torch.allclose(start[k].float(), started[k].float(), atol=1e-6) for k in start)
    # a longer run: the loss, measured against the teacher, falls
    run = train(tiny_config(tmp_path / "run", *common, "train.steps=80"))
    early, late = sum(run.losses[:10]) / 10, sum(run.losses[-10:]) / 10
    print(f"distillation loss {early:.4f} -> {late:.4f}")
    assert late < 0.7 * early, run.losses[::10]
    # and on patches it never saw, the student it wrote is closer to the teacher than where it started
    hr, cond = batch
    sch, teach = make_train_scheduler(CFG), load_model(teacher).net
    with torch.no_grad():
        before, after = (diffusion_loss(load_model(p).net, sch, hr, cond, CFG, torch.Generator().manual_seed(5),
                                        teacher=teach).item() for p in (init, run.checkpoint))
    print(f"held-aside gap to the teacher {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before


def test_a_teacher_whose_outputs_mean_something_else_is_refused(tmp_path: Path) -> None:
    teacher = _teacher(tmp_path, "diffusion.residual_scale=3.0")
    with pytest.raises(MedsrError, match=r"teacher\.pt.*diffusion"):
        train(tiny_config(tmp_path / "run", f"train.teacher={teacher}", "train.steps=1"))


def test_init_from_another_architecture_is_refused(tmp_path: Path) -> None:
    other = _teacher(tmp_path)
    with pytest.raises(MedsrError, match=r"teacher\.pt.*model"):
        train(tiny_config(tmp_path / "run", f"train.init_from={other}", "train.steps=1"))


@pytest.mark.parametrize(("override", "key"), [(["train.focus_share=0.5"], "train.focus_share"),
                                               (["train.focus_timesteps=[1000]"], "train.focus_timesteps")])
def test_focus_settings_are_checked(tmp_path: Path, override: list[str], key: str) -> None:
    with pytest.raises(MedsrError, match=key):
        tiny_config(tmp_path, *override)


def test_v01s_own_checkpoint_still_loads_and_runs_at_ten_steps() -> None:
    """Issue 13: "checkpoints written by v0.1 still load and run with --steps 10". v0.1's real training checkpoint
    (kept as pipelines/default_model/v01_step6000.pt, where the distillation starts) and the shipped distilled
    weights (default steps) on a held-out CT crop (pydicom's CT_small, central 64² of the truth, block average x4)
    both beat bicubic clearly. Measured: bicubic 29.55, v0.1 at 10 steps 33.43, shipped at 2 steps 33.37 dB: on
    this one small crop they tie (on the 7 held-out 256² crops of the model card the distilled weights gain
    +0.54 dB on average), so the test does not rank them."""
    repo = Path(__file__).resolve().parents[1]
    scan = ct_small()
    norm = fit_normaliser(scan.array, scan.modality)
    truth = torch.from_numpy(norm.normalise(scan.array[0, 32:96, 32:96, 0]))[None, None]
    low = torch.nn.functional.avg_pool2d(truth, 4)
    cond = upsample(low, (4, 4))
    psnr = {}
    for name, path, steps in (("v01", repo / "pipelines/default_model/v01_step6000.pt", 10),
                              ("shipped", repo / "medsr/weights/default_x4.pt", SamplingConfig().steps)):
        model = load_model(path)
        n = 8
        out = sample(model.net, model.config.diffusion, cond.repeat(n, 1, 1, 1), make_generators(0, n, "cpu"),
                     steps=steps, lowres=low.repeat(n, 1, 1, 1), spec=model.degradation, amp="none")
        mean = out.mean(0, keepdim=True)
        assert torch.isfinite(mean).all()
        psnr[name] = float(10 * torch.log10(4.0 / ((mean - truth) ** 2).mean()))
    bicubic = float(10 * torch.log10(4.0 / ((cond - truth) ** 2).mean()))
    print(f"PSNR bicubic {bicubic:.2f}, v0.1 at 10 steps {psnr['v01']:.2f}, shipped {psnr['shipped']:.2f} dB")
    assert psnr["v01"] > bicubic + 2.0 and psnr["shipped"] > bicubic + 2.0
