"""The sampling loop on a real CT slice with tiny random-weight models: data consistency, per-sample generators,
and no seams from the sliding window (with a naive patch-wise sampler as the positive control)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from enhance_fixtures import count_passes, ct_small, tiny_config, tiny_model, write_tiny_checkpoint
from monai.data.utils import dense_patch_slices

from medsr.config import SamplingConfig
from medsr.degrade import block_average, kspace_truncate, kspace_zero_fill, parse_spec, upsample
from medsr.intensity import fit_normaliser
from medsr.model import LoadedModel, configure_inference, input_layout, load_model
from medsr.sampling import blend_weights, denoise_full, fitted_window, sample


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return tiny_model(tmp_path_factory.mktemp("sampling") / "tiny.pt")


@pytest.fixture(scope="module")
def ct_low() -> torch.Tensor:
    """A 48x48 block of the real CT slice, normalised with the CT window: ``(1, 1, 48, 48)``."""
    scan = ct_small()
    norm = fit_normaliser(scan.array, scan.modality)
    return torch.from_numpy(norm.normalise(scan.array[0, 16:64, 16:64, 0]))[None, None]


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def draw(model: LoadedModel, low: torch.Tensor, seeds: list[int], **kwargs) -> torch.Tensor:  # noqa: ANN003
    spec = parse_spec(model.config.degrade)
    low = low.repeat(len(seeds), 1, 1, 1)
    cond = upsample(low, spec.factors)
    kwargs.setdefault("steps", 3)
    return sample(model.net, model.config.diffusion, cond, gens(*seeds), lowres=low, spec=spec, **kwargs)


# --- data consistency ---------------------------------------------------------------------------------------

def test_projection_makes_every_sample_consistent_with_the_input(model: LoadedModel, ct_low: torch.Tensor) -> None:
    x = draw(model, ct_low, [0, 1, 2], roi_size=(32, 32))
    assert x.shape == (3, 1, 96, 96)
    assert float((block_average(x, (2, 2)) - ct_low).abs().max()) < 1e-5
    assert float(x.std(0).mean()) > 1e-3  # the samples do differ (the check is not trivially met)
    free = draw(model, ct_low, [0, 1, 2], roi_size=(32, 32), project=False)
    assert float((block_average(free, (2, 2)) - ct_low).abs().max()) > 1e-2  # without it, they drift
    first = draw(model, ct_low, [9], roi_size=(32, 32), first_only=True)  # one first step shared by all three
    shared = draw(model, ct_low, [0, 1, 2], roi_size=(32, 32), first=first.repeat(3, 1, 1, 1))
    assert float((block_average(shared, (2, 2)) - ct_low).abs().max()) < 1e-5
    assert float(shared.std(0).mean()) > 1e-3


def test_projection_for_kspace_truncation(tmp_path: Path, ct_low: torch.Tensor) -> None:
    """Consistent with the part of the input the operator can produce: an even crop drops the unpaired Nyquist
    bin (to keep the image real), so a real slice's Nyquist content (here up to 0.025) cannot be matched."""
    m = tiny_model(tmp_path / "k.pt", degrade="kspace:2x2")
    x = draw(m, ct_low, [0, 1], steps=2)
    reachable = kspace_truncate(kspace_zero_fill(ct_low, (2, 2)), (2, 2))
    assert float((kspace_truncate(x, (2, 2)) - reachable).abs().max()) < 1e-5
    assert float((reachable - ct_low).abs().max()) < 0.05


def test_no_projection_for_noisy_operators(tmp_path: Path, ct_low: torch.Tensor) -> None:
    m = tiny_model(tmp_path / "n.pt", degrade="lowdose:2x2,dose=0.25")
    assert not parse_spec(m.config.degrade).has_projection
    x = draw(m, ct_low, [0], steps=2)
    assert torch.isfinite(x).all()
    assert float((block_average(x, (2, 2)) - ct_low).abs().max()) > 1e-3  # noisy input is not reproduced


# --- generators ----------------------------------------------------------------------------------------------

def test_same_generators_same_samples_different_generators_different(model: LoadedModel,
                                                                      ct_low: torch.Tensor) -> None:
    a = draw(model, ct_low, [5, 6], roi_size=(32, 32))
    b = draw(model, ct_low, [5, 6], roi_size=(32, 32))
    c = draw(model, ct_low, [7, 8], roi_size=(32, 32))
    assert torch.equal(a, b)
    assert float((a - c).abs().mean()) > 1e-3
    assert float((a[0] - a[1]).abs().mean()) > 1e-3


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_a_sample_does_not_depend_on_its_batch(tmp_path: Path, ct_low: torch.Tensor, sampler: str) -> None:
    """Sample i drawn in a batch equals sample i drawn alone (DDPM draws fresh noise each step, so this also
    checks that every element uses its own generator). Equal up to float rounding: CPU convolutions are not
    bitwise identical across batch sizes."""
    cfg = tiny_config("block:2x2", (16, 16), "diffusion.num_train_timesteps=12")
    write_tiny_checkpoint(tmp_path / "t12.pt", cfg)
    m = load_model(tmp_path / "t12.pt")
    low = ct_low[..., :16, :16]
    batched = draw(m, low, [10, 11, 12], sampler=sampler, roi_size=(16, 16))
    alone = torch.cat([draw(m, low, [s], sampler=sampler, roi_size=(16, 16)) for s in (10, 11, 12)])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    assert float((batched[0] - batched[1]).abs().mean()) > 1e-3


def test_one_generator_per_batch_element(model: LoadedModel, ct_low: torch.Tensor) -> None:
    spec = parse_spec(model.config.degrade)
    cond = upsample(ct_low.repeat(2, 1, 1, 1), spec.factors)
    with pytest.raises(ValueError, match="one generator per batch element"):
        sample(model.net, model.config.diffusion, cond, gens(0), steps=2)


# --- seams ---------------------------------------------------------------------------------------------------

def border_ratio(x: torch.Tensor, lines: list[int]) -> float:
    """Mean |spatial gradient| across the given grid lines over the mean across other lines of the same kind.

    ``x`` is ``(N, 1, H, H)``; a line ``l`` lies between pixels ``l - 1`` and ``l`` (rows and columns alike).
    Only even lines (between 2x2 blocks of the input) are compared, since odd lines lie inside blocks.
    """
    img = x.mean(0)[0].double()
    grad = ((img[1:] - img[:-1]).abs().mean(1) + (img[:, 1:] - img[:, :-1]).abs().mean(0)).numpy() / 2
    line = np.arange(1, img.shape[0])  # grad[k] is across line k + 1
    border = np.isin(line, lines)
    other = ~border & (line % 2 == 0)
    assert border.any() and other.sum() > 10
    return float(grad[border].mean() / grad[other].mean())


def window_edges(size: int, window: int, overlap: float) -> list[int]:
    """Where MONAI's sliding windows start and end inside the image (the lines a seam would follow)."""
    interval = int(window * (1 - overlap))
    starts = sorted({int(s[0].start) for s in dense_patch_slices((size, size), (window, window), (interval,) * 2)})
    return sorted({e for s in starts for e in (s, s + window) if 0 < e < size})


@pytest.fixture(scope="module")
def seam_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A random net whose output matters (larger output weights): samples get spatially correlated structure."""
    return tiny_model(tmp_path_factory.mktemp("seam") / "seam.pt", out_std=1.0)


@pytest.mark.parametrize("project", [True, False])
def test_sliding_window_sampling_has_no_seams_and_patchwise_sampling_does(
        seam_model: LoadedModel, ct_low: torch.Tensor, project: bool) -> None:
    seeds, window, size = [0, 1, 2, 3], 32, 96
    whole = draw(seam_model, ct_low, seeds, roi_size=None, project=project)
    windowed = draw(seam_model, ct_low, seeds, roi_size=(window, window), overlap=0.25, project=project)
    edges = window_edges(size, window, 0.25)
    assert border_ratio(windowed, edges) < 1.25

    # error against the whole-image sample (same noise) is no larger at the window edges than elsewhere
    err = (windowed - whole).abs().mean((0, 1)).double()
    near = torch.zeros(size, dtype=torch.bool)
    for e in edges:
        near[e - 1:e + 1] = True
    at_edges = (err[near].mean() + err[:, near].mean()) / 2
    inside = err[~near][:, ~near].mean()
    assert float(at_edges) < 1.3 * float(inside)

    # the naive alternative: sample each non-overlapping window on its own and stitch them
    naive = torch.empty_like(whole)
    for k, (i, j) in enumerate((i, j) for i in range(0, size, window) for j in range(0, size, window)):
        tile = ct_low[..., i // 2:(i + window) // 2, j // 2:(j + window) // 2]
        naive[..., i:i + window, j:j + window] = draw(seam_model, tile, [100 * k + s for s in seeds], project=project)
    tiles = list(range(window, size, window))
    assert border_ratio(naive, tiles) > 1.5  # the measure does see seams where there are some
    assert border_ratio(windowed, tiles) < 1.25


# --- faster passes (issue 13): same outputs, no seams at the default overlap on the shipped model ---------------

SHIPPED = Path(__file__).resolve().parents[1] / "medsr" / "weights" / "default_x4.pt"


@pytest.fixture(scope="module")
def shipped() -> LoadedModel:
    return load_model(SHIPPED)


def test_load_model_gives_the_fast_layout_and_it_matches_v01s(shipped: LoadedModel) -> None:
    net = shipped.net
    sdpa = [m for m in net.modules() if hasattr(m, "use_flash_attention")]
    assert sdpa and all(m.use_flash_attention for m in sdpa)
    assert input_layout(net) == torch.channels_last
    scan = ct_small()
    norm = fit_normaliser(scan.array, scan.modality)
    img = torch.from_numpy(norm.normalise(scan.array[0, 32:96, 32:96, 0]))[None, None]
    z = torch.cat([torch.randn(img.shape, generator=torch.Generator().manual_seed(0)), img], 1)
    t = torch.tensor([600])
    with torch.no_grad():
        fast = net(z.contiguous(memory_format=torch.channels_last), timesteps=t)
        configure_inference(net, fast=False)
        try:
            assert input_layout(net) == torch.contiguous_format and not any(m.use_flash_attention for m in sdpa)
            slow = net(z, timesteps=t)
        finally:
            configure_inference(net, fast=True)
    assert float(fast.abs().max()) > 0.1  # a real output, not zeros
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-4)


@pytest.mark.parametrize("width", [48, 24])  # 24: narrower than the window, which is fitted to it
def test_precomputed_blend_map_is_monais(model: LoadedModel, ct_low: torch.Tensor, width: int) -> None:
    spec = parse_spec(model.config.degrade)
    cond = upsample(ct_low[..., : width // 2], spec.factors)
    x_t = torch.randn(cond.shape, generator=torch.Generator().manual_seed(3))
    roi = fitted_window((32, 32), cond.shape[2:], model.net)
    assert roi == (32, min(32, width))
    weights = blend_weights(roi, cond.device)
    assert weights is not None and weights.shape == (1, 1, *roi)
    with pytest.raises(ValueError, match="fitted window") if width < 32 else contextlib.nullcontext():
        denoise_full(model.net, x_t, cond, 500, (32, 32), weights=blend_weights((32, 32), cond.device))
    mine = denoise_full(model.net, x_t, cond, 500, (32, 32), overlap=0.125, weights=weights)
    monai = denoise_full(model.net, x_t, cond, 500, (32, 32), overlap=0.125)
    assert mine.shape == (1, 1, 96, width)
    torch.testing.assert_close(mine, monai, rtol=0, atol=1e-6)


def test_an_image_smaller_than_the_window_is_padded_only_to_divisibility(model: LoadedModel,
                                                                         ct_low: torch.Tensor) -> None:
    """An image whose width the UNet's levels do not divide, under 64² or 128² windows: the network runs once on
    the image padded to the next multiple, not on a window of repeated edge noise, so the window size no longer
    changes the result."""
    m = 2 ** (len(model.net.block_out_channels) - 1)
    width = 6 * m + m // 2
    spec = parse_spec(model.config.degrade)
    cond = upsample(ct_low, spec.factors)[..., :40, :width]
    x_t = torch.randn(cond.shape, generator=torch.Generator().manual_seed(4))
    shapes: list[tuple[int, ...]] = []
    hook = model.net.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape[2:])))
    try:
        with torch.no_grad():
            small = denoise_full(model.net, x_t, cond, 500, (64, 64))
            large = denoise_full(model.net, x_t, cond, 500, (128, 128))
    finally:
        hook.remove()
    assert shapes == [(40, 7 * m), (40, 7 * m)]
    assert small.shape == cond.shape
    torch.testing.assert_close(small, large, rtol=0, atol=0)
    # what that window is: the image with its edge columns replicated (MONAI's split), cropped back
    front = (m - m // 2) // 2
    z = torch.nn.functional.pad(torch.cat([x_t, cond], 1), (front, m - m // 2 - front, 0, 0), mode="replicate")
    with torch.no_grad():
        direct = model.net(z, timesteps=torch.full((1,), 500))[..., front:front + width]
    assert float((small - direct).abs().max()) < 1e-5 and float(small.abs().max()) > 0.01


def _edge_error(model: LoadedModel, size: int, overlap: float) -> tuple[float, float, float, float]:
    """Sliding windows of 64² vs the whole image as one window on a real CT (same noise, 2 DDIM steps): max
    |difference|, mean |difference| within 2 voxels of window edges over elsewhere, and the gradient ratio across
    the window edges (:func:`border_ratio`) of the windowed result and of the whole-image one (no windows at all:
    what the anatomy alone gives at those lines)."""
    scan = ct_small()
    norm = fit_normaliser(scan.array, scan.modality)
    n = size // 4
    o = 64 - n // 2
    low = torch.from_numpy(norm.normalise(scan.array[0, o:o + n, o:o + n, 0]))[None, None]
    whole = draw(model, low, [0], steps=2, roi_size=None)
    windowed = draw(model, low, [0], steps=2, roi_size=(64, 64), overlap=overlap)
    err = (windowed - whole).abs()[0, 0].double()
    edges = window_edges(size, 64, overlap)
    near = torch.zeros(size, dtype=torch.bool)
    for e in edges:
        near[e - 2:e + 2] = True
    at_edges = (err[near].mean() + err[:, near].mean()) / 2
    return (float(err.max()), float(at_edges / err[~near][:, ~near].mean()), border_ratio(windowed, edges),
            border_ratio(whole, edges))


def test_default_overlap_has_no_seams_on_the_shipped_model(shipped: LoadedModel) -> None:
    """120² (two 64² windows per axis overlapping by 8 voxels at the default 0.125) vs one 120² window.

    Measured with the distilled default (session 9): max |difference| 0.059 (60 HU), edge/elsewhere error 2.1,
    gradient across the window edges 1.17x elsewhere where the whole-image result has 1.32x there (anatomy); with
    no overlap at all (128², windows meeting edge to edge) the edge error is 4.4x elsewhere and the gradient 1.58x
    (whole image 1.38x): a seam. (v0.1's weights: 0.083, 2.4, 1.14x vs 1.28x; without overlap 5.3x and 2.12x vs
    1.35x: its windows disagreed more, so its seams were stronger.)"""
    overlap = SamplingConfig().overlap
    assert window_edges(120, 64, overlap) == [56, 64]  # the default really overlaps by 8 voxels here
    worst, edge_err, grad, grad_whole = _edge_error(shipped, 120, overlap)
    assert worst < 0.1  # normalised units: 102 HU at most (CT window 2048 HU)
    assert grad < 1.05 * grad_whole  # no step in intensity where windows meet, beyond what the anatomy has there
    _, edge_err_none, grad_none, grad_whole_none = _edge_error(shipped, 128, 0.0)  # control: no blending
    assert edge_err < 0.75 * edge_err_none
    assert grad_none > 1.1 * grad_whole_none  # the measure does see a seam where there is one
    assert grad / grad_whole < grad_none / grad_whole_none - 0.15  # and blending takes it away


# --- DDIM visits the noise levels it says it does -------------------------------------------------------------------

class _GaussianOracle(torch.nn.Module):
    """The exact v-prediction for a target that is white Gaussian N(0, s²) per voxel: the Bayes-optimal denoiser,
    in closed form, so the sampler alone decides what comes out."""

    def __init__(self, s: float, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.s, self.alphas = s, alphas_cumprod.double()

    def forward(self, z: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        x_t = z[:, :1].double()
        a = self.alphas[timesteps].reshape(-1, 1, 1, 1)
        x0 = a.sqrt() * self.s ** 2 / (a * self.s ** 2 + 1 - a) * x_t  # E[x0 | x_t]
        return ((a.sqrt() * x_t - x0) / (1 - a).sqrt()).float()


def test_ddim_with_the_exact_denoiser_never_adds_noise_and_converges_to_the_data() -> None:
    """With the Bayes-optimal denoiser of N(0, s²) data, DDIM's samples contract towards the mean at few steps and
    reach the data's spread as steps grow: their std rises with the step count and never exceeds s.

    Fails for MONAI's own DDIM timesteps (evenly spaced 999..0 while ``step`` jumps T//n): each call is told a
    lower noise level than its input has and the last one passes the leftover noise out (std 0.96 at 2 steps).
    """
    from medsr.config import DiffusionConfig
    from medsr.diffusion import make_train_scheduler

    s = 0.3
    cfg = DiffusionConfig(prediction="v_prediction", target="plain")
    net = _GaussianOracle(s, make_train_scheduler(cfg).alphas_cumprod)
    cond = torch.zeros(4, 1, 64, 64)
    stds = []
    for steps in (1, 2, 3, 5, 7, 10, 20, 50, 128, 600, 1000):  # 7, 128, 600 do not divide T = 1000
        x = sample(net, cfg, cond, [torch.Generator().manual_seed(i) for i in range(4)], steps=steps, project=False)
        stds.append(float(x.std()))
    assert all(v <= s * 1.01 for v in stds), stds
    assert all(b >= a - 1e-3 for a, b in zip(stds, stds[1:])), stds
    assert stds[0] < 0.01 and stds[-2] == pytest.approx(s, rel=0.02) and stds[-1] == pytest.approx(s, rel=0.02)


def test_ddim_visits_where_monais_step_lands_and_reaches_t0_for_every_step_count() -> None:
    """Where n divides T, each visited timestep is where MONAI's own ``step`` moves x (and our update equals
    it); for every n the steps start at pure noise and the last one is within T/n of t = 0 (no truncated run)."""
    from medsr.config import DiffusionConfig
    from medsr.diffusion import ddim_step, make_sampler

    for steps in range(1, 1001):
        ts = [int(t) for t in make_sampler(DiffusionConfig(), "ddim", steps).timesteps]
        assert ts[0] == 999 and len(set(ts)) == steps and ts == sorted(ts, reverse=True)
        assert ts[-1] < 1000 / steps, (steps, ts[-1])
    for steps in (2, 5, 10):
        sch = make_sampler(DiffusionConfig(), "ddim", steps)
        ts = [int(t) for t in sch.timesteps]
        x, x0 = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
        for t, t_next in zip(ts, ts[1:]):
            assert t_next == t - 1000 // steps
            torch.testing.assert_close(ddim_step(x0, x, t, t_next, sch.alphas_cumprod), sch.step(x0, t, x)[0])


# --- a first step shared by an image's samples ------------------------------------------------------------------

def test_a_shared_first_step_samples_as_the_exact_denoiser_does() -> None:
    """With the Bayes-optimal denoiser of N(0, s²) data, sharing the first step's clean estimate (made from one
    noise draw) changes each sample by less than 1% of the data's std, and samples keep their spread."""
    from medsr.config import DiffusionConfig
    from medsr.diffusion import make_train_scheduler

    s = 0.3
    cfg = DiffusionConfig(prediction="v_prediction", target="plain")
    net = _GaussianOracle(s, make_train_scheduler(cfg).alphas_cumprod)
    cond = torch.zeros(4, 1, 32, 32)
    for steps in (2, 3, 10):
        own = sample(net, cfg, cond, gens(0, 1, 2, 3), steps=steps, project=False)
        first = sample(net, cfg, cond[:1], gens(99), steps=steps, project=False, first_only=True)
        shared = sample(net, cfg, cond, gens(0, 1, 2, 3), steps=steps, project=False, first=first.repeat(4, 1, 1, 1))
        assert float((shared - own).abs().max()) < 0.01 * s, steps
        assert float(shared.std()) == pytest.approx(float(own.std()), rel=0.02)
        assert float((shared[0] - shared[1]).abs().mean()) > 0.1 * s  # each sample keeps its own noise


def test_a_shared_first_step_is_refused_for_ddpm_and_a_wrong_shape(model: LoadedModel, ct_low: torch.Tensor) -> None:
    spec = parse_spec(model.config.degrade)
    cond = upsample(ct_low, spec.factors)
    with pytest.raises(ValueError, match="DDIM"):
        sample(model.net, model.config.diffusion, cond, gens(1), sampler="ddpm", first=cond)
    with pytest.raises(ValueError, match="does not match"):
        sample(model.net, model.config.diffusion, cond, gens(1), first=cond[..., :8])


def test_enhance_with_a_shared_first_step_makes_one_first_pass_per_slice_and_ignores_chunking(
        model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """1 + samples x (steps - 1) image passes per slice instead of samples x steps; the same result whatever the
    batch size; samples still differ; and with sharing off, exactly the old passes."""
    from medsr.enhance import enhance_scan

    scan = ct_small()
    scan = scan.with_array(scan.array[:, 32:56, 32:56])
    passes = count_passes(monkeypatch)
    opt = SamplingConfig(samples=4, steps=3, device="cpu", amp="none", keep_samples=True, share_first_step=True)
    a = enhance_scan(scan, model, opt)
    assert sum(passes) == 1 + 4 * 2
    passes.clear()
    b = enhance_scan(scan, model, SamplingConfig(**{**opt.__dict__, "batch_size": 2}))
    assert sum(passes) == 1 + 4 * 2
    assert a.samples is not None and b.samples is not None
    np.testing.assert_allclose(a.samples, b.samples, atol=1e-3)
    assert float(np.abs(a.samples[0] - a.samples[1]).mean()) > 1.0  # HU: samples differ
    passes.clear()
    enhance_scan(scan, model, SamplingConfig(**{**opt.__dict__, "share_first_step": False}))
    assert sum(passes) == 4 * 3
