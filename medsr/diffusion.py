"""The diffusion process: schedule, forward noising, training targets and loss.

Kept apart from the network (improved-diffusion style). Forward noising and the schedule come from MONAI's
``DDPMScheduler`` (Ho et al. 2020, eq. 4; cosine schedule from Nichol & Dhariwal 2021); v-prediction follows
Salimans & Ho 2022. The SR3 loss (Saharia et al. 2021, eq. 6) is L1 or L2 between the network output and its
target. The *residual* target ``scale * (HR - condition)`` makes the model learn only what interpolation
misses (as residual-diffusion SR methods such as ResShift and SRDiff do); ``plain`` diffuses HR as SR3 does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from medsr.config import DiffusionConfig
from medsr.errors import MedsrError
from medsr.model import denoise
from medsr.turns import Turn, shape_groups, turn, unturn

__all__ = ["make_train_scheduler", "make_sampler", "ddim_timesteps", "ddim_step", "to_target", "from_target",
           "diffusion_loss"]


def make_train_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The forward process used in training (and by the DDPM reference sampler)."""
    if cfg.prediction not in ("epsilon", "v_prediction"):
        raise MedsrError(f"diffusion.prediction must be 'epsilon' or 'v_prediction', got {cfg.prediction!r}")
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
                         prediction_type=cfg.prediction, clip_sample=False)


def make_sampler(cfg: DiffusionConfig, kind: str, steps: int) -> DDPMScheduler | DDIMScheduler:
    """A sampling scheduler that is fed the (projected) clean estimate: ``prediction_type="sample"``.

    The sampling loop converts the network output to x0 itself, applies data consistency, and hands x0 to the
    scheduler, so the same update serves epsilon and v models. DDPM runs all T steps (SR3's sampler, MONAI's
    ``step``); DDIM (Song et al. 2021) runs ``steps`` with eta = 0 (deterministic after the initial noise) on
    :func:`ddim_timesteps`, moving with :func:`ddim_step`; MONAI's scheduler gives the noise schedule.
    """
    if kind == "ddpm":
        sch: DDPMScheduler | DDIMScheduler = DDPMScheduler(
            num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
            prediction_type="sample", clip_sample=False)
        sch.set_timesteps(cfg.num_train_timesteps)
    elif kind == "ddim":
        sch = DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
                            prediction_type="sample", clip_sample=False)
        if not 1 <= steps <= cfg.num_train_timesteps:
            raise MedsrError(f"DDIM steps must be in 1..{cfg.num_train_timesteps}, got {steps}")
        sch.set_timesteps(steps)
        sch.timesteps = ddim_timesteps(cfg.num_train_timesteps, steps)
    else:
        raise MedsrError(f"sampler must be 'ddim' or 'ddpm', got {kind!r}")
    return sch


def ddim_timesteps(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """The timesteps DDIM visits: ``T-1 - floor(k·T/n)`` for k = 0..n-1 ("trailing", Lin et al. 2024).

    Why not MONAI's: ``DDIMScheduler.set_timesteps`` (MONAI 1.4-1.6) spreads the steps evenly from T-1 to 0,
    but its ``step`` always moves x to ``t - T//n``. The two disagree, so every network call after the first
    was told a lower noise level than its input had, and the last call (told t = 0, where x0 ≈ x) passed the
    leftover noise into the output: about sqrt(1 - ᾱ_11) = 0.037 target units per sample at 10 steps, 0.17 at
    5 and 0.96 at 2 (huggingface/diffusers#11347 describes the same mismatch). These steps start at pure noise
    and end within T/n of t = 0 for every n (where n divides T they are exactly where ``step`` lands);
    :func:`ddim_step` moves between them and :func:`medsr.sampling.sample` ends on the last clean estimate.
    """
    k = torch.arange(steps)
    return (num_train_timesteps - 1 - (k * num_train_timesteps) // steps).long()


def ddim_step(x0: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0, Song et al. 2021 eq. 12) from ``t`` to ``t_prev`` given the clean estimate.

    MONAI's ``DDIMScheduler.step`` computes the same update but always to ``t - T//n``; written here so that
    step counts that do not divide T reach ``t_prev`` exactly. ``t_prev < 0`` means ᾱ = 1: the clean estimate.
    """
    if t_prev < 0:
        return x0
    a_t = alphas_cumprod[t].to(x_t.device, x_t.dtype)
    a_prev = alphas_cumprod[t_prev].to(x_t.device, x_t.dtype)
    eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def to_target(hr: torch.Tensor, cond: torch.Tensor, cfg: DiffusionConfig) -> torch.Tensor:
    """What the diffusion runs on: ``scale*(HR - cond)`` (residual) or HR (plain)."""
    if cfg.target == "residual":
        return (hr - cond) * cfg.residual_scale
    if cfg.target == "plain":
        return hr
    raise MedsrError(f"diffusion.target must be 'residual' or 'plain', got {cfg.target!r}")


def from_target(x0: torch.Tensor, cond: torch.Tensor, cfg: DiffusionConfig) -> torch.Tensor:
    """Inverse of :func:`to_target`: the image (normalised units) a clean target stands for."""
    return cond + x0 / cfg.residual_scale if cfg.target == "residual" else x0


def to_clean_estimate(out: torch.Tensor, x_t: torch.Tensor, t: int, cfg: DiffusionConfig,
                      alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x0 from the network output at step t (DDPM eq. 15 for epsilon; Salimans & Ho for v)."""
    a = alphas_cumprod[t].to(x_t.device, x_t.dtype)
    if cfg.prediction == "epsilon":
        return (x_t - (1 - a).sqrt() * out) / a.sqrt()
    return a.sqrt() * x_t - (1 - a).sqrt() * out


def diffusion_loss(
    net: torch.nn.Module,
    scheduler: DDPMScheduler,
    hr: torch.Tensor,
    cond: torch.Tensor,
    cfg: DiffusionConfig,
    generator: torch.Generator | None = None,
    *,
    teacher: torch.nn.Module | None = None,
    focus_timesteps: list[int] | None = None,
    focus_share: float = 0.0,
    teacher_turns: Sequence[Turn] = (),
) -> torch.Tensor:
    """SR3 training loss for a batch ``hr``, ``cond`` of shape ``(B, 1, *spatial)`` in normalised units.

    With ``teacher`` the goal is the teacher's output at the same ``x_t``, ``t`` and condition (distillation):
    its estimate of the clean target, far less noisy a goal than the one truth behind each patch. A share
    ``focus_share`` of the timesteps is drawn from ``focus_timesteps`` (where the sampler evaluates); without
    focus the random draws are exactly those of plain training, so old runs resume bit-for-bit. With
    ``teacher_turns`` (turns the degradation commutes with, :func:`medsr.turns.ensemble_turns`) each item's goal
    is the teacher's output on the item turned by one of them, drawn at random, and turned back.
    """
    x0 = to_target(hr, cond, cfg)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = torch.randint(0, cfg.num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
    if focus_timesteps and focus_share > 0:
        pick = torch.rand(t.shape, generator=generator, device=t.device) < focus_share
        which = torch.randint(0, len(focus_timesteps), t.shape, generator=generator, device=t.device)
        t = torch.where(pick, torch.as_tensor(focus_timesteps, device=t.device)[which], t)
    x_t = scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
    if teacher is not None:
        with torch.no_grad():
            if teacher_turns:
                goal = _turned_teacher(teacher, x_t, cond, t, teacher_turns, generator)
            else:
                goal = denoise(teacher, x_t, cond, t).float()
    else:
        goal = noise if cfg.prediction == "epsilon" else scheduler.get_velocity(x0, noise, t)
    out = denoise(net, x_t, cond, t).float()
    if cfg.loss == "l1":
        return F.l1_loss(out, goal)
    if cfg.loss == "l2":
        return F.mse_loss(out, goal)
    raise MedsrError(f"diffusion.loss must be 'l1' or 'l2', got {cfg.loss!r}")


def _turned_teacher(teacher: torch.nn.Module, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
                    turns: Sequence[Turn], generator: torch.Generator | None) -> torch.Tensor:
    """The teacher's output with each item turned by a random one of ``turns`` and turned back (items whose
    turned planes share a shape go through the teacher together)."""
    picks = torch.randint(0, len(turns), (x_t.shape[0],), generator=generator, device=x_t.device).tolist()
    goal = torch.empty_like(x_t, dtype=torch.float32)
    for ids in shape_groups(x_t.shape, [turns[k] for k in picks]):
        xs = torch.stack([turn(x_t[i], turns[picks[i]]) for i in ids])
        cs = torch.stack([turn(cond[i], turns[picks[i]]) for i in ids])
        out = denoise(teacher, xs, cs, t[ids]).float()
        for n, i in enumerate(ids):
            goal[i] = unturn(out[n], turns[picks[i]])
    return goal
