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
    "SamplingConfig",
    "sampling_config_from_dict",
    "load_config",
    "config_from_dict",
    "to_dict",
]


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
    """

    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    patch_size: tuple[int, ...] = (64, 64)
    slice_axis: int = 2
    foreground_fraction: float = 0.9
    foreground_threshold: float = -0.8
    num_workers: int = 0


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


@dataclass
class SamplingConfig:
    """How a trained model is sampled: the one home of these defaults (``medsr enhance``, ``medsr evaluate``,
    the archive and the model-card study all start from it).

    The defaults (8 samples x 10 DDIM steps) come from the steps/samples study in the model card.

    Attributes:
        samples: diffusion samples per scan (mean, spread and interval come from them).
        steps: DDIM steps per sample (``sampler="ddpm"`` runs all training timesteps instead).
        sampler: "ddim" or "ddpm" (SR3's reference, T steps).
        seed: same seed, same result, whatever the chunking or batching.
        device: "auto", "cpu", "cuda" or "cuda:N".
        amp: autocast mode, see :func:`medsr.runtime.resolve_amp`.
        project: data-consistency projection at every step, where the operator has one.
        window: sliding-window size in fine voxels; None: the training patch (fastest).
        overlap: sliding-window overlap, in [0, 1).
        batch_size: images per network call (samples x slices).
        keep_samples: keep every sample (``samples.nii.gz``; empirical quantiles).
        slice_axis: 2D models: the array axis to slice across; None: chosen from the scan.
    """

    samples: int = 8
    steps: int = 10
    sampler: str = "ddim"
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    project: bool = True
    window: tuple[int, ...] | None = None
    overlap: float = 0.25
    batch_size: int = 16
    keep_samples: bool = False
    slice_axis: int | None = None

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
