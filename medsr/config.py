"""Typed configuration: dataclasses that YAML files in ``configs/`` map onto field for field.

``load_config(path, ["train.steps=100", ...])`` reads a YAML file, applies ``section.field=value`` overrides
(values parsed as YAML), and refuses unknown keys with a clear message. ``to_dict`` gives the resolved config
that is written next to every checkpoint and output.
"""

from __future__ import annotations

import dataclasses
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
    "load_config",
    "config_from_dict",
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
    """

    flip_prob: float = 0.0
    rot90_prob: float = 0.0
    curve_prob: float = 0.0
    curve_points: tuple[int, int] = (5, 10)
    gamma_prob: float = 0.0
    gamma_range: tuple[float, float] = (0.7, 1.5)
    noise_prob: float = 0.0
    noise_std: float = 0.02


@dataclass
class DataConfig:
    """Which scans, and how patches are cut from them.

    Attributes:
        train: scans to train on (anything ``medsr.io.load_scan`` reads; a ``name.inv3`` InVesalius file too).
        val: held-out scans (split by scan, never by patch).
        patch_size: fine-grid patch, 2 values for 2D models, 3 for 3D; divisible by the degradation factors.
        slice_axis: for 2D models, the array axis (0, 1, 2 of X, Y, Z) that slices are cut across.
        foreground_fraction: share of patches centred on a foreground voxel (the rest uniformly anywhere).
        foreground_threshold: normalised intensity above which a voxel counts as foreground (air is about -1).
        num_workers: DataLoader worker processes.
        augment: training-time augmentation (:class:`AugmentConfig`; off by default).
    """

    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    patch_size: tuple[int, ...] = (64, 64)
    slice_axis: int = 2
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
    """The training loop (AdamW, warm-up, clipping, EMA, autocast, checkpoints, validation)."""

    out_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    amp: str = "auto"  # auto | bf16 | fp16 | none
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    ckpt_every: int = 500
    val_every: int = 500
    val_patches: int = 16
    val_sampling_steps: int = 10
    log_every: int = 50
    resume: bool = True
    threads: int = 0  # torch CPU threads; 0 = torch default


@dataclass
class Config:
    """Everything that defines a model and how it was trained; stored in every checkpoint."""

    degrade: str = "block:4x4"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


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
    if tp is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads "1e-3" as a string: accept any number spelled as text
            return float(value)
        except (TypeError, ValueError):
            raise MedsrError(f"config {where}: expected a number, got {value!r}") from None
    if tp in (int, bool, str) and not isinstance(value, tp):
        raise MedsrError(f"config {where}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: Any, values: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise MedsrError(f"config {where or 'root'}: unknown keys {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}".lstrip(".")) for k, v in values.items()}
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build a :class:`Config` from a nested dict, refusing unknown keys and wrong types."""
    return _build(Config, values or {})


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise MedsrError(f"override {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
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
    return config_from_dict(apply_overrides(values, list(overrides or [])))
