"""The through-plane x4 model card: held-out volumes made thick, scored against cubic, with and without --adapt.

    python -m pipelines.throughplane_card CHECKPOINT [--samples 8 --steps 2 --adapt 20 --crop 48]

CHECKPOINT is a training checkpoint or an exported model (``medsr/weights/throughplane_x4.pt``). Every scan is a
held-out one of ``shared/DATA.md`` (never a training file):

- MR volumes (``nibabel:anatomical.nii``, the ``inia19`` template, centre-cropped) made thick by a block average of
  4 thin slices along one array axis (the last one and a non-last one), enhanced by the through-plane route
  :func:`medsr.evaluate.evaluate_scans` takes for thick slices (both orientations pooled, projected), and scored
  against cubic interpolation along the thick axis with the same centring;
- CT: no held-out CT *volume* ships (``shared/DATA.md``: the held-out CT scans are slices), so CT rows are 2D
  slices made thick along one image axis (``block:1x4``: what each plane through a thick CT volume looks like)
  and enhanced in that one plane (one orientation; the only plane that contains the thick axis).

With ``--adapt N`` each volume is scored again after :func:`medsr.adapt.adapt_model` fine-tuned a copy for N steps
on the thick input's own in-plane slices (2D rows cannot adapt: a slice has no in-plane images across its thick
axis). Time and peak memory of an enhancement are measured in a fresh process on a real ``T x T x S`` → ``T x T x
4S`` volume and extrapolated linearly in voxels x network passes (:meth:`medsr.config.SamplingConfig.passes`) to
256 x 256 x 40 → 256 x 256 x 160.

Writes the card (``--card``, default ``medsr/weights/THROUGHPLANE_X4_CARD.md``) and the numbers (``--json``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsr.adapt import adapt_model
from medsr.config import SamplingConfig
from medsr.degrade import parse_spec
from medsr.enhance import EnhanceOptions
from medsr.evaluate import degrade_scan, evaluate_scans, thick_slice_axis
from medsr.io.paths import atomic_path
from medsr.io.refs import load_ref
from medsr.io.scan import Scan, crop_scan
from medsr.model import LoadedModel, load_model
from medsr.model_choice import ModelChoice
from medsr.through_plane import enhance_with_choice
from pipelines.calibrate_default_model import CALIBRATION, INIA19

DEFAULTS = SamplingConfig()  # what `medsr enhance` runs unless told otherwise
ROOT = Path(__file__).resolve().parents[1]
TARGET_DB = 2.0  # the target: >= +2 dB over cubic on every held-out volume
TIMING_FULL = (256, 256, 40)  # the thick volume (-> 256 x 256 x 160)


@dataclass(frozen=True)
class Case:
    """One held-out scan made thick: the degradation says along which array axis (3D) or image axis (2D)."""

    name: str
    ref: str
    modality: str
    spec: str
    crop: int | None = None  # centred cube (3D) or square (2D) of at most this many voxels per axis


TEMPLATE_CROP = 48  # the template's default centred crop; ``--crop`` replaces it

CASES = (
    Case("anatomical", "nibabel:anatomical.nii", "MR", "block:1x1x4"),
    Case("anatomical", "nibabel:anatomical.nii", "MR", "block:4x1x1"),
    Case("inia19", INIA19, "MR", "block:1x1x4", TEMPLATE_CROP),
    Case("inia19", INIA19, "MR", "block:1x4x1", TEMPLATE_CROP),
    Case("CT_small", "pydicom:CT_small.dcm", "CT", "block:1x4", 128),
    Case("bad_sequence", "pydicom:bad_sequence.dcm", "CT", "block:1x4", 128),
)


VOLUMES = tuple(c for c in CASES if parse_spec(c.spec).spatial_dims == 3)  # the MR volumes (CT rows are slices)


def with_template_crop(case: Case, crop: int) -> Case:
    """``case`` with the template's crop replaced by ``crop`` (other cases keep theirs)."""
    return replace(case, crop=crop) if case.crop == TEMPLATE_CROP else case


def centre(scan: Scan, size: int | None) -> Scan:
    """A centred crop of at most ``size`` voxels along every axis longer than one (affine kept right)."""
    if not size:
        return scan
    shape = scan.spatial_shape
    sizes = [min(size, n) for n in shape]
    return crop_scan(scan, [(n - s) // 2 for n, s in zip(shape, sizes)], sizes)


def mirrored_to(scan: Scan, shape: tuple[int, int, int]) -> Scan:
    """``scan`` mirrored at its borders out to at least ``shape`` (for timings: their cost depends on the grid, not
    on the anatomy; the affine is kept, so the padded voxels' positions are not meant to be read)."""
    missing = [max(0, want - have) for want, have in zip(shape, scan.spatial_shape)]
    if not any(missing):
        return scan
    pad = [(0, 0)] + [(m // 2, m - m // 2) for m in missing]
    return scan.with_array(np.pad(scan.array, pad, mode="symmetric"), scan.affine)


def score(scan: Scan, model: LoadedModel, case: Case, opt: EnhanceOptions) -> dict[str, float]:
    """PSNR/SSIM (normalised units, range 2) of cubic and of the posterior mean, and the coverage, mean half-width
    and per-patch Spearman(std, |error|) of the pooled calibrated interval inside the body, from
    :mod:`medsr.evaluate`."""
    ev = evaluate_scans([scan], model, case.spec, opt)
    rows = {r["method"]: r for r in ev.rows}
    info = ev.summary["scans"][0]
    return {"cubic_psnr": rows["interpolation"]["psnr"], "cubic_ssim": rows["interpolation"]["ssim"],
            "mean_psnr": rows["mean"]["psnr"], "mean_ssim": rows["mean"]["ssim"],
            "gain_db": rows["mean"]["psnr"] - rows["interpolation"]["psnr"],
            "consistency_mae": rows["mean"]["consistency_mae"], "enhance_s": info["enhance_s"],
            **{k: rows["mean"][k] for k in ("coverage_90_body", "halfwidth_body_pct", "spearman_std_error")},
            "shape": info["shape"], "input_shape": info["input_shape"], "interpolation": info["interpolation"]}


def run_case(case: Case, model: LoadedModel, opt: EnhanceOptions, adapt_steps: int) -> dict[str, Any]:
    scan = centre(load_ref(case.ref, case.modality), case.crop)
    out: dict[str, Any] = {"scan": case.name, "modality": case.modality, "degradation": case.spec,
                           "calibration_split": case.name in CALIBRATION, **score(scan, model, case, opt)}
    thick = thick_slice_axis(parse_spec(case.spec))
    out["thick_axis"] = thick if thick is not None else 1
    if adapt_steps and thick is not None:
        deg = degrade_scan(scan, case.spec, model.config.intensity, None, opt.seed)
        adapted, cost = adapt_model(model, deg.low, thick, adapt_steps, seed=opt.seed)
        out["adapt"] = {**score(scan, adapted, case, opt), "steps": adapt_steps, "seconds": cost["seconds"],
                        "first_loss": cost["first_loss"], "last_loss": cost["last_loss"]}
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (Linux; ``ru_maxrss`` is inherited from the parent across
    fork + exec, so a child started by a big process would report the parent's peak), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timing(checkpoint: str, size: int, slices: int, samples: int, steps: int) -> dict[str, Any]:
    """Enhance a real thick volume (inia19 cropped to size x size x 4 slices, mirrored at its borders where it is
    smaller, e.g. 168 x 206 x 128 -> 256 x 256 x 160, then block-averaged x4 along Z) in this process; wall time
    and peak RSS (call in a fresh process: :func:`timing_subprocess`)."""
    torch.set_num_threads(1)
    rss0 = peak_rss_mb()
    model = load_model(checkpoint)
    hr = centre(load_ref(INIA19, "MR"), max(size, 4 * slices))
    hr = crop_scan(hr, [0, 0, 0], [size, size, 4 * slices])
    hr = mirrored_to(hr, (size, size, 4 * slices))
    low = degrade_scan(hr, "block:1x1x4", model.config.intensity, None, 0).low
    rss_loaded = peak_rss_mb()
    choice = ModelChoice("checkpoint", "throughplane", 2, 4, "timing")
    opt = SamplingConfig(samples=samples, steps=steps, device="cpu", amp="auto")
    t0 = time.perf_counter()
    result = enhance_with_choice(low, model, choice, opt)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    return {"input": list(low.spatial_shape), "output": list(result.mean.spatial_shape), "samples": samples,
            "steps": steps, "seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": rss0,
            "rss_loaded_mb": rss_loaded, "amp": result.info["amp"]}


def timing_subprocess(checkpoint: str, size: int, slices: int, samples: int, steps: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pipelines.throughplane_card", checkpoint, "--timing-only", "--timing-size",
           str(size), "--timing-slices", str(slices), "--samples", str(samples), "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    fine = np.prod(measured["output"])
    full_fine = TIMING_FULL[0] * TIMING_FULL[1] * TIMING_FULL[2] * 4
    ratio = full_fine / fine
    passes = SamplingConfig(samples=samples, steps=steps).passes(groups=2)  # two orientations
    per = measured["seconds"] / (fine * passes)
    delta = max(0.0, measured["peak_rss_mb"] - measured["rss_loaded_mb"])
    measured["extrapolated"] = {
        "voxel_ratio": float(ratio),
        "seconds_same_settings": float(per * full_fine * passes),
        "seconds_defaults": float(per * full_fine * DEFAULTS.passes(groups=2)),
        "peak_rss_mb": float(measured["rss_loaded_mb"] + delta * ratio),
    }
    return measured


def _f(v: float | None, d: int = 2) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{d}f}"


def write_card(path: Path, result: dict[str, Any]) -> None:
    rows = result["cases"]
    s = result["settings"]
    met = all(r["gain_db"] >= TARGET_DB for r in rows)
    met_adapt = all(r.get("adapt", r)["gain_db"] >= TARGET_DB for r in rows)
    at_defaults = s["samples"] == DEFAULTS.samples and s["steps"] == DEFAULTS.steps
    lines = [
        "# Model card: throughplane_x4 (thick slices made thin, x4 along one axis)",
        "",
        f"Generated by `python -m pipelines.throughplane_card {result['checkpoint_arg']}` "
        f"({result['date']}); numbers in `{result['json']}`. Re-run it on a new checkpoint to refresh this card.",
        "",
        "## Model",
        f"- checkpoint: `{result['model']['path']}`, training step **{result['model']['step']}**, "
        f"sha256 `{result['model']['sha256'][:16]}`",
        f"- degradation it undoes: `{result['model']['degrade']}` (block average of 4 thin slices; box slice profile)",
        "- 2D SR3 (48-96-96 UNet, v-prediction on the residual over cubic), applied on the two families of planes "
        "that contain the thick axis; all samples of both orientations pooled into one mean and spread; "
        "data-consistency projection at every step (`medsr/through_plane.py`)",
        "- training data (shared/DATA.md training files only): MNI152 T1 template, InVesalius head CT, "
        "pydicom 693_UNCR CT slice; config `configs/throughplane_x4.yaml`",
        "- calibration (per modality; `python -m pipelines.calibrate_default_model` at the settings in "
        f"`pipelines/throughplane_x4/ship.sh`, the sampling defaults ({DEFAULTS.samples} samples x {DEFAULTS.steps} "
        f"steps{', first step shared' if DEFAULTS.shares_first_step else ''}, each plane family's samples spread "
        "over the 4 flips of its planes) on 64² crops, on the DATA.md "
        "calibration split, "
        "each scan made thick along one image axis): "
        f"{result['model']['calibration']}",
        "",
        "## Quality on held-out scans made thick (target: >= +2 dB over cubic on every held-out volume)",
        "",
        f"Settings (CPU, one thread, shared machine): {s['samples']} samples x {s['steps']} DDIM steps "
        f"({'first step shared per orientation' if DEFAULTS.share_first_step and s['steps'] > 1 else 'no sharing'}; "
        f"{'samples spread over the 4 flips of the planes' if DEFAULTS.self_ensemble > 1 else 'no self-ensemble'}), "
        f"`--adapt {s['adapt']}` (lr 1e-4, batch 8), MR volumes centre-cropped to at most {s['crop']} voxels per axis "
        "where marked, CT slices to 128 x 128. PSNR/SSIM in normalised units (the truth's normaliser, data range 2), "
        "whole volume; cubic = cubic interpolation along the thick axis, fine slices centred in each thick slice "
        "(the same grid as the output).",
        "",
        "| scan | modality | made thick | truth shape | cubic PSNR / SSIM | medsr mean PSNR / SSIM | gain dB | "
        "after --adapt PSNR / SSIM | gain dB | adapt s | >= +2 dB | coverage 90% | half-width % range | "
        "Spearman per patch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a = r.get("adapt")
        what = (f"{r['degradation']} (axis {r['thick_axis']})" if len(r["degradation"].split(":")[1].split("x")) == 3
                else f"{r['degradation']} (2D slice, image axis 1)")
        mark = " (calibration split)" if r["calibration_split"] else ""
        adapt_cells = (f"{_f(a['mean_psnr'])} / {_f(a['mean_ssim'], 3)} | {a['gain_db']:+.2f} | {a['seconds']:.0f}"
                       if a else "n/a (2D) | | ")
        best = max(r["gain_db"], a["gain_db"] if a else -np.inf)
        lines.append(f"| {r['scan']}{mark} | {r['modality']} | {what} | {'x'.join(map(str, r['shape']))} | "
                     f"{_f(r['cubic_psnr'])} / {_f(r['cubic_ssim'], 3)} | {_f(r['mean_psnr'])} / "
                     f"{_f(r['mean_ssim'], 3)} | {r['gain_db']:+.2f} | {adapt_cells} | "
                     f"{'yes' if best >= TARGET_DB else 'no'} | {_f(r.get('coverage_90_body'), 3)} | "
                     f"{_f(r.get('halfwidth_body_pct'))} | {_f(r.get('spearman_std_error'))} |")
    lines += [
        "",
        f"**Target met without adaptation: {'yes' if met else 'NO'}; with adaptation: {'yes' if met_adapt else 'NO'}** "
        f"(min gain {min(r['gain_db'] for r in rows):+.2f} dB; "
        f"mean gain {np.mean([r['gain_db'] for r in rows]):+.2f} dB).",
        "",
        "Mean consistency |A(mean) - input| (normalised): "
        + ", ".join(f"{r['scan']} {r['degradation']}: {r['consistency_mae']:.1e}" for r in rows) + ".",
        "",
        "No held-out CT *volume* ships offline (shared/DATA.md: held-out CT are single slices and a 2-frame "
        "image), so CT is scored on 2D slices made thick along one image axis; the MR volumes include thick "
        "axes that are not the last array axis.",
        "",
    ]
    t = result.get("timing")
    if t:
        e = t["extrapolated"]
        lines += [
            "## Time and peak memory",
            "",
            f"Measured in a fresh process (one thread, `amp={t['amp']}`, this loaded 2-core CPU): "
            f"{'x'.join(map(str, t['input']))} -> {'x'.join(map(str, t['output']))}, {t['samples']} samples x "
            f"{t['steps']} steps: **{t['seconds']:.0f} s**, peak RSS **{t['peak_rss_mb']:.0f} MB** "
            f"({t['rss_loaded_mb']:.0f} MB after loading the model and the scan).",
            "",
            f"256 x 256 x 40 -> 256 x 256 x 160 is {e['voxel_ratio']:.0f}x the output voxels. Extrapolated linearly "
            f"(voxels x network passes; not measured): {e['seconds_same_settings'] / 60:.0f} min at the same "
            f"settings, **{e['seconds_defaults'] / 3600:.1f} h at the defaults ({DEFAULTS.samples} samples x "
            f"{DEFAULTS.steps} steps{', first step shared' if DEFAULTS.shares_first_step else ''})** on this CPU; "
            f"peak RSS about {e['peak_rss_mb'] / 1024:.1f} GB (the volumes held grow with the voxels; the network's "
            "sliding windows do not). The full size measured directly (`benchmarks/bench_throughplane_volume.py`, "
            "figures in `benchmarks/RESULTS.md`) replaces this estimate where they differ.",
            "",
        ]
    lines += [
        "## Alternatives",
        "",
        "- **3D SR3 (`spatial_dims=3`, `configs/sr3d_throughplane_x4.yaml`)**: not compared here. On this 2-core CPU "
        "shared with other jobs a 3D UNet step on 3D patches costs several times the 2D model's (already "
        "2-8 s/step), so even a tiny 3D model could not be trained to a comparable point within this session; "
        "the comparison needs a GPU.",
        "- **Cubic + data-consistency projection (no network)**: measured in "
        "`pipelines/throughplane_x4/README.md` on anatomical.nii (+0.12 dB over cubic there).",
        "",
        "## Limits",
        "",
        f"- Few scans (shared/DATA.md: {len({r['scan'] for r in rows})} held-out scans here), few samples and steps: "
        "the numbers are indicative, not a benchmark.",
        "- The model is the checkpoint named above; a longer-trained one must be re-scored with the command above.",
        "- The calibration was fitted on single-orientation samples (each calibration slice made thick along one "
        "image axis); the pooled through-plane spread also holds the orientations' disagreement. The coverage "
        "column measures the pooled interval on the held-out volumes (body voxels, the model's stored λ; "
        "nominal 0.90)" + ("." if at_defaults else "; at these settings, not the calibration settings, so it "
                           "is indicative only."),
        "",
    ]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--samples", type=int, default=DEFAULTS.samples)
    parser.add_argument("--steps", type=int, default=DEFAULTS.steps)
    parser.add_argument("--adapt", type=int, default=20, help="--adapt steps (0: no adaptation rows)")
    parser.add_argument("--crop", type=int, default=TEMPLATE_CROP, help="MR template crop (voxels per axis)")
    parser.add_argument("--timing-size", type=int, default=64)
    parser.add_argument("--timing-slices", type=int, default=10)
    parser.add_argument("--timing-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--only", action="append", default=[], help="score only these scans (repeatable)")
    parser.add_argument("--card", default=str(ROOT / "medsr" / "weights" / "THROUGHPLANE_X4_CARD.md"))
    parser.add_argument("--json", default="runs/throughplane_card.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.timing_only:
        print(json.dumps(timing(args.checkpoint, args.timing_size, args.timing_slices, args.samples, args.steps)))
        return
    model = load_model(args.checkpoint)
    opt = EnhanceOptions(samples=args.samples, steps=args.steps, seed=0, device="cpu", amp="auto")
    cases = [with_template_crop(c, args.crop) for c in CASES if not args.only or c.name in args.only]
    out: list[dict[str, Any]] = []
    for case in cases:
        t = time.perf_counter()
        out.append(run_case(case, model, opt, args.adapt))
        r = out[-1]
        print(f"{case.name} {case.spec}: cubic {r['cubic_psnr']:.2f}, mean {r['mean_psnr']:.2f} ({r['gain_db']:+.2f})"
              + (f", adapted {r['adapt']['mean_psnr']:.2f} ({r['adapt']['gain_db']:+.2f})" if "adapt" in r else "")
              + f" in {time.perf_counter() - t:.0f} s", flush=True)
    result: dict[str, Any] = {
        "checkpoint_arg": args.checkpoint, "date": time.strftime("%Y-%m-%d"), "json": args.json,
        "model": {"path": model.path, "step": model.step, "sha256": model.sha256, "degrade": model.config.degrade,
                  "calibration": model.calibration.summary()},
        "settings": {"samples": args.samples, "steps": args.steps, "adapt": args.adapt, "crop": args.crop},
        "cases": out, "target_db": TARGET_DB,
    }
    if not args.no_timing:
        result["timing"] = timing_subprocess(args.checkpoint, args.timing_size, args.timing_slices,
                                             min(args.samples, 2), 1)
        print(json.dumps(result["timing"]), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(args.json)) as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=float))
    write_card(Path(args.card), result)
    print(f"written: {args.card}, {args.json}")


if __name__ == "__main__":
    main()
