"""Training on CPU with tiny networks and real scans: learning happens, resume is exact, bad checkpoints are
refused, DDP under torchrun works, a short real run improves validation PSNR, and the CLI. Also checks that
every shipped config in ``configs/`` loads and is self-consistent."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from medsr.cli import app
from medsr.config import Config, DiffusionConfig, ModelConfig, TrainConfig, load_config
from medsr.data import PatchDataset, Volume, load_volumes
from medsr.degrade import parse_spec
from medsr.diffusion import diffusion_loss, make_train_scheduler
from medsr.errors import MedsrError
from medsr.intensity import IntensityConfig
from medsr.io.refs import resolve_ref
from medsr.model import CHECKPOINT_FORMAT, build_unet, load_checkpoint, load_model
from medsr.train import CSV_FIELDS, _append_csv, lr_factor, train, truncate_log, validate

REPO = Path(__file__).resolve().parents[1]
TRAIN_KEYS = {"degrade", "data", "diffusion", "intensity", "train"}  # a model/training config (medsr.config)


def _training_configs() -> list[Path]:
    """YAML files in configs/ that describe a model (other files there hold other tools' options)."""
    return [p for p in sorted((REPO / "configs").glob("*.yaml"))
            if TRAIN_KEYS & set(yaml.safe_load(p.read_text()) or {})]


CONFIGS = _training_configs()

TINY = ["model.channels=[8,16]", "model.attention_levels=[false,false]", "model.num_head_channels=8",
        "model.norm_num_groups=4", "train.amp=none", "train.device=cpu", "train.threads=1"]


def tiny_config(out_dir: Path, *extra: str) -> Config:
    """A tiny 2D x4 model on MNI152 slices, no validation, writing to ``out_dir``."""
    return load_config(None, [*TINY, "degrade=block:4x4", "data.train=[nilearn:mni152]", "data.val=[]",
                              "data.patch_size=[32,32]", f"train.out_dir={out_dir}", "train.batch_size=2",
                              "train.warmup_steps=2", "train.ema_decay=0.9", "train.log_every=1",
                              "train.ckpt_every=1000", "train.lr=0.001", *extra])


@pytest.fixture(scope="module")
def mni() -> list[Volume]:
    return load_volumes(["nilearn:mni152"], IntensityConfig())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - medsr.train.TrainResult
    """Six uninterrupted steps of the tiny model (the reference for resume, and a checkpoint to tamper with)."""
    return train(tiny_config(tmp_path_factory.mktemp("full") / "run", "train.steps=6"))


# --- configs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_are_consistent(path: Path) -> None:
    cfg = load_config(path)
    spec = parse_spec(cfg.degrade)
    patch = tuple(cfg.data.patch_size)
    m = cfg.model
    assert spec.spatial_dims == m.spatial_dims == len(patch), (cfg.degrade, patch, m.spatial_dims)
    assert all(p % f == 0 for p, f in zip(patch, spec.factors)), (patch, spec.factors)
    assert all(p % 2 ** (len(m.channels) - 1) == 0 for p in patch), "patch must survive the UNet's downsampling"
    assert len(m.channels) == len(m.attention_levels)
    assert all(c % m.norm_num_groups == 0 for c in m.channels)
    assert all(c % m.num_head_channels == 0 for c, a in zip(m.channels, m.attention_levels) if a)
    assert cfg.data.train and cfg.data.val and not set(cfg.data.train) & set(cfg.data.val), "split by scan"
    for ref in (*cfg.data.train, *cfg.data.val):
        assert resolve_ref(ref.partition("@")[0]).exists(), ref
    # the dataset accepts the patch size / degradation pair, and the network runs on such a patch
    PatchDataset([Volume("x", np.zeros((8, 8, 8), np.float32), np.zeros((0, 3), np.int32))], spec, patch, 1)
    with torch.no_grad():
        out = build_unet(m)(torch.zeros(1, 2, *patch), timesteps=torch.zeros(1, dtype=torch.long))
    assert out.shape == (1, 1, *patch)


def test_shipped_configs_write_to_their_own_out_dirs() -> None:
    assert {"default_model.yaml", "sr2d_x4.yaml", "lowdose_ct.yaml", "sr3d_throughplane_x4.yaml"} <= {
        p.name for p in CONFIGS}
    out_dirs = [load_config(p).train.out_dir for p in CONFIGS]
    assert len(set(out_dirs)) == len(out_dirs)


# --- (a) learning happens ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("dims", "spec", "patch", "batch", "steps", "factor"),
    [(2, "block:4x4", (16, 16), 2, 40, 100.0), (3, "block:1x1x4", (8, 8, 16), 1, 40, 10.0)],  # observed 345, 73
)
def test_tiny_model_overfits_one_real_patch(mni: list[Volume], dims: int, spec: str, patch: tuple[int, ...],
                                            batch: int, steps: int, factor: float) -> None:
    """Fixed batch, fixed noise and timesteps (the generator is re-seeded every step): the loss must collapse."""
    torch.set_num_threads(1)
    item = PatchDataset(mni, parse_spec(spec), patch, 1, foreground_fraction=1.0)[0]
    hr = item["hr"][None].expand(batch, *item["hr"].shape)
    cond = item["cond"][None].expand(batch, *item["cond"].shape)
    torch.manual_seed(0)
    net = build_unet(ModelConfig(spatial_dims=dims, channels=(8, 16), attention_levels=(False, False),
                                 num_head_channels=8, norm_num_groups=4))
    cfg = DiffusionConfig(loss="l2")
    scheduler = make_train_scheduler(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = diffusion_loss(net, scheduler, hr, cond, cfg, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.5  # epsilon target: unit-variance noise
    assert min(losses[-10:]) < losses[0] / factor, losses[::10]


# --- (b) resume equals uninterrupted --------------------------------------------------------------------

def _log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_resume_equals_uninterrupted(finished_run, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    first = train(tiny_config(out, "train.steps=3"))
    assert first.step == 3 and load_checkpoint(out / "last.pt")["step"] == 3
    second = train(tiny_config(out, "train.steps=6"))
    assert second.step == 6 and len(second.losses) == 3
    np.testing.assert_allclose(first.losses + second.losses, finished_run.losses, rtol=1e-6, atol=0)
    log, ref_log = _log(out / "log.csv"), _log(finished_run.out_dir / "log.csv")
    assert [r["step"] for r in log] == [str(s) for s in range(1, 7)]
    assert [r["loss"] for r in log] == [r["loss"] for r in ref_log]
    resumed, reference = load_checkpoint(out / "last.pt"), load_checkpoint(finished_run.checkpoint)
    for key in ("model", "ema"):
        for name, tensor in reference[key].items():
            torch.testing.assert_close(resumed[key][name], tensor, rtol=1e-6, atol=1e-7, msg=f"{key}.{name}")
    # a finished run asked again does nothing and keeps its checkpoint
    again = train(tiny_config(out, "train.steps=6"))
    assert again.step == 6 and again.losses == []


def test_lr_warms_up_holds_then_anneals_by_half_cosine_to_its_floor() -> None:
    t = TrainConfig(lr=1.0, warmup_steps=4, lr_decay_start=10, lr_decay_end=30, lr_final=0.1)
    f = [lr_factor(s, t) for s in range(40)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4:11] == [1.0] * 7
    assert f[20] == pytest.approx(0.55)  # half way: the mean of 1 and the floor
    assert all(a > b for a, b in zip(f[10:31], f[11:31])) and f[30:] == [pytest.approx(0.1)] * 10
    assert [lr_factor(s, TrainConfig(warmup_steps=4)) for s in (3, 10_000)] == [1.0, 1.0]  # off by default


def test_decay_added_to_a_running_job_changes_only_the_later_rates(finished_run, tmp_path: Path) -> None:  # noqa: ANN001
    """A run resumed with a decay (the train section may change between parts) logs the scheduled rates."""
    out = tmp_path / "run"
    train(tiny_config(out, "train.steps=3"))
    train(tiny_config(out, "train.steps=6", "train.lr_decay_start=3", "train.lr_decay_end=5", "train.lr_final=0.5"))
    rates = [float(r["lr"]) for r in _log(out / "log.csv")]
    assert rates[:3] == [float(r["lr"]) for r in _log(finished_run.out_dir / "log.csv")][:3]
    assert rates[3:] == pytest.approx([1e-3, 1e-3 * 0.75, 1e-3 * 0.5])  # steps 3, 4, 5: start, half way, floor


def test_resume_after_a_crash_past_the_last_checkpoint_keeps_one_log_row_per_step(finished_run,  # noqa: ANN001
                                                                                    tmp_path: Path) -> None:
    """Steps logged after the last checkpoint are redone on resume; the log must not list them twice."""
    out = tmp_path / "run"
    train(tiny_config(out, "train.steps=3"))
    saved = (out / "last.pt").read_bytes()
    train(tiny_config(out, "train.steps=5"))  # steps 4, 5 logged ...
    (out / "last.pt").write_bytes(saved)  # ... then a crash before their checkpoint was written
    train(tiny_config(out, "train.steps=6"))
    log, ref_log = _log(out / "log.csv"), _log(finished_run.out_dir / "log.csv")
    assert [r["step"] for r in log] == [str(s) for s in range(1, 7)]
    assert [r["loss"] for r in log] == [r["loss"] for r in ref_log]


def test_committed_checkpoint_is_compact_and_resumes_close_to_the_uninterrupted_run(finished_run,  # noqa: ANN001
                                                                                       tmp_path: Path) -> None:
    """pipelines.commit_checkpoint: Adam moments in bfloat16 (smaller file), weights and step exact, log cut at
    the checkpoint's step; training resumes from it and stays within bfloat16 rounding of the uninterrupted run."""
    from pipelines.commit_checkpoint import commit_checkpoint

    run, repo = tmp_path / "run", tmp_path / "repo"
    train(tiny_config(run, "train.steps=3"))
    saved = (run / "last.pt").read_bytes()
    train(tiny_config(run, "train.steps=4"))
    (run / "last.pt").write_bytes(saved)  # the run logged step 4 after its last checkpoint (step 3)
    out = commit_checkpoint(run, repo)
    assert out["step"] == 3 and out["bytes_after"] < 0.85 * out["bytes_before"]
    original, compact = load_checkpoint(run / "last.pt"), load_checkpoint(repo / "last.pt")
    assert (run / "last.pt").read_bytes() == saved  # the run folder is only read
    for key in ("model", "ema"):
        assert all(torch.equal(compact[key][n], t) for n, t in original[key].items())
    moments = [v for per in compact["optimizer"]["state"].values() for k, v in per.items() if k.startswith("exp_avg")]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)
    assert [r["step"] for r in _log(repo / "log.csv")] == ["1", "2", "3"]
    resumed = train(tiny_config(repo, "train.steps=6"))
    assert resumed.step == 6
    np.testing.assert_allclose(resumed.losses, finished_run.losses[3:], rtol=2e-2)
    reference = load_checkpoint(finished_run.checkpoint)
    for name, tensor in reference["model"].items():
        torch.testing.assert_close(load_checkpoint(repo / "last.pt")["model"][name], tensor, rtol=1e-2, atol=1e-4)


# --- (c) bad checkpoints are refused --------------------------------------------------------------------

def _copy_checkpoint(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True)
    (dst_dir / "last.pt").write_bytes(src.read_bytes())
    return dst_dir / "last.pt"


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_tampered_checkpoint_is_refused(finished_run, tmp_path: Path, damage: str) -> None:  # noqa: ANN001
    ckpt = _copy_checkpoint(finished_run.checkpoint, tmp_path / "run")
    data = bytearray(ckpt.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:  # overwrite the zip's central directory at the end of the file
        data[-300:] = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    ckpt.write_bytes(bytes(data))
    with pytest.raises(MedsrError, match="not a readable medsr checkpoint") as err:
        train(tiny_config(tmp_path / "run", "train.steps=8"))
    assert str(ckpt) in str(err.value)
    with pytest.raises(MedsrError, match="not a readable medsr checkpoint"):
        load_model(ckpt)


def test_checkpoint_of_another_model_is_refused(finished_run, tmp_path: Path) -> None:  # noqa: ANN001
    _copy_checkpoint(finished_run.checkpoint, tmp_path / "run")
    with pytest.raises(MedsrError, match=r"does not match the config \(model: checkpoint .*channels.*\[8, 16\]"):
        train(tiny_config(tmp_path / "run", "train.steps=8", "model.channels=[8,8]"))
    with pytest.raises(MedsrError, match="degrade: checkpoint block:4x4 vs config block:2x2"):
        train(tiny_config(tmp_path / "run", "train.steps=8", "degrade=block:2x2"))


def test_checkpoint_whose_weights_do_not_fit_its_config_is_refused(finished_run, tmp_path: Path) -> None:  # noqa: ANN001
    ckpt = torch.load(finished_run.checkpoint, weights_only=True)
    ckpt["config"]["model"]["channels"] = [8, 8]
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(MedsrError, match="weights do not match the model config"):
        load_model(tmp_path / "edited.pt")


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what a malicious checkpoint could do with pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.mkdir, (str(self.marker),))


def test_checkpoint_with_pickled_code_is_refused(finished_run, tmp_path: Path) -> None:  # noqa: ANN001
    """Loading uses ``weights_only=True``: an arbitrary pickled object is refused and never executed."""
    marker = tmp_path / "pwned"
    ckpt = torch.load(finished_run.checkpoint, weights_only=True)
    ckpt["extra"] = _Payload(marker)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(ckpt, run / "last.pt")
    for load in (lambda: load_model(run / "last.pt"), lambda: train(tiny_config(run, "train.steps=8"))):
        with pytest.raises(MedsrError, match="not a readable medsr checkpoint"):
            load()
    assert not marker.exists()


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(MedsrError, match=f"missing format tag '{CHECKPOINT_FORMAT}'"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(MedsrError, match="checkpoint not found"):
        load_model(tmp_path / "missing.pt")


# --- (d) DDP under torchrun (gloo, CPU) -----------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_two_processes_train_and_write_one_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    overrides = [*TINY, "data.train=[nilearn:mni152]", "data.val=[]", "data.patch_size=[32,32]",
                 f"train.out_dir={out}", "train.steps=3", "train.batch_size=2", "train.warmup_steps=1",
                 "train.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "medsr", "train", str(REPO / "configs" / "sr2d_x4.yaml"), *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "last.pt", "log.csv"]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 3
    assert len(ckpt["rng"]) == 2  # both ranks' generator states, so a DDP run resumes exactly
    assert not torch.equal(ckpt["rng"][0], ckpt["rng"][1])
    assert [r["step"] for r in _log(out / "log.csv")] == ["1", "2", "3"]


def test_validation_logs_the_mean_of_several_samples_beside_the_first(finished_run, mni: list[Volume],  # noqa: ANN001
                                                                       tmp_path: Path) -> None:
    """``train.val_samples`` 3: the first sample's metrics are those of a one-sample validation (same draws), and
    the mean of the three, what enhancement ships, is scored beside it: closer to the truth than one sample."""
    net = load_model(finished_run.checkpoint).net
    spec = parse_spec("block:4x4")
    batches = list(torch.utils.data.DataLoader(PatchDataset(mni, spec, (32, 32), 4, seed=7), batch_size=2))
    one = validate(net, tiny_config(tmp_path, "train.val_sampling_steps=2"), batches, torch.device("cpu"), "none")
    three = validate(net, tiny_config(tmp_path, "train.val_sampling_steps=2", "train.val_samples=3"), batches,
                     torch.device("cpu"), "none")
    assert "mean_psnr" not in one and set(three) == set(one) | {"mean_psnr", "mean_ssim"}
    for key in one:
        assert three[key] == pytest.approx(one[key], abs=1e-4)
    assert three["mean_psnr"] > three["sr_psnr"] + 0.1


def test_a_log_written_before_new_columns_is_rewritten_under_the_new_header(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    old = CSV_FIELDS[:9]
    log.write_text(",".join(old) + "\n1,0.5,0.001,0.1,0.7,,,,\n2,0.4,0.001,0.1,0.7,27.5,0.56,27.7,0.57\n")
    truncate_log(log, 2)  # what a resumed run does first: no row dropped, the header brought up to date
    _append_csv(log, {"step": 3, "loss": 0.3, "sr_psnr": 27.6, "mean_psnr": 28.1})
    rows = _log(log)
    assert log.read_text().splitlines()[0] == ",".join(CSV_FIELDS)
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert (rows[1]["sr_psnr"], rows[1]["interp_ssim"], rows[1]["mean_psnr"]) == ("27.5", "0.57", "")
    assert (rows[2]["mean_psnr"], rows[2]["sr_psnr"]) == ("28.1", "27.6")


# --- (e) a short real training improves validation PSNR -------------------------------------------------

@pytest.mark.slow
def test_short_real_training_improves_validation_psnr(tmp_path: Path) -> None:
    """MNI152 slices for training, a held-out real T1 (nibabel's anatomical.nii) for validation, x4 in-plane.

    The smallest honest setting found on a busy 2-core CPU (about 15 s): an 8/16-channel UNet, residual target
    with v-prediction (an untrained v-model already samples close to the bicubic condition, whereas an
    epsilon-model's early samples blow up), lr 1e-3, 300 steps of 8 patches of 32 x 32, EMA 0.99. "Start" is the
    validation after the first step (EMA = the barely trained network); resuming is exact (see above), so the
    two calls are one run.
    """
    out = tmp_path / "run"
    extra = ["data.val=[nibabel:anatomical.nii]", "diffusion.prediction=v_prediction", "train.batch_size=8",
             "train.warmup_steps=20", "train.ema_decay=0.99", "train.val_patches=8", "train.val_sampling_steps=10",
             "train.log_every=100"]
    start = train(tiny_config(out, *extra, "train.steps=1", "train.val_every=1")).val[-1]
    end = train(tiny_config(out, *extra, "train.steps=300", "train.val_every=300")).val[-1]
    print(f"val PSNR {start['sr_psnr']:.2f} -> {end['sr_psnr']:.2f} dB (bicubic {end['interp_psnr']:.2f}); "
          f"SSIM {start['sr_ssim']:.3f} -> {end['sr_ssim']:.3f} (bicubic {end['interp_ssim']:.3f})")
    assert end["sr_psnr"] > start["sr_psnr"] + 1.0
    assert end["sr_ssim"] > start["sr_ssim"]
    assert end["interp_psnr"] == pytest.approx(start["interp_psnr"])  # same held-out patches both times


# --- (f) the CLI ----------------------------------------------------------------------------------------

def test_cli_train_runs_with_overrides(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["train", str(REPO / "configs" / "sr2d_x4.yaml"), *TINY, "data.patch_size=[32,32]",
            f"train.out_dir={out}", "train.steps=2", "train.batch_size=2", "train.val_patches=2",
            "train.val_sampling_steps=2", "data.val=[pydicom:693_UNCR.dcm]"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "val PSNR" in result.output and f"checkpoint: {out / 'last.pt'}" in result.output
    assert load_checkpoint(out / "last.pt")["config"]["train"]["steps"] == 2
    assert (out / "config.json").is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [("train.nonsense=1", "unknown keys ['nonsense']"),
     ("modle.channels=[8]", "unknown keys ['modle']"),
     ("train.steps=many", "expected int"),
     ("degrade=block:4", "degradation spec"),
     ("train.lr_decay_end=-5", "train.lr_decay_end"),
     ("train.lr_final=0", "train.lr_final"),
     ("no_equals_sign", "expected section.key=value")],
)
def test_cli_bad_override_gives_clear_error(tmp_path: Path, override: str, message: str) -> None:
    result = CliRunner().invoke(app, ["train", str(REPO / "configs" / "sr2d_x4.yaml"), *TINY,
                                      f"train.out_dir={tmp_path / 'x'}", "train.steps=1", override])
    assert result.exit_code == 2, result.output
    assert "medsr: error:" in result.output and message in result.output
    assert "Traceback" not in result.output


def test_cli_missing_config(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "cannot read config" in result.output
