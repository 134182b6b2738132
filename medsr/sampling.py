"""The SR3 sampling loop, written out: sliding-window denoiser over the whole image at every step.

For each timestep: the network runs over the full image through MONAI's ``sliding_window_inference``
(gaussian blending), its output becomes a clean estimate x0, x0 is projected so that degrading it gives back
the input exactly (DDNM-style range/null-space projection, where the operator allows it), and the MONAI
scheduler takes the step from that x0. Because every step sees the whole image, windows never meet as
independently sampled patches, so there are no seams. Knows nothing of files or DICOM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference

from medsr.config import DiffusionConfig, SamplingConfig
from medsr.degrade import DegradeSpec
from medsr.diffusion import ddim_step, from_target, make_sampler, to_clean_estimate, to_target
from medsr.model import denoise, input_layout
from medsr.runtime import autocast_context

__all__ = ["sample", "make_generators", "fitted_window"]

_DEFAULTS = SamplingConfig()


def make_generators(seed: int, n: int, device: torch.device) -> list[torch.Generator]:
    """One generator per sample (seed, seed+1, ...): sample i is the same whether drawn alone or batched."""
    return [torch.Generator(device=device).manual_seed(int(seed) + i) for i in range(n)]


def _window_predictor(net: torch.nn.Module, t: int, amp: str) -> Callable[[torch.Tensor], torch.Tensor]:
    layout = input_layout(net)  # NHWC where load_model made the weights NHWC (medsr.model.configure_inference)

    def predict(window: torch.Tensor) -> torch.Tensor:
        if window.ndim == 4:
            window = window.contiguous(memory_format=layout)
        with autocast_context(window.device, amp):
            out = denoise(net, window[:, :1], window[:, 1:], t)
        return out.float()

    return predict


def denoise_full(
    net: torch.nn.Module,
    x_t: torch.Tensor,
    cond: torch.Tensor,
    t: int,
    roi_size: Sequence[int] | None,
    overlap: float = _DEFAULTS.overlap,
    sw_batch_size: int = _DEFAULTS.batch_size,
    amp: str = "none",
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Network output over the whole image ``(B, 1, *spatial)``: one call if it fits ``roi_size``, else windows.

    The windows of all B images (samples x slices) go through the network together, ``sw_batch_size`` per
    call. The window is first shrunk to the image (:func:`fitted_window`). ``weights`` is the blending map from
    :func:`blend_weights` of that fitted window (computed once per image, not per step).
    """
    predict = _window_predictor(net, t, amp)
    z = torch.cat([x_t, cond], dim=1)
    roi = fitted_window(roi_size, x_t.shape[2:], net)
    if roi is None or tuple(x_t.shape[2:]) == roi:
        return predict(z)
    if weights is not None and tuple(weights.shape[2:]) != roi:
        raise ValueError(f"blend map {tuple(weights.shape[2:])} is not the fitted window {roi}: build it with "
                         "blend_weights(fitted_window(...))")
    return sliding_window_inference(z, roi_size=roi, sw_batch_size=sw_batch_size, predictor=predict,
                                    overlap=overlap, mode="gaussian", padding_mode="replicate",
                                    roi_weight_map=weights)  # type: ignore[return-value]


def fitted_window(roi_size: Sequence[int] | None, shape: Sequence[int],
                  net: torch.nn.Module) -> tuple[int, ...] | None:
    """The window used on an image of ``shape``: ``roi_size`` shrunk, along every axis where the image is smaller,
    to the image's size rounded up to a multiple the network's levels divide (None: the whole image at once).

    Why: MONAI pads an image smaller than the window up to the window (replicate), so the network saw stripes of
    repeated noise and condition that no training patch has; on anatomical.nii's first and last thick slices
    that cost the through-plane model up to 0.8 dB per slab. Padded only to divisibility, an image edge looks
    like a training patch's border."""
    if roi_size is None:
        return None
    m = 2 ** (len(getattr(net, "block_out_channels", (1, 1, 1))) - 1)
    return tuple(min(int(r), -(-int(s) // m) * m) for r, s in zip(roi_size, shape))


def blend_weights(roi_size: Sequence[int] | None, device: torch.device) -> torch.Tensor | None:
    """The gaussian window-blending map MONAI would build on every call, built once (None: no windows).

    Pass the :func:`fitted_window`: MONAI pads an image smaller than the window up to it, so its windows are
    always that size."""
    if roi_size is None:
        return None
    return compute_importance_map(tuple(roi_size), mode="gaussian", device=device)[None, None]


@torch.no_grad()
def sample(
    net: torch.nn.Module,
    cfg: DiffusionConfig,
    cond: torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    sampler: str = _DEFAULTS.sampler,
    steps: int = _DEFAULTS.steps,
    lowres: torch.Tensor | None = None,
    spec: DegradeSpec | None = None,
    project: bool = True,
    roi_size: Sequence[int] | None = None,
    overlap: float = _DEFAULTS.overlap,
    sw_batch_size: int = _DEFAULTS.batch_size,
    amp: str = "none",
    on_step: Callable[[int, int], None] | None = None,
    first: torch.Tensor | None = None,
    first_only: bool = False,
) -> torch.Tensor:
    """Draw one sample per batch element.

    Args:
        net: the denoiser (EMA weights, eval mode).
        cfg: the diffusion config the model was trained with.
        cond: ``(B, 1, *spatial)`` condition (input interpolated to the fine grid), normalised units.
        generators: one per batch element (initial noise and DDPM noise).
        sampler: "ddim" (``steps`` steps) or "ddpm" (all T steps, SR3's reference).
        lowres: ``(B, 1, *spatial/f)`` the input on its own grid; needed for data consistency.
        spec: the degradation that maps fine to coarse; data consistency is applied when it has an exact
            projection and ``project`` is true.
        roi_size: sliding-window size in fine voxels (None: the whole image at once).
        on_step: called with (step index, number of steps) for progress bars.
        first: DDIM only: ``(B, 1, *spatial)`` the first step's clean estimate (target units), made once per
            item with ``first_only`` and shared by that item's samples; each sample still takes the DDIM step
            from its own noise, so samples differ. None: every sample makes its own.
        first_only: return the first step's clean estimate (target units) instead of a sample.

    Why sharing the first step is sound: at t = T-1 the network's input holds sqrt(alpha_bar) (0.006 for the
    linear schedule) of the signal, so its estimate hardly depends on the noise drawn (model card: at one step
    the samples of an item are within 0.05 dB PSNR of their mean); one call per item replaces one per sample.

    Returns:
        ``(B, 1, *spatial)`` the samples, normalised units.
    """
    if len(generators) != cond.shape[0]:
        raise ValueError(f"need one generator per batch element: {len(generators)} vs {cond.shape[0]}")
    if (first is not None or first_only) and sampler != "ddim":
        raise ValueError("a shared first step is a DDIM step: sampler must be ddim")
    if first is not None and first.shape != cond.shape:
        raise ValueError(f"first estimate {tuple(first.shape)} does not match the condition {tuple(cond.shape)}")
    sch = make_sampler(cfg, sampler, steps)
    alphas = sch.alphas_cumprod
    x = torch.stack([torch.randn(cond.shape[1:], generator=g, device=cond.device) for g in generators])
    use_projection = project and spec is not None and lowres is not None and spec.has_projection
    timesteps = [int(t) for t in sch.timesteps]
    roi_size = fitted_window(roi_size, cond.shape[2:], net)
    weights = blend_weights(roi_size, cond.device)
    for i, t in enumerate(timesteps):
        if i == 0 and first is not None:
            x0 = first.to(x.dtype)
        else:
            out = denoise_full(net, x, cond, t, roi_size, overlap, sw_batch_size, amp, weights)
            x0 = to_clean_estimate(out, x, t, cfg, alphas)
            if use_projection:
                img = spec.project(from_target(x0, cond, cfg), lowres)  # type: ignore[union-attr,arg-type]
                x0 = to_target(img, cond, cfg)
        if first_only:
            return x0
        if sampler == "ddim":  # eta = 0: no noise is drawn, so the whole batch takes its step in one call
            x = ddim_step(x0, x, t, timesteps[i + 1] if i + 1 < len(timesteps) else -1, alphas)
        else:
            x = torch.cat([sch.step(x0[b:b + 1], t, x[b:b + 1], generator=g)[0] for b, g in enumerate(generators)])
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return from_target(x, cond, cfg)

