"""The SR3 network (MONAI ``DiffusionModelUNet``) and its checkpoints.

SR3 conditions by concatenation: the UNet sees ``[x_t, condition]`` (2 channels) and the timestep, and predicts
one channel (noise, v or the clean target; see :mod:`medsr.diffusion`). Checkpoints hold plain tensors and
plain Python containers only, so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet

from medsr.config import Config, ModelConfig, config_from_dict, to_dict
from medsr.degrade import DegradeSpec, parse_spec
from medsr.errors import MedsrError
from medsr.io.paths import atomic_path
from medsr.uncertainty import ModelCalibration, as_model_calibration

__all__ = ["build_unet", "configure_inference", "input_layout",
           "denoise", "save_checkpoint", "load_checkpoint", "LoadedModel", "load_model", "file_sha256",
           "export_model", "checkpoint_payload", "write_untrained_checkpoint"]

CHECKPOINT_FORMAT = "medsr-checkpoint-1"


def build_unet(cfg: ModelConfig) -> DiffusionModelUNet:
    """The conditional denoiser: ``(B, 2, *spatial)`` + timesteps ``(B,)`` -> ``(B, 1, *spatial)``."""
    if len(cfg.channels) != len(cfg.attention_levels):
        raise MedsrError(
            f"model config: channels {cfg.channels} and attention_levels {cfg.attention_levels} differ in length"
        )
    return DiffusionModelUNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=2,
        out_channels=1,
        channels=tuple(cfg.channels),
        attention_levels=tuple(cfg.attention_levels),
        num_res_blocks=cfg.num_res_blocks,
        num_head_channels=cfg.num_head_channels,
        norm_num_groups=cfg.norm_num_groups,
    )


def configure_inference(net: torch.nn.Module, fast: bool = True) -> torch.nn.Module:
    """Switch a loaded network between v0.1's inference layout (``fast=False``) and the faster one (in place).

    Both give the same outputs to float tolerance from the same weights; measured on one CPU thread
    (benchmarks/RESULTS.md): torch's ``scaled_dot_product_attention`` instead of the explicit softmax(QK^T)V
    (1.1x on 64² windows, 2.7x on 256²: the attention matrix is never materialised), and for 2D nets NHWC
    (channels-last) weights, 1.2x with oneDNN. :func:`input_layout` tells the sampler which layout to feed.
    """
    for module in net.modules():
        if hasattr(module, "use_flash_attention"):
            setattr(module, "use_flash_attention", fast)  # noqa: B010 (a plain attribute MONAI's SABlock reads)
    if any(p.ndim == 4 for p in net.parameters()):
        net.to(memory_format=torch.channels_last if fast else torch.contiguous_format)  # type: ignore[call-overload]
    return net


def input_layout(net: torch.nn.Module) -> torch.memory_format:
    """The memory format the network's 2D convolution weights are in (what its input should be in too)."""
    for p in net.parameters():
        if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1:  # unambiguous: C and H*W both > 1
            return torch.channels_last if p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() \
                else torch.contiguous_format
    return torch.contiguous_format


def denoise(net: torch.nn.Module, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """One network evaluation, SR3 style: concatenate the noisy target with the condition."""
    if not torch.is_tensor(t):
        t = torch.full((x_t.shape[0],), int(t), device=x_t.device, dtype=torch.long)
    elif t.ndim == 0:
        t = t.expand(x_t.shape[0])
    return net(torch.cat([x_t, cond], dim=1), timesteps=t)


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (a crash mid-write never leaves a truncated file)."""
    payload = {"format": CHECKPOINT_FORMAT, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); any failure becomes a :class:`MedsrError`."""
    p = Path(path)
    if not p.is_file():
        raise MedsrError(f"{p}: checkpoint not found")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle errors, truncation, foreign files
        raise MedsrError(f"{p}: not a readable medsr checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise MedsrError(f"{p}: not a medsr checkpoint (missing format tag {CHECKPOINT_FORMAT!r})")
    for key in ("config", "ema"):
        if key not in ckpt:
            raise MedsrError(f"{p}: checkpoint lacks {key!r}")
    return ckpt


def load_state_strict(net: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load weights, turning shape/key mismatches into a clear message instead of a torch traceback."""
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise MedsrError(f"{where}: weights do not match the model config ({' '.join(first)})") from None


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class LoadedModel:
    """A trained model ready for sampling: the EMA network (eval mode), its config and where it came from."""

    net: torch.nn.Module
    config: Config
    path: str
    sha256: str
    step: int
    calibration: ModelCalibration = field(default_factory=ModelCalibration)  # per modality (medsr.uncertainty)
    degradation: DegradeSpec = field(init=False)  # the forward operator, parsed once from ``config.degrade``

    def __post_init__(self) -> None:
        self.degradation = parse_spec(self.config.degrade)


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Build the network from the checkpoint's own config and load its EMA weights."""
    ckpt = load_checkpoint(path)
    try:
        cfg = config_from_dict(ckpt["config"])
    except MedsrError as exc:
        raise MedsrError(f"{path}: stored config is invalid ({exc})") from None
    if parse_spec(cfg.degrade).spatial_dims != cfg.model.spatial_dims:
        raise MedsrError(f"{path}: degradation {cfg.degrade} does not fit a {cfg.model.spatial_dims}D model")
    ema, step, calibration = ckpt["ema"], ckpt.get("step", 0), ckpt.get("calibration")
    if not isinstance(ema, dict) or not all(isinstance(v, torch.Tensor) for v in ema.values()):
        raise MedsrError(f"{path}: checkpoint field 'ema' is not a dict of tensors")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise MedsrError(f"{path}: checkpoint field 'step' must be a whole number >= 0, got {step!r}")
    damaged = [k for k, v in ema.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if damaged:
        raise MedsrError(f"{path}: {len(damaged)} weight tensor(s) hold NaN/Inf (e.g. {damaged[0]}); the checkpoint "
                         "is damaged")
    net = build_unet(cfg.model)
    load_state_strict(net, {k: v.float() if v.is_floating_point() else v for k, v in ema.items()}, str(path))
    net.to(device).eval()
    configure_inference(net, fast=True)
    return LoadedModel(net, cfg, str(path), file_sha256(path), step,
                       ModelCalibration.from_checkpoint(calibration, str(path)))


def checkpoint_payload(cfg: Config, ema_state: dict[str, torch.Tensor], *,
                       model_state: dict[str, torch.Tensor] | None = None,
                       optimizer_state: dict[str, Any] | None = None, step: int = 0,
                       rng: list[torch.Tensor] | None = None,
                       calibration: float | dict[str, Any] | ModelCalibration = 1.0) -> dict[str, Any]:
    """The keys every training checkpoint holds (what ``train`` writes, ``load_model`` and resuming read)."""
    return {"model": ema_state if model_state is None else model_state, "ema": ema_state,
            "optimizer": {} if optimizer_state is None else optimizer_state, "step": int(step),
            "rng": list(rng or []), "config": to_dict(cfg), "normalisation": to_dict(cfg.intensity),
            "calibration": as_model_calibration(calibration).to_checkpoint()}


def write_untrained_checkpoint(path: str | os.PathLike[str], cfg: Config, *, seed: int = 0, out_std: float = 0.02,
                               step: int = 0) -> Path:
    """An untrained network's checkpoint, for tests and benchmarks that need a model but not a trained one.

    MONAI zero-initialises the UNet's output convolution, so an untrained net predicts exactly zero; that layer
    is drawn from N(0, out_std²) (seeded) so samples are non-trivial.
    """
    torch.manual_seed(seed)
    net = build_unet(cfg.model)
    with torch.no_grad():
        for p in net.out.parameters():
            torch.nn.init.normal_(p, std=out_std)
    state = net.state_dict()
    return save_checkpoint(path, checkpoint_payload(cfg, state, model_state=state, step=step))


def export_model(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str],
                 calibration: float | dict[str, Any] | ModelCalibration = 1.0,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write a release checkpoint: EMA weights only, in float16 (half the size), config, step, calibration.

    ``load_model`` reads it like any checkpoint (weights go back to float32 on load). ``extra`` holds
    provenance (data, command, wall time) that ends up in the model card.
    """
    ckpt = load_checkpoint(checkpoint)
    ema = {k: (v.half() if v.is_floating_point() else v) for k, v in ckpt["ema"].items()}
    payload = {"ema": ema, "config": ckpt["config"], "step": int(ckpt.get("step", 0)),
               "normalisation": ckpt.get("normalisation", {}),
               "calibration": as_model_calibration(calibration).to_checkpoint(),
               "provenance": dict(extra or {})}
    return save_checkpoint(out, payload)
