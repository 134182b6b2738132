"""Where and how code runs: device, mixed precision, distributed rank, and the models shipped with medsr.

One definition of each, so training, sampling, enhancement, the archive, benchmarks and notebooks agree: "auto"
AMP means the same everywhere (bf16 on CUDA, fp16 on CUDA without bf16, bf16 on CPUs with native bf16, else
off), and the shipped-model registry is the only place that knows where weights live in the package.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from medsr.errors import MedsrError

__all__ = [
    "AMP_MODES",
    "resolve_device",
    "resolve_amp",
    "autocast_context",
    "DistInfo",
    "dist_info",
    "ShippedModel",
    "SHIPPED_MODELS",
    "DEFAULT_MODEL_NAME",
    "WEIGHTS_DIR",
    "shipped_model",
    "shipped_model_path",
    "resolve_model",
]

AMP_MODES = ("auto", "bf16", "fp16", "none")


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` → CUDA when available, else CPU; a clear error for an unavailable or unknown device."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise MedsrError(f"device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedsrError(f"device={name} asked for, but no CUDA device is available")
    return torch.device(name)


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """The concrete autocast mode for ``device``: ``auto`` → bf16 on CUDA (fp16 without bf16), bf16 on CPUs
    with native bf16 (1.4x faster there, same PSNR; benchmarks/RESULTS.md), else ``none``."""
    if amp not in AMP_MODES:
        raise MedsrError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if _cpu_has_bf16() else "none"


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager[None]:
    """Autocast for ``amp`` (resolved with :func:`resolve_amp` if ``auto``); a no-op for ``none``."""
    amp = resolve_amp(amp, device)
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main rank writes checkpoints, logs and reports."""
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank, local rank and world size from the environment torchrun sets."""
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
                    int(os.environ.get("WORLD_SIZE", "1")))


WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ShippedModel:
    """A model that ships inside the package: its name, file and what it is for."""

    name: str
    filename: str
    task: str  # "inplane", "throughplane" or "denoise"
    factors: tuple[int, ...]  # the model's degradation factors (in-plane (4, 4); through-plane (1, 4))
    description: str
    modalities: tuple[str, ...] = ("CT", "MR")
    auto: bool = True  # may ``--model auto`` choose it from a scan's geometry (never for denoising)
    card: str = "MODEL_CARD.md"

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.filename


DEFAULT_MODEL_NAME = "default"
SHIPPED_MODELS: dict[str, ShippedModel] = {
    "default": ShippedModel("default", "default_x4.pt", "inplane", (4, 4),
                            "2D x4 in-plane super-resolution, brain MRI and head CT"),
    # a denoiser: nothing in a scan says it is low-dose, so ``--model auto`` never picks it (ask by name)
    "lowdose_ct": ShippedModel("lowdose_ct", "lowdose_ct.pt", "denoise", (1, 1),
                               "2D quarter-dose CT denoiser (sinogram-simulated noise), output grid = input grid",
                               ("CT",), auto=False, card="LOWDOSE_CT_CARD.md"),
    # the in-plane teacher of issue 13: better on most held-out scans, ~1.6x the default's time; ask by name
    "inplane_v2": ShippedModel("inplane_v2", "inplane_v2_x4.pt", "inplane", (4, 4),
                               "2D x4 in-plane, wider network (48-96-96), longer training; slower than the default",
                               auto=False, card="INPLANE_V2_CARD.md"),
    "throughplane_x4": ShippedModel("throughplane_x4", "throughplane_x4.pt", "throughplane", (1, 4),
                                    "x4 along one axis (thick slices made thin), 2D on the planes that contain the "
                                    "thick axis, orientations pooled; brain MRI and head CT",
                                    card="THROUGHPLANE_X4_CARD.md"),
}


def shipped_model(name: str = DEFAULT_MODEL_NAME) -> ShippedModel:
    """The registry entry for ``name``; a clear error naming the shipped models otherwise."""
    if name not in SHIPPED_MODELS:
        raise MedsrError(f"no shipped model named {name!r}; shipped: {', '.join(sorted(SHIPPED_MODELS))}")
    return SHIPPED_MODELS[name]


def shipped_model_path(name: str = DEFAULT_MODEL_NAME) -> Path:
    """The weights file of a shipped model; a clear error if this install lacks it."""
    entry = shipped_model(name)
    if not entry.path.is_file():
        raise MedsrError(f"shipped model {name!r} is missing from this install ({entry.path}); "
                         "pass --model PATH (a medsr checkpoint)")
    return entry.path


def resolve_model(name_or_path: str | os.PathLike[str] | None) -> Path:
    """``None`` → the default shipped model; a shipped model's name → its file; anything else → a path."""
    if name_or_path is None:
        return shipped_model_path(DEFAULT_MODEL_NAME)
    text = os.fspath(name_or_path)
    if text in SHIPPED_MODELS:
        return shipped_model_path(text)
    return Path(text)
