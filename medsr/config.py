"""Typed configuration: dataclasses that YAML files in ``configs/`` map onto field for field.

``load_config(path, ["train.steps=100", ...])`` reads a YAML file, applies ``section.field=value`` overrides
(values parsed as YAML), and refuses unknown keys with a clear message. ``to_dict`` gives the resolved config
that is written next to every checkpoint and output.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medsr.errors import MedsrError
from medsr.intensity import IntensityConfig

__all__ = [
    "DataConfig",
    "ModelConfig",
    "DiffusionConfig",
    "TrainConfig",
    "Config",
    "SamplingConfig",
    "sampling_config_from_dict",
    "load_config",
    "config_from_dict",
    "build_dataclass",
    "validate_config",
    "to_dict",
]


@dataclass
class AugmentConfig:
    """Training-time augmentation of each high-resolution patch, applied BEFORE it is degraded (so the
    low-resolution input is always the degradation of the target). Everything is off by default: configs and
    checkpoints written without this section mean exactly what they meant.

    Attributes:
        flip_prob: probability of flipping each spatial axis of the patch.
        rot90_prob: probability of a 90/180/270 degree rotation in the plane of two patch axes of equal size
            (and equal degradation factors).
        curve_prob: probability of a random monotone intensity curve (piecewise linear through
            ``curve_points`` control points, fixed at the patch minimum and maximum).
        curve_points: range of the number of control points of that curve.
        gamma_prob: probability of a random gamma on the patch range (``gamma_range``).
        gamma_range: the gamma is drawn uniformly in this range.
        noise_prob: probability of adding Gaussian noise to the patch (so target and input both carry it).
        noise_std: noise std in normalised units is drawn uniformly in ``[0, noise_std]``.
        lowdose_noise_scale: ``(min, max)``: low-dose specs only, the cached low-dose noise of each patch is
            multiplied by a factor drawn log-uniformly in this range, so the model sees the noise levels of
            other doses, pixel sizes and patient sizes than its training scans' (a quarter-dose slice with
            0.29 mm pixels is twice as noisy as one with 0.96 mm pixels). ``(1, 1)``: off.
        lowdose_target_noise: ``(min, max)``: low-dose specs only, the *target* (the full-dose patch) also gets
            another cached noise realisation of the same slice, times a factor drawn uniformly in this range, and
            the input carries it too. Real full-dose CT has quantum noise of the same texture (CT_small: 17 HU)
            while the training scans are nearly noise-free (2-7 HU), so without it the model learns to remove
            every grain, the truth's own included. ``(0, 0)``: off.
        zoom_out_prob: probability of cutting a window ``z`` times the patch size and block-averaging it down to
            the patch (``z`` drawn uniformly among the integers 2..``zoom_out_max``): the same anatomy at ``z``
            times coarser voxels, as a scan acquired with larger voxels shows it (each voxel the mean of the
            finer ones it covers). Widens the voxel sizes the model has seen beyond its training scans' own
            (a 2 mm template is twice as coarse as any 1 mm training volume). Not with the low-dose noise cache
            (its noise is made at the scans' own voxel size).
        zoom_out_max: largest integer zoom-out factor (>= 2).
    """

    flip_prob: float = 0.0
    rot90_prob: float = 0.0
    curve_prob: float = 0.0
    curve_points: tuple[int, int] = (5, 10)
    gamma_prob: float = 0.0
    gamma_range: tuple[float, float] = (0.7, 1.5)
    noise_prob: float = 0.0
    noise_std: float = 0.02
    lowdose_noise_scale: tuple[float, float] = (1.0, 1.0)
    lowdose_target_noise: tuple[float, float] = (0.0, 0.0)
    zoom_out_prob: float = 0.0
    zoom_out_max: int = 2


@dataclass
class DataConfig:
    """Which scans, and how patches are cut from them.

    Attributes:
        train: scans to train on (anything ``medsr.io.load_scan`` reads; a ``name.inv3`` InVesalius file too).
        val: held-out scans (split by scan, never by patch).
        patch_size: fine-grid patch, 2 values for 2D models, 3 for 3D; divisible by the degradation factors.
        slice_axis: for 2D models, the array axis (0, 1, 2 of X, Y, Z) that slices are cut across.
        slice_axes: for 2D models, several axes to cut slices across, one drawn per patch (e.g. ``[0, 1, 2]``:
            sagittal, coronal and axial planes, so a through-plane model sees the planes that contain thick
            axes); empty (default): ``slice_axis`` alone, so older configs and checkpoints mean the same.
        foreground_fraction: share of patches centred on a foreground voxel (the rest uniformly anywhere).
        foreground_threshold: normalised intensity above which a voxel counts as foreground (air is about -1).
        num_workers: DataLoader worker processes.
        augment: training-time augmentation (:class:`AugmentConfig`; off by default).
    """

    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    patch_size: tuple[int, ...] = (64, 64)
    slice_axis: int = 2
    slice_axes: tuple[int, ...] = ()
    foreground_fraction: float = 0.9
    foreground_threshold: float = -0.8
    num_workers: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    """MONAI ``DiffusionModelUNet`` settings (in_channels = 2: noisy target + condition; out_channels = 1)."""

    spatial_dims: int = 2
    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = 1
    num_head_channels: int = 32
    norm_num_groups: int = 16


@dataclass
class DiffusionConfig:
    """The diffusion process (Ho et al. 2020; SR3, Saharia et al. 2021).

    Attributes:
        num_train_timesteps: T (1000 in DDPM and SR3).
        schedule: "linear_beta" (DDPM) or "cosine" (Nichol & Dhariwal 2021).
        prediction: "epsilon" (DDPM) or "v_prediction" (Salimans & Ho 2022).
        loss: "l1" (SR3 found it slightly better) or "l2".
        target: "residual" diffuses ``residual_scale * (HR - condition)`` (residual diffusion SR); "plain"
            diffuses HR itself (SR3).
        residual_scale: scale of the residual so it fills roughly [-1, 1].
    """

    num_train_timesteps: int = 1000
    schedule: str = "linear_beta"
    prediction: str = "epsilon"
    loss: str = "l1"
    target: str = "residual"
    residual_scale: float = 4.0


@dataclass
class TrainConfig:
    """The training loop (AdamW, warm-up, clipping, EMA, autocast, checkpoints, validation).

    The learning rate warms up linearly over ``warmup_steps``, stays at ``lr``, and where ``lr_decay_end`` > 0
    follows a half cosine from ``lr`` at step ``lr_decay_start`` down to ``lr * lr_final`` at ``lr_decay_end``,
    constant after: the annealing that ends a long constant-rate run once validation goes flat. The rate is a
    function of the step alone, so a run split over sessions gets the same rates, and the decay can be added
    to a run already going (the ``train`` section may change between parts).

    Distillation (issue 13): with ``teacher`` set, the target of every training step is the teacher network's
    output at the same noisy input, timestep and condition instead of the analytic one, so a cheaper student can
    learn a stronger model's map; ``init_from`` starts the student from trained weights, and ``focus_timesteps``
    / ``focus_share`` spend part of each batch on the timesteps the default sampler visits (999 and 499).
    ``teacher_turns`` takes each item's goal from the teacher on a randomly turned (flipped/transposed) input,
    turned back: in expectation the goal is the teacher's self-ensemble (:mod:`medsr.turns`), the estimate the
    sampler's ``self_ensemble`` makes of it.
    """

    out_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    lr_decay_start: int = 0
    lr_decay_end: int = 0  # 0: no decay
    lr_final: float = 0.1  # fraction of lr reached at lr_decay_end
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    amp: str = "auto"  # auto | bf16 | fp16 | none
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    ckpt_every: int = 500
    val_every: int = 500
    val_patches: int = 16
    val_sampling_steps: int = 10
    val_samples: int = 1  # > 1: also log the PSNR/SSIM of the mean of this many samples (what enhancement ships)
    log_every: int = 50
    resume: bool = True
    threads: int = 0  # torch CPU threads; 0 = torch default
    init_from: str = ""  # a new run (no last.pt yet) starts from this checkpoint's EMA weights (same model sections)
    teacher: str = ""  # distillation: a checkpoint whose EMA network's output is the target (same degrade/diffusion)
    focus_timesteps: list[int] = field(default_factory=list)  # timesteps the sampler visits, drawn more often
    focus_share: float = 0.0  # share of each batch's timesteps drawn from focus_timesteps
    teacher_turns: bool = False  # distillation: the teacher sees each item turned by a random allowed flip/transpose


@dataclass
class Config:
    """Everything that defines a model and how it was trained; stored in every checkpoint."""

    degrade: str = "block:4x4"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class SamplingConfig:
    """How a trained model is sampled: the one home of these defaults (``medsr enhance``, ``medsr evaluate``,
    the archive and the model-card study all start from it).

    The defaults (8 samples x 2 DDIM steps, the first step shared by an image's samples: 9 network passes per
    image) come from the steps/samples study in the model card and the calibration study: with DDIM on the
    timesteps its scheduler step lands on (:func:`medsr.diffusion.ddim_timesteps`), 2-3 steps give the posterior
    mean of 10 and a per-patch error ranking as good; sharing the first step keeps the mean within 0.2 dB and
    the held-out coverage of 8 x 3 unshared (24 passes) on the 7 held-out scans.

    Attributes:
        samples: diffusion samples per scan (mean, spread and interval come from them).
        steps: DDIM steps per sample (``sampler="ddpm"`` runs all training timesteps instead).
        sampler: "ddim" or "ddpm" (SR3's reference, T steps).
        seed: same seed, same result, whatever the chunking or batching.
        device: "auto", "cpu", "cuda" or "cuda:N".
        amp: autocast mode, see :func:`medsr.runtime.resolve_amp`.
        project: data-consistency projection at every step, where the operator has one.
        window: sliding-window size in fine voxels; None: the training patch (fastest).
        overlap: sliding-window overlap, in [0, 1). 0.125 (8 voxels of a 64² window): a 512² slice takes 81
            windows per pass instead of 121 at 0.25 (1.27x the image's voxels instead of 1.89x); no seams and
            the same PSNR on real scans (tests/test_sampling.py, benchmarks/RESULTS.md).
        batch_size: images per network call (samples x slices).
        keep_samples: keep every sample (``samples.nii.gz``; empirical quantiles).
        slice_axis: 2D models: the array axis to slice across; None: chosen from the scan.
        share_first_step: DDIM with 2 or more steps: the first step's clean estimate is made once per image and
            shared by its samples (:func:`medsr.sampling.sample`, ``first``): ``1 + samples x (steps - 1)``
            network passes instead of ``samples x steps``. (At 1 step it would make every sample the same, so
            there each sample makes its own.)
        self_ensemble: 2D models: the samples are spread over up to this many flips/transposes ("turns") of the
            input plane (1, 2, 4 or 8; sample i on turn i mod n, turned back before the statistics), as many as the
            model's degradation is symmetric under (:func:`medsr.turns.ensemble_turns`). A geometric
            self-ensemble (as in EDSR) at no extra cost (the shared first step is made once and turned): the network's
            orientation bias averages out of the mean (model card: +0.71 dB on bad_sequence, +0.24 on MR_small,
            within ±0.04 dB elsewhere). 1: every sample on the input as given.
    """

    samples: int = 8
    steps: int = 2
    sampler: str = "ddim"
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    project: bool = True
    window: tuple[int, ...] | None = None
    overlap: float = 0.125
    batch_size: int = 16
    keep_samples: bool = False
    slice_axis: int | None = None
    share_first_step: bool = True
    self_ensemble: int = 8

    @property
    def shares_first_step(self) -> bool:
        """Whether this run shares the first step (``share_first_step`` where it applies: DDIM, 2+ steps)."""
        return self.share_first_step and self.sampler == "ddim" and self.steps >= 2

    def passes(self, groups: int = 1, num_train_timesteps: int | None = None) -> int:
        """Network passes over each image, the samples split into ``groups`` (through-plane: one per orientation)
        that each share their own first step: the cost model of progress bars, timings and extrapolations.
        DDPM runs every training timestep, so it needs the model's ``num_train_timesteps``."""
        if self.sampler == "ddpm":
            if num_train_timesteps is None:
                raise ValueError("passes() of a DDPM run needs the model's num_train_timesteps")
            return self.samples * num_train_timesteps
        if not self.shares_first_step:
            return self.samples * self.steps
        sizes = [n for n in (self.samples // groups + (k < self.samples % groups) for k in range(groups)) if n]
        return sum(1 + n * (self.steps - 1) for n in sizes)

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.samples, int) and not isinstance(self.samples, bool) and self.samples >= 1,
             f"samples must be an integer >= 1, got {self.samples!r}"),
            (isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 1,
             f"steps must be an integer >= 1, got {self.steps!r}"),
            (self.sampler in ("ddim", "ddpm"), f"sampler must be ddim or ddpm, got {self.sampler!r}"),
            (self.amp in ("auto", "bf16", "fp16", "none"), f"amp must be auto, bf16, fp16 or none, got {self.amp!r}"),
            (isinstance(self.overlap, (int, float)) and 0.0 <= float(self.overlap) < 1.0,
             f"overlap must be in [0, 1), got {self.overlap!r}"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1,
             f"batch_size must be an integer >= 1, got {self.batch_size!r}"),
            (self.slice_axis in (None, 0, 1, 2), f"slice_axis must be 0, 1 or 2, got {self.slice_axis!r}"),
            (self.self_ensemble in (1, 2, 4, 8) and not isinstance(self.self_ensemble, bool),
             f"self_ensemble must be 1, 2, 4 or 8, got {self.self_ensemble!r}"),
            (self.window is None or all(isinstance(w, int) and w >= 2 for w in self.window),
             f"window must be integers >= 2, got {self.window!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise MedsrError(f"sampling: {message}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (tuples as lists) for YAML/JSON/checkpoints."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise MedsrError(f"config {where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise MedsrError(f"config {where}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float:
        try:  # YAML 1.1 reads "1e-3" as a string: accept any number spelled as text
            if isinstance(value, (bool, list, tuple, dict)):
                raise TypeError
            return float(value)
        except (TypeError, ValueError):
            raise MedsrError(f"config {where}: expected a number, got {value!r}") from None
    if tp in (int, bool, str) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise MedsrError(f"config {where}: expected {tp.__name__}, got {value!r}")  # `steps: true` is not 1
    return value


def build_dataclass(cls: Any, values: Any, where: str = "") -> Any:
    """``cls(**values)`` with every value checked against its type hint: unknown keys, a bool for a number, a
    list for a number, "abc" for an int all raise :class:`MedsrError` naming the key. Used for every YAML that
    maps onto a dataclass (training configs, archive options), so they are checked alike."""
    if not isinstance(values, dict):
        raise MedsrError(f"config {where or 'root'}: expected a mapping of key: value, got {values!r}")
    return _build(cls, values, where)


def _build(cls: Any, values: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise MedsrError(f"config {where or 'root'}: unknown keys {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}".lstrip(".")) for k, v in values.items()}
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build a :class:`Config` from a nested dict, refusing unknown keys, wrong types and values out of range."""
    cfg: Config = build_dataclass(Config, values or {})
    validate_config(cfg)
    return cfg


SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")  # MONAI's NoiseSchedules


def _need(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise MedsrError(f"config {key}: must be {rule}, got {value!r}")


def _finite(v: float) -> bool:
    return math.isfinite(v)


def validate_config(cfg: Config) -> None:
    """Ranges and choices that types alone cannot express; each failure names the key, the rule and the value.

    Catches what would otherwise train silently wrong (lr 0, steps -1, ema_decay 2.0) or crash later with a
    traceback (batch 0, log_every 0, norm groups that do not divide the channels, slice_axis 5).
    """
    d, m, f, i, t = cfg.data, cfg.model, cfg.diffusion, cfg.intensity, cfg.train
    _need(len(d.patch_size) >= 1 and all(p >= 1 for p in d.patch_size), "data.patch_size", "positive sizes",
          d.patch_size)
    _need(d.slice_axis in (0, 1, 2), "data.slice_axis", "0, 1 or 2", d.slice_axis)
    _need(all(a in (0, 1, 2) for a in d.slice_axes) and len(set(d.slice_axes)) == len(d.slice_axes),
          "data.slice_axes", "distinct axes among 0, 1, 2 (or empty)", d.slice_axes)
    _need(0.0 <= d.foreground_fraction <= 1.0, "data.foreground_fraction", "in [0, 1]", d.foreground_fraction)
    _need(_finite(d.foreground_threshold), "data.foreground_threshold", "a finite number", d.foreground_threshold)
    _need(d.num_workers >= 0, "data.num_workers", ">= 0", d.num_workers)
    _need(m.spatial_dims in (2, 3), "model.spatial_dims", "2 or 3", m.spatial_dims)
    _need(len(m.channels) >= 1 and all(c >= 1 for c in m.channels), "model.channels", "positive counts",
          m.channels)
    _need(len(m.attention_levels) == len(m.channels), "model.attention_levels", "as long as model.channels",
          m.attention_levels)
    _need(m.num_res_blocks >= 1, "model.num_res_blocks", ">= 1", m.num_res_blocks)
    _need(m.num_head_channels >= 1, "model.num_head_channels", ">= 1", m.num_head_channels)
    _need(m.norm_num_groups >= 1 and all(c % m.norm_num_groups == 0 for c in m.channels), "model.norm_num_groups",
          f"a divisor of every channel count {list(m.channels)}", m.norm_num_groups)
    _need(f.num_train_timesteps >= 1, "diffusion.num_train_timesteps", ">= 1", f.num_train_timesteps)
    _need(f.schedule in SCHEDULES, "diffusion.schedule", f"one of {list(SCHEDULES)}", f.schedule)
    _need(f.prediction in ("epsilon", "v_prediction"), "diffusion.prediction", "epsilon or v_prediction",
          f.prediction)
    _need(f.loss in ("l1", "l2"), "diffusion.loss", "l1 or l2", f.loss)
    _need(f.target in ("residual", "plain"), "diffusion.target", "residual or plain", f.target)
    _need(_finite(f.residual_scale) and f.residual_scale > 0, "diffusion.residual_scale", "> 0", f.residual_scale)
    _need(len(i.ct_window) == 2 and all(map(_finite, i.ct_window)) and i.ct_window[0] < i.ct_window[1],
          "intensity.ct_window", "two finite numbers, low < high", i.ct_window)
    _need(len(i.mr_percentiles) == 2 and 0 <= i.mr_percentiles[0] < i.mr_percentiles[1] <= 100,
          "intensity.mr_percentiles", "two percentiles 0 <= low < high <= 100", i.mr_percentiles)
    for key in ("steps", "batch_size", "ckpt_every", "val_every", "log_every", "val_sampling_steps", "val_samples"):
        _need(getattr(t, key) >= 1, f"train.{key}", ">= 1", getattr(t, key))
    for key in ("warmup_steps", "val_patches", "threads"):
        _need(getattr(t, key) >= 0, f"train.{key}", ">= 0", getattr(t, key))
    _need(_finite(t.lr) and t.lr > 0, "train.lr", "a finite number > 0", t.lr)
    _need(t.lr_decay_start >= 0, "train.lr_decay_start", ">= 0", t.lr_decay_start)
    _need(t.lr_decay_end == 0 or t.lr_decay_end > t.lr_decay_start, "train.lr_decay_end",
          f"0 (no decay) or > lr_decay_start ({t.lr_decay_start})", t.lr_decay_end)
    _need(_finite(t.lr_final) and 0 < t.lr_final <= 1, "train.lr_final", "in (0, 1]", t.lr_final)
    _need(_finite(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay", "a finite number >= 0",
          t.weight_decay)
    _need(_finite(t.grad_clip) and t.grad_clip > 0, "train.grad_clip", "a finite number > 0", t.grad_clip)
    _need(0.0 <= t.ema_decay < 1.0, "train.ema_decay", "in [0, 1)", t.ema_decay)
    _need(t.amp in ("auto", "bf16", "fp16", "none"), "train.amp", "auto, bf16, fp16 or none", t.amp)
    _need(all(0 <= k < f.num_train_timesteps for k in t.focus_timesteps), "train.focus_timesteps",
          f"timesteps in 0..{f.num_train_timesteps - 1}", t.focus_timesteps)
    _need(0.0 <= t.focus_share <= 1.0 and (t.focus_share == 0.0 or bool(t.focus_timesteps)), "train.focus_share",
          "in [0, 1], and 0 unless train.focus_timesteps is set", t.focus_share)
    _need(not t.teacher_turns or bool(t.teacher), "train.teacher_turns", "false unless train.teacher is set",
          t.teacher_turns)


def sampling_config_from_dict(values: dict[str, Any], where: str = "sampling") -> SamplingConfig:
    """Build a :class:`SamplingConfig` from a mapping (e.g. a YAML section), with the same typed checks."""
    return _build(SamplingConfig, values or {}, where)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise MedsrError(f"override {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        node = values
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # e.g. degrade.x=1: degrade is a value, not a section
                raise MedsrError(f"override {item!r}: {'.'.join(parts[:i + 1])} is a setting, not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise MedsrError(f"override {item!r}: value is not valid YAML ({exc})") from None
    return values


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise MedsrError(f"{p}: cannot read config ({exc})") from None
        if not isinstance(values, dict):
            raise MedsrError(f"{p}: a config is a mapping of sections (data:, model:, train: ...), got {values!r}")
    return config_from_dict(apply_overrides(values, list(overrides or [])))
