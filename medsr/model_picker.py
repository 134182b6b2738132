"""Which model runs on a scan, loaded once per name: the one definition ``medsr enhance``, ``medsr evaluate`` and
the archive share, so ``--model auto`` means the same everywhere.

``auto`` chooses a shipped model from the scan's geometry (:func:`medsr.model_choice.choose_model`: thick slices
→ the through-plane model, otherwise the in-plane one); a shipped model's name or a checkpoint path runs that
model, its own degradation deciding in-plane or through-plane (:func:`medsr.model_choice.explicit_choice`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medsr.enhance import choose_slice_axis
from medsr.io.scan import Scan
from medsr.model import LoadedModel, load_model
from medsr.model_choice import AUTO, ModelChoice, choose_model, explicit_choice
from medsr.runtime import SHIPPED_MODELS, resolve_device, resolve_model, shipped_model_path

__all__ = ["ModelPicker"]


class ModelPicker:
    """``model``: ``auto``, a shipped model's name or a checkpoint path; models load on first use, once each."""

    def __init__(self, model: str = AUTO, device: str | torch.device = "cpu",
                 loaded: dict[str, LoadedModel] | None = None) -> None:
        self.model = model or AUTO
        self.device = resolve_device(device)
        self._loaded: dict[str, LoadedModel] = dict(loaded or {})

    @property
    def auto(self) -> bool:
        return self.model == AUTO

    def load(self, name_or_path: str) -> LoadedModel:
        """The model for a shipped name or a path, loaded once."""
        if name_or_path not in self._loaded:
            self._loaded[name_or_path] = load_model(resolve_model(name_or_path), device=self.device)
        return self._loaded[name_or_path]

    def check(self) -> None:
        """Fail before any scan is read: load an explicit model; for ``auto``, every shipped model it may choose
        must be installed."""
        if not self.auto:
            self.load(self.model)
            return
        for entry in SHIPPED_MODELS.values():
            if entry.auto:
                shipped_model_path(entry.name)

    def pick(self, spacing: Sequence[float], shape: Sequence[int], acquisition_axis: int | None,
             slice_axis: int) -> tuple[LoadedModel, ModelChoice]:
        """The model and the choice (task, axis, factor, reason) for a scan of this geometry; ``slice_axis`` is
        where an explicit in-plane model works (:func:`medsr.enhance.choose_slice_axis`)."""
        if self.auto:
            choice = choose_model(spacing, shape, acquisition_axis)
            return self.load(choice.name), choice
        model = self.load(self.model)
        return model, explicit_choice(self.model, model.degradation, spacing, slice_axis)

    def pick_for(self, scan: Scan) -> tuple[LoadedModel, ModelChoice]:
        """:meth:`pick` for a loaded scan."""
        return self.pick(scan.spacing, scan.spatial_shape, scan.acquisition_axis, choose_slice_axis(scan))
