"""Calibrate the shipped model's uncertainty on held-out real scans, split by scan, and measure it.

    python -m pipelines.calibrate_default_model [--model medsr/weights/default_x4.pt] [--export OUT.pt]

Every held-out scan of ``shared/DATA.md`` (never a training file) is cropped to a central region, degraded with
the model's own operator, enhanced (the sampling defaults, 8 samples x 2 DDIM steps with the first step shared;
one thread) and cached under ``--cache`` (``/work/runs/calib_cache``) so reruns only redo the statistics. The
scans are split **by scan**, per modality, into a calibration split (λ is fitted there) and a reporting split
(coverage, width, ranking are measured there); a leave-one-scan-out table reports every scan with λ fitted on
the other scans of its modality. The single-factor v0.1 method is measured side by side. Prints markdown tables
and writes ``calibration_study.json``; ``--export`` writes the model with the new calibration stored.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsr.degrade import DegradeSpec
from medsr.enhance import EnhanceOptions, enhance_scan
from medsr.evaluate import degrade_scan
from medsr.io.paths import atomic_path
from medsr.io.refs import load_ref
from medsr.io.scan import Scan
from medsr.model import LoadedModel, load_model
from medsr.noise_floor import fine_noise_sigma
from medsr.turns import ensemble_turns
from medsr.uncertainty import (
    BASES,
    Calibration,
    ModelCalibration,
    calibrate_scale,
    coverage,
    coverage_by_quartile,
    interval,
    normalised_scores,
    patch_means,
    pooled_scale,
    spearman,
)
from pipelines.model_card_study import centre_crop

PATCH = 8  # in-plane patch of the per-patch rank correlation, as in medsr.evaluate
INIA19 = "/usr/share/mricron/templates/inia19-t1-brain.nii.gz"


@dataclass(frozen=True)
class HeldOut:
    """One held-out scan: where it comes from, its modality, which Z slices to use and the in-plane crop."""

    name: str
    ref: str
    modality: str
    slices: tuple[int, ...] | None = None  # None: all
    crop: int = 256


HELD_OUT = (
    HeldOut("bad_sequence", "pydicom:bad_sequence.dcm", "CT"),
    HeldOut("eCT_Supplemental", "pydicom:eCT_Supplemental.dcm", "CT"),
    HeldOut("CT_small", "pydicom:CT_small.dcm", "CT"),
    HeldOut("MR2_UNCR", "pydicom:MR2_UNCR.dcm", "MR"),
    HeldOut("inia19", INIA19, "MR", slices=(40, 60, 80)),
    HeldOut("MR_small", "pydicom:MR_small.dcm", "MR"),
    HeldOut("anatomical", "nibabel:anatomical.nii", "MR", slices=(6, 9, 12, 15, 18)),
)
# split by scan within each modality: lambda is fitted on CALIBRATION, everything else reports
CALIBRATION = ("bad_sequence", "eCT_Supplemental", "MR2_UNCR", "inia19")


def slice_scan(scan: Scan, z: int) -> Scan:
    """Axial slice ``z`` of a volume as a one-slice scan (affine shifted so geometry stays right)."""
    shift = np.eye(4)
    shift[2, 3] = z
    return scan.with_array(scan.array[..., z:z + 1], scan.affine @ shift)


def weights_id(model: LoadedModel) -> str:
    """A short hash of the network weights (not of the file: re-exporting with a new calibration keeps the cache)."""
    h = hashlib.sha256()
    for key, value in sorted(model.net.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().half().numpy().tobytes())
    return h.hexdigest()[:8]


def sampler_tag(share_first_step: bool, turns: int = 1) -> str:
    """The sampler part of a cache key: "tt" DDIM on the trailing timesteps (medsr.diffusion.ddim_timesteps;
    older caches differ), "sf" the same with the first step shared by an image's samples; "-e<n>" when the
    samples were spread over n turns of the input (self-ensemble) (:func:`medsr.turns.ensemble_turns`)."""
    return ("sf" if share_first_step else "tt") + (f"-e{turns}" if turns > 1 else "")


def cache_glob(samples: int, steps: int, share_first_step: bool = False, turns: int = 1) -> str:
    """The cache files of :func:`enhance_cached` made with ``samples`` x ``steps`` on the current sampler."""
    return f"*-s{samples}-k{steps}-c*-{sampler_tag(share_first_step, turns)}.npz"


def ensemble_size(model: LoadedModel, opt: EnhanceOptions) -> int:
    """How many turns of the input ``opt`` spreads this model's samples over."""
    return len(ensemble_turns(model.degradation, opt.self_ensemble, opt.samples))


def enhance_cached(item: HeldOut, model: LoadedModel, opt: EnhanceOptions, cache: Path) -> dict[str, np.ndarray]:
    """Truth, degraded input and the samples (all normalised with the truth's normaliser) for every slice of
    ``item``, and each slice's intensity range.

    Slices are concatenated along Z. Cached as ``cache/NAME-<weights id>-s<samples>-k<steps>-c<crop>-<sampler>.npz``
    (:func:`sampler_tag`).
    A low-dose model's input is simulated on the whole slice (attenuation and streaks come from all of it) and
    cropped after; other degradations crop first (``-ld`` in the key tells the two apart).
    """
    whole_slice = model.degradation.kind == "lowdose"
    key = (f"{item.name}-{weights_id(model)}-s{opt.samples}-k{opt.steps}-c{item.crop}-"
           f"{sampler_tag(opt.shares_first_step, ensemble_size(model, opt))}{'-ld' if whole_slice else ''}")
    path = cache / f"{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    scan = load_ref(item.ref, item.modality)
    parts = [slice_scan(scan, z) for z in item.slices] if item.slices else [scan]
    truths, lows, samples = [], [], []
    lo_hi = []
    for part in parts:
        if whole_slice:
            deg = degrade_scan(part, model.config.degrade, model.config.intensity, slice_axis=2, seed=0)
            low, truth = centre_crop(deg.low, item.crop), centre_crop(deg.truth, item.crop)
            truth_norm, low_norm = deg.norm.normalise(truth.array[0]), deg.norm.normalise(low.array[0])
        else:
            deg = degrade_scan(centre_crop(part, item.crop), model.config.degrade, model.config.intensity,
                               slice_axis=2, seed=0)
            low, truth_norm, low_norm = deg.low, deg.truth_norm, deg.low_norm
        res = enhance_scan(low, model, replace(opt, keep_samples=True, slice_axis=2))
        assert res.samples is not None
        truths.append(truth_norm)
        lows.append(low_norm)
        samples.append(deg.norm.normalise(res.samples))
        lo_hi.append((deg.norm.lo, deg.norm.hi))
    out = {"truth": np.concatenate(truths, axis=-1), "samples": np.concatenate(samples, axis=-1),
           "range": np.asarray([hi - lo for lo, hi in lo_hi], np.float64)}
    if whole_slice:  # a block input lives on the coarse grid: slices of different crops do not concatenate
        out["low"] = np.concatenate(lows, axis=-1)
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **out)  # type: ignore[arg-type]
    return out


@dataclass
class ScanStats:
    """One held-out scan reduced to what calibration needs (body voxels, normalised units)."""

    name: str
    modality: str
    truth: np.ndarray
    mean: np.ndarray
    std: np.ndarray  # raw sample std
    q_lo: np.ndarray  # raw empirical 5% / 95% quantiles of the samples
    q_hi: np.ndarray
    body: np.ndarray
    half_range: float  # scan units per normalised unit (HU for CT)
    samples: int  # diffusion samples per voxel behind mean and std
    noise: np.ndarray  # (1, 1, Z): the truth's white noise implied by each slice's input (medsr.noise_floor)
    sampling: dict[str, float]  # DDIM steps and shared first step of the samples (recorded with a fitted λ)

    def spread(self, basis: str) -> np.ndarray:
        return np.sqrt(self.std**2 + self.noise**2) if basis == "std_noise" else self.std

    def scores(self, basis: str) -> np.ndarray:
        spread = self.spread(basis)
        lo, hi = (self.mean - spread, self.mean + spread) if basis != "quantile" else (self.q_lo, self.q_hi)
        return normalised_scores(self.truth, self.mean, lo, hi)[self.body]

    def bounds(self, cal: Calibration) -> tuple[np.ndarray, np.ndarray]:
        if cal.basis != "quantile":
            spread = self.spread(cal.basis)
            return self.mean - cal.scale * spread, self.mean + cal.scale * spread
        return self.mean + cal.scale * (self.q_lo - self.mean), self.mean + cal.scale * (self.q_hi - self.mean)


def scan_stats(name: str, modality: str, data: dict[str, np.ndarray], threshold: float, spec: DegradeSpec,
               opt: EnhanceOptions, samples: int | None = None) -> ScanStats:
    """``data`` (from :func:`enhance_cached` with ``opt``) reduced to what calibration needs; ``samples``: only the
    first so many samples (the sample-count study)."""
    x = torch.from_numpy(data["samples"][:samples] if samples else data["samples"]).float()
    mean, std = x.mean(0), x.std(0)
    lo, hi, _ = interval(mean, std, x)  # raw: what enhance computes before calibration
    truth = data["truth"]
    low = spec.forward(torch.from_numpy(truth).movedim(-1, 0)[:, None])  # each slice's input, as enhance saw it
    noise = fine_noise_sigma(low, spec).numpy().reshape(1, 1, -1) if spec.white_noise_gain else np.zeros((1, 1, 1))
    return ScanStats(name, modality, truth, mean.numpy(), std.numpy(), lo.numpy(), hi.numpy(), truth > threshold,
                     float(np.mean(data["range"])) / 2.0, int(x.shape[0]), noise,
                     {"steps": float(opt.steps), "shared_first_step": float(opt.shares_first_step),
                      "self_ensemble": float(len(ensemble_turns(spec, opt.self_ensemble, int(x.shape[0]))))})


def measure(s: ScanStats, cal: Calibration) -> dict[str, Any]:
    """Coverage, width (scan units and % of range), coverage by width quartile, per-patch Spearman, error."""
    lo, hi = s.bounds(cal)
    half = 0.5 * (hi - lo)[s.body]
    patch = [PATCH, PATCH, 1]
    keep = patch_means(s.body.astype(np.float32), patch) >= 0.5
    rho = spearman(patch_means(s.std, patch)[keep], patch_means(np.abs(s.mean - s.truth), patch)[keep])
    return {"coverage": coverage(s.truth, lo, hi, s.body), "halfwidth": float(half.mean()) * s.half_range,
            "halfwidth_pct": 50.0 * float(half.mean()), "quartiles": coverage_by_quartile(s.truth, lo, hi, s.body),
            "spearman_patch": rho, "abs_error_pct": 50.0 * float(np.abs(s.mean - s.truth)[s.body].mean()),
            "voxels": int(s.body.sum())}


def fit(stats: list[ScanStats], basis: str) -> Calibration:
    """λ per the issue-12 procedure on these scans (one unit per scan): RCPS/CRC when n allows, else empirical."""
    f = calibrate_scale([s.scores(basis) for s in stats])
    scale, guarantee = f.choose()
    return Calibration(scale, basis, f.alpha, f.delta, guarantee, f.n, tuple(s.name for s in stats),
                       {"empirical": f.empirical, "crc": f.crc, "rcps": f.rcps, "hoeffding_slack": f.hoeffding_slack,
                        "crc_min_n": f.crc_min_n, "rcps_min_n": f.rcps_min_n,
                        "samples": float(stats[0].samples), **stats[0].sampling})


def group(s: ScanStats) -> str:
    return "CT" if s.modality == "CT" else "MR"


def study(stats: list[ScanStats], v01: float) -> dict[str, Any]:
    """All methods on the reporting split and leave-one-scan-out; returns the tables as a dict."""
    calib = [s for s in stats if s.name in CALIBRATION]
    report = [s for s in stats if s.name not in CALIBRATION]
    methods: dict[str, dict[str, Calibration]] = {
        "raw 5-95% (uncalibrated)": {g: Calibration(1.0, "quantile") for g in ("CT", "MR")},
        f"v0.1 single factor {v01:g}": {g: Calibration(v01, "quantile") for g in ("CT", "MR")},
        "single factor refit (pooled voxels, all modalities)": {
            g: Calibration(pooled_scale([s.scores("quantile") for s in calib]), "quantile") for g in ("CT", "MR")},
    }
    for basis in BASES:
        methods[f"per-scan risk, per modality, basis {basis}"] = {
            g: fit([s for s in calib if group(s) == g], basis) for g in ("CT", "MR")}
    out: dict[str, Any] = {"calibration_split": [s.name for s in calib], "reporting_split": [s.name for s in report],
                           "methods": {}}
    for label, cals in methods.items():
        rows = {s.name: measure(s, cals[group(s)]) for s in report}
        loo = {}
        for s in stats:  # leave one scan out: λ from the other scans of the same modality
            others = [o for o in stats if group(o) == group(s) and o is not s]
            if label.startswith("per-scan"):
                cal = fit(others, cals[group(s)].basis)
            elif label.startswith("single factor refit"):
                cal = Calibration(pooled_scale([o.scores("quantile") for o in stats if o is not s]), "quantile")
            else:
                cal = cals[group(s)]
            loo[s.name] = measure(s, cal)
        pooled_in = sum(r["coverage"] * r["voxels"] for r in rows.values()) / sum(r["voxels"] for r in rows.values())
        out["methods"][label] = {"calibration": {g: c.to_dict() for g, c in cals.items()}, "report": rows,
                                 "pooled_coverage": pooled_in, "loo": loo,
                                 "loo_pooled_coverage": sum(r["coverage"] * r["voxels"] for r in loo.values())
                                 / sum(r["voxels"] for r in loo.values()),
                                 "spearman_across_scans_loo": spearman([r["halfwidth_pct"] for r in loo.values()],
                                                                       [r["abs_error_pct"] for r in loo.values()])}
    return out


def spread_diagnostics(name: str, data: dict[str, np.ndarray], threshold: float) -> dict[str, Any]:
    """How far the per-patch Spearman target is from this model's spread, per scan.

    ``spearman_patch``: per-patch std vs |error of the mean| (as :func:`measure`). ``spearman_if_calibrated``:
    the same when the truth is one of the samples (each in turn; mean and std of the others): what a model whose
    samples are exchangeable with the truth would reach with this spread pattern. ``rmse_over_std``: RMS error
    of the mean over the RMS sample std inside the body (≈1 for such a model).
    """
    x, truth = data["samples"].astype(np.float64), data["truth"].astype(np.float64)
    body = truth > threshold
    patch = [PATCH, PATCH, 1]
    keep = patch_means(body.astype(np.float32), patch) >= 0.5

    def rho(samples: np.ndarray, target: np.ndarray) -> float:
        mean, std = samples.mean(0), samples.std(0, ddof=1)
        return spearman(patch_means(std, patch)[keep], patch_means(np.abs(mean - target), patch)[keep])

    oracle = float(np.mean([rho(np.delete(x, k, 0), x[k]) for k in range(len(x))]))
    rmse = float(np.sqrt(((x.mean(0) - truth)[body] ** 2).mean()))
    return {"spearman_patch": rho(x, truth), "spearman_if_calibrated": oracle,
            "rmse_over_std": rmse / float(np.sqrt((x.std(0, ddof=1)[body] ** 2).mean())),
            "patches": int(keep.sum()), "name": name}


def print_tables(result: dict[str, Any], stats: list[ScanStats]) -> None:
    units = {s.name: ("HU" if s.modality == "CT" else "% range") for s in stats}
    for split in ("report", "loo"):
        print(f"\n### {'reporting split' if split == 'report' else 'leave one scan out (all scans)'}\n")
        print("| method | scan | coverage 90% | mean half-width | half-width % range | coverage by width quartile "
              "| Spearman per patch |")
        print("|---|---|---|---|---|---|---|")
        for label, m in result["methods"].items():
            for name, r in m[split].items():
                hw = f"{r['halfwidth']:.1f} HU" if units[name] == "HU" else f"{r['halfwidth_pct']:.2f} %"
                q = " / ".join(f"{v:.2f}" for v in r["quartiles"])
                print(f"| {label} | {name} | {r['coverage']:.3f} | {hw} | {r['halfwidth_pct']:.2f} | {q} "
                      f"| {r['spearman_patch']:.2f} |")
            pooled = m["pooled_coverage"] if split == "report" else m["loo_pooled_coverage"]
            print(f"| {label} | **pooled** | **{pooled:.3f}** | | | | |")
    print("\nSpearman across scans (score = mean calibrated half-width % vs mean |error| %, LOO λ):")
    for label, m in result["methods"].items():
        print(f"  {label}: {m['spearman_across_scans_loo']:.2f}")
    print("\n### per-patch Spearman: this model vs one whose samples are exchangeable with the truth\n")
    print("| scan | patches | Spearman per patch | if calibrated (a sample as truth) | RMS error / RMS std |")
    print("|---|---|---|---|---|")
    for d in result["spread"]:
        print(f"| {d['name']} | {d['patches']} | {d['spearman_patch']:.2f} | {d['spearman_if_calibrated']:.2f} "
              f"| {d['rmse_over_std']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="medsr/weights/default_x4.pt")
    parser.add_argument("--cache", default="/work/runs/calib_cache")
    parser.add_argument("--out", default="runs/calibration_study")
    parser.add_argument("--samples", type=int, default=EnhanceOptions().samples)
    parser.add_argument("--steps", type=int, default=EnhanceOptions().steps)
    parser.add_argument("--crop", type=int, default=0, help="in-plane crop of every scan (default: each scan's own, "
                        "256); smaller is faster on a CPU")
    parser.add_argument("--only-cache", action="store_true")
    parser.add_argument("--export", default=None, help="write the chosen calibration (JSON) here, for "
                        "pipelines.export_default_model --calibration-json")
    parser.add_argument("--basis", default="std_noise", choices=list(BASES))
    parser.add_argument("--share-first-step", action=argparse.BooleanOptionalAction,
                        default=EnhanceOptions().share_first_step,
                        help="one first DDIM step per image, shared by its samples")
    parser.add_argument("--self-ensemble", type=int, default=EnhanceOptions().self_ensemble,
                        help="spread the samples over up to this many flips/transposes of the input (1: off)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    opt = EnhanceOptions(samples=args.samples, steps=args.steps, seed=0, device="cpu",
                         share_first_step=args.share_first_step, self_ensemble=args.self_ensemble)
    data: dict[str, dict[str, Any]] = {}
    for item in HELD_OUT:
        item = replace(item, crop=args.crop) if args.crop else item
        t = time.perf_counter()
        data[item.name] = enhance_cached(item, model, opt, Path(args.cache))
        print(f"{item.name}: {data[item.name]['truth'].shape} in {time.perf_counter() - t:.1f} s", flush=True)
    if args.only_cache:
        return
    threshold = model.config.data.foreground_threshold
    modality = {h.name: h.modality for h in HELD_OUT}
    spec = model.degradation
    stats = [scan_stats(n, modality[n], d, threshold, spec, opt) for n, d in data.items()]
    v01 = 5.269
    result = study(stats, v01)
    result["spread"] = [spread_diagnostics(n, d, threshold) for n, d in data.items()]
    result["samples_study"] = {}
    for n_samples in (4, 8):  # sample-count honesty: the same procedure with fewer samples per voxel
        sub = [scan_stats(n, modality[n], d, threshold, spec, opt, n_samples) for n, d in data.items()]
        r = study(sub, v01)["methods"]
        result["samples_study"][n_samples] = {
            k: {"pooled": v["pooled_coverage"], "loo_pooled": v["loo_pooled_coverage"],
                "loo_per_scan": {s: x["coverage"] for s, x in v["loo"].items()},
                "loo_halfwidth_pct": {s: x["halfwidth_pct"] for s, x in v["loo"].items()}} for k, v in r.items()}
    print_tables(result, stats)
    print(json.dumps(result["samples_study"], indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "calibration_study.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=lambda v: None))
    if args.export:
        chosen = result["methods"][f"per-scan risk, per modality, basis {args.basis}"]["calibration"]
        cal = ModelCalibration({g: Calibration.from_dict(c) for g, c in chosen.items()})
        print(json.dumps(cal.to_checkpoint(), indent=1))
        with atomic_path(Path(args.export)) as tmp:
            tmp.write_text(json.dumps(cal.to_checkpoint(), indent=2))


if __name__ == "__main__":
    main()
