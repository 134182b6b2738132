"""Tiny random-weight SR3 checkpoints and real scans for the sampling / uncertainty / enhance / outputs tests.

MONAI's ``DiffusionModelUNet`` zero-initialises its output convolution, so an untrained net predicts zeros for
every input and samples carry no sign of the network at all. The output conv here gets small random weights
(fixed seed), so the network shapes the samples (through its receptive field, its group norms and its window
borders), which is what the seam, reproducibility and statistics tests need. v-prediction keeps the clean
estimate bounded (x0 = sqrt(a) x_t - sqrt(1 - a) v), so an untrained net gives samples of moderate spread.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsr.config import Config, load_config
from medsr.io import Scan, load_scan
from medsr.io.refs import resolve_ref
from medsr.model import LoadedModel, load_model, write_untrained_checkpoint

__all__ = ["TINY", "tiny_config", "write_tiny_checkpoint", "tiny_model", "anatomical", "ct_small", "fine_centres"]

TINY = ["diffusion.prediction=v_prediction", "model.channels=[8,16]", "model.attention_levels=[false,false]",
        "model.num_head_channels=8", "model.norm_num_groups=4", "train.amp=none", "train.device=cpu"]

NIFTI_REF = "nibabel:anatomical.nii"  # real T1, 33x41x25, 2 mm
DICOM_REF = "pydicom:CT_small.dcm"  # real CT slice, 128x128, 0.66 mm, 5 mm thick


def tiny_config(degrade: str = "block:2x2", patch: tuple[int, ...] = (16, 16), *extra: str) -> Config:
    return load_config(None, [*TINY, f"degrade={degrade}", f"data.patch_size={list(patch)}", *extra])


def write_tiny_checkpoint(path: Path, cfg: Config, seed: int = 0, out_std: float = 0.05) -> Path:
    """A checkpoint shaped like ``medsr.train``'s, with a randomised output conv so the net is not all zeros."""
    return write_untrained_checkpoint(path, cfg, seed=seed, out_std=out_std, step=7)


def tiny_model(path: Path, degrade: str = "block:2x2", patch: tuple[int, ...] = (16, 16), *extra: str, seed: int = 0,
               out_std: float = 0.05) -> LoadedModel:
    """Write a tiny checkpoint to ``path`` and load it back the way ``medsr enhance`` does.

    Keep ``patch`` small: the sliding window is twice the patch, and the UNet's middle block always has
    self-attention, whose cost grows with the square of the window's area.
    """
    write_tiny_checkpoint(path, tiny_config(degrade, patch, *extra), seed, out_std)
    return load_model(path)


def anatomical() -> Scan:
    return load_scan(resolve_ref(NIFTI_REF))


def ct_small() -> Scan:
    return load_scan(resolve_ref(DICOM_REF))


def fine_centres(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """World position (mm) of every voxel centre, ``(X, Y, Z, 3)``."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def count_passes(monkeypatch) -> list[int]:  # noqa: ANN001
    """Record the batch size of every full-image denoiser pass of ``medsr.sampling`` (one entry per call)."""
    import medsr.sampling

    passes: list[int] = []
    real = medsr.sampling.denoise_full

    def counting(net, x_t, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        passes.append(int(x_t.shape[0]))
        return real(net, x_t, *args, **kwargs)

    monkeypatch.setattr(medsr.sampling, "denoise_full", counting)
    return passes
