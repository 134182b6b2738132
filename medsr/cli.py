"""The ``medsr`` command: one subcommand per user task, each a thin call into the library."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from medsr.config import SamplingConfig
from medsr.errors import MedsrError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _fail(exc: MedsrError) -> None:
    from medsr.io.paths import printable

    typer.echo(f"medsr: error: {printable(exc)}", err=True)  # messages may quote header text: no raw escapes
    raise typer.Exit(code=2)


@app.command()
def info(
    path: Path = typer.Argument(..., help="NIfTI file, DICOM file, DICOM series folder, or pydicom:NAME"),
    series_uid: str | None = typer.Option(None, help="choose one series in a folder holding several"),
    volume: int | None = typer.Option(None, "--volume-index", "--volume", help="volume index of a 4D NIfTI"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Print what a scan is (format, modality, shape, spacing, orientation, range, series UID); no patient data."""
    from medsr.io import load_scan
    from medsr.io.describe import describe_scan

    try:
        from medsr.io.refs import resolve_ref

        summary = describe_scan(load_scan(resolve_ref(str(path)), series_uid=series_uid, volume_index=volume))
    except MedsrError as exc:
        _fail(exc)
        return
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        from medsr.io.paths import printable

        width = max(len(k) for k in summary)
        for key, value in summary.items():
            typer.echo(f"{key:<{width}}  {printable(value)}")  # header text may hold terminal escapes


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="YAML config (see configs/)"),
) -> None:
    """Train or resume an SR3 model: medsr train CONFIG [section.key=value ...]. Under torchrun: DDP."""
    from medsr.config import load_config
    from medsr.train import train as run_training

    try:
        result = run_training(load_config(config, list(ctx.args)))
    except MedsrError as exc:
        _fail(exc)
        return
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 writes and reports
    if result.val:
        last = result.val[-1]
        typer.echo(f"step {result.step}: val PSNR {last['sr_psnr']:.2f} dB (interpolation {last['interp_psnr']:.2f})")
    typer.echo(f"checkpoint: {result.checkpoint}")


_SAMPLING = SamplingConfig()  # the defaults every sampling option below shows


_ENHANCE_MODEL_HELP = ("auto (default: chosen per scan from its geometry, see `medsr models`), a shipped model "
                       "name, or a medsr checkpoint path (its degradation decides in-plane or through-plane)")


@app.command()
def enhance(
    inputs: list[Path] = typer.Argument(..., help="scans: NIfTI files, DICOM files or DICOM series folders"),
    model: str = typer.Option("auto", help=_ENHANCE_MODEL_HELP),
    out: Path = typer.Option(Path("medsr_out"), help="output folder; each input gets OUT/NAME/"),
    samples: int = typer.Option(_SAMPLING.samples, help="diffusion samples per scan (mean, std, interval)"),
    steps: int = typer.Option(_SAMPLING.steps, help="DDIM steps per sample (model card: steps/samples study)"),
    sampler: str = typer.Option(_SAMPLING.sampler, help="ddim (fast) or ddpm (all 1000 steps, SR3's reference)"),
    seed: int = typer.Option(_SAMPLING.seed, help="random seed; same seed, same result"),
    device: str = typer.Option(_SAMPLING.device, help="auto, cpu or cuda"),
    amp: str = typer.Option(_SAMPLING.amp, help="autocast: auto (bf16 on CUDA and on CPUs with native bf16), bf16, "
                                                "fp16 or none"),
    save_samples: bool = typer.Option(False, "--save-samples", help="also write every sample (samples.nii.gz)"),
    fmt: str | None = typer.Option(None, "--format", help="nifti, dicom or both (default: both for DICOM input)"),
    projection: bool = typer.Option(_SAMPLING.project, help="data-consistency projection at every step"),
    overlap: float = typer.Option(_SAMPLING.overlap, help="sliding-window overlap, in [0, 1)"),
    self_ensemble: int = typer.Option(_SAMPLING.self_ensemble, help="2D models: spread the samples over up to this "
                                      "many flips/transposes of the input (1, 2, 4 or 8; 1: off)"),
    series_uid: str | None = typer.Option(None, help="series to use in a folder holding several"),
    volume_index: int | None = typer.Option(None, help="volume of a 4D NIfTI to enhance (0-based)"),
    adapt: int = typer.Option(0, help="through-plane jobs: first fine-tune the model for STEPS steps on the scan's "
                                      "own in-plane slices (self-supervised; 0: off)"),
) -> None:
    """Enhance scans: posterior mean, per-voxel std, 5-95% interval, review figure and report per input."""
    from tqdm import tqdm

    from medsr.io import load_scan
    from medsr.io.paths import printable
    from medsr.io.refs import resolve_ref
    from medsr.model_picker import ModelPicker
    from medsr.outputs import plan_destinations, write_outputs
    from medsr.through_plane import enhance_with_choice

    try:
        if fmt not in (None, "nifti", "dicom", "both"):
            raise MedsrError(f"--format must be nifti, dicom or both, got {fmt!r}")
        options = SamplingConfig(samples=samples, steps=steps, sampler=sampler, seed=seed, device=device, amp=amp,
                                 project=projection, overlap=overlap, keep_samples=save_samples,
                                 self_ensemble=self_ensemble)
        picker = ModelPicker(model, device)
        picker.check()  # a bad --model (or a shipped model missing from the install) fails before any scan is read
        sources = [resolve_ref(str(p)) for p in inputs]
        spelled = {Path(src).resolve(): str(text) for src, text in zip(sources, inputs)}  # as the user typed it
        plan = plan_destinations(sources, out)  # one folder per input, never on an input
        for dest in plan:
            if dest.note:
                typer.echo(f"note: {dest.note}", err=True)
        for dest in plan:
            path = dest.source
            scan = load_scan(path, series_uid=series_uid, volume_index=volume_index)
            loaded, choice = picker.pick_for(scan)
            shown = printable(spelled.get(Path(path).resolve(), str(path)))
            typer.echo(f"{shown}: model {printable(choice.name)} ({choice.task}): {printable(choice.reason)}")
            adapted: dict[str, object] | None = None
            if adapt < 0:
                raise MedsrError(f"--adapt STEPS must be >= 0, got {adapt}")
            if adapt and choice.task == "throughplane":
                from medsr.adapt import adapt_model

                loaded, cost = adapt_model(loaded, scan, choice.axis, adapt, seed=seed)
                adapted = {"applied": True, **cost}
                typer.echo(f"{shown}: adapted for {adapt} steps on its own in-plane slices ({cost['seconds']:.1f} s)")
            elif adapt:
                adapted = {"applied": False, "why": "--adapt applies to through-plane jobs only"}
                typer.echo(f"note: {shown}: --adapt not applied (in-plane job)", err=True)
            is_dicom = bool(scan.dicom_headers)
            formats = fmt or ("both" if is_dicom else "nifti")
            with tqdm(total=1, desc=scan.name, unit="step", dynamic_ncols=True) as bar:
                def progress(done: int, total: int) -> None:
                    bar.total = total
                    bar.n = done
                    bar.refresh()

                result = enhance_with_choice(scan, loaded, choice, options, progress)
            if adapted is not None:
                result.info["adapt"] = adapted
            if result.info["calibration"].get("mismatch"):
                typer.echo(f"note: {shown}: interval {result.info['calibration']['mismatch']}", err=True)
            folder = write_outputs(scan, result, loaded, options, out, name=dest.folder.name, formats=formats,
                                   save_samples=save_samples, inputs=sources)
            shown = printable(spelled.get(Path(path).resolve(), str(path)))
            typer.echo(f"{shown} -> {folder} (x{'x'.join(map(str, result.factors))}, 90% interval "
                       f"±{result.score.halfwidth:.3g} {'HU' if scan.modality.upper() == 'CT' else 'units'} "
                       f"({result.score.value:.2f}% of range), {result.timings['total_s']:.1f} s)")
    except MedsrError as exc:
        _fail(exc)


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """List the shipped models: name, task, factors, modalities, calibration and model card."""
    from medsr.model import load_model
    from medsr.runtime import SHIPPED_MODELS

    rows = []
    for entry in SHIPPED_MODELS.values():
        try:
            calibration = (load_model(entry.path).calibration.summary() if entry.path.is_file()
                           else "missing from install")
        except MedsrError as exc:
            calibration = f"unreadable ({exc})"
        rows.append({"name": entry.name, "task": entry.task, "factors": "x".join(map(str, entry.factors)),
                     "modalities": ",".join(entry.modalities), "auto": entry.auto, "calibration": calibration,
                     "card": entry.card, "description": entry.description})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    keys = ["name", "task", "factors", "modalities", "auto", "calibration", "card", "description"]
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    typer.echo("  ".join(f"{k:<{widths[k]}}" for k in keys))
    for r in rows:
        typer.echo("  ".join(f"{str(r[k]):<{widths[k]}}" for k in keys))


@app.command()
def evaluate(
    inputs: list[Path] = typer.Argument(..., help="high-quality scans (the truth): files, folders, pydicom:NAME"),
    model: str = typer.Option("auto", help=_ENHANCE_MODEL_HELP + "; auto chooses from the degraded input"),
    degrade: str = typer.Option(..., help="degradation applied to the truth, e.g. block:4x4 (factors of the model), "
                                          "or thick slices block:1x1x4 (through-plane)"),
    samples: int = typer.Option(_SAMPLING.samples, help="diffusion samples per scan"),
    steps: int = typer.Option(_SAMPLING.steps, help="DDIM steps per sample (model card: steps/samples study)"),
    sampler: str = typer.Option(_SAMPLING.sampler, help="ddim or ddpm"),
    out: Path = typer.Option(Path("medsr_eval"), help="folder for metrics.csv, summary.json and plots"),
    seed: int = typer.Option(_SAMPLING.seed, help="random seed (degradation noise and sampling)"),
    device: str = typer.Option(_SAMPLING.device, help="auto, cpu or cuda"),
    calibration_split: list[Path] = typer.Option([], help="scans used only to fit the spread calibration factor"),
) -> None:
    """Degrade scans whose truth is known, enhance them, and score interpolation, one sample and the mean."""
    from medsr.evaluate import evaluate_scans, format_table, write_evaluation
    from medsr.io import load_scan
    from medsr.io.paths import printable
    from medsr.io.refs import resolve_ref
    from medsr.model_picker import ModelPicker

    try:
        from medsr.degrade import parse_spec

        parse_spec(degrade)  # a bad spec fails before anything slow
        options = SamplingConfig(samples=samples, steps=steps, sampler=sampler, seed=seed, device=device)
        picker = ModelPicker(model, device)
        picker.check()
        scans = [load_scan(resolve_ref(str(p))) for p in inputs]
        calib = [load_scan(resolve_ref(str(p))) for p in calibration_split]
        evaluation = evaluate_scans(scans, picker, degrade, options, calibration_scans=calib)
        write_evaluation(evaluation, out)
    except MedsrError as exc:
        _fail(exc)
        return
    typer.echo(format_table(evaluation))
    for scan_info in evaluation.summary["scans"]:
        choice = scan_info["model_choice"]
        typer.echo(f"{printable(scan_info['name'])}: model {printable(choice['name'])} ({choice['task']}): "
                   f"{printable(choice['reason'])}")
    typer.echo(f"written: {out}/metrics.csv, summary.json, calibration.png, error_vs_uncertainty.png, compare_*.png")


@app.command()
def archive(
    src: str = typer.Argument(..., help="archive folder (every NIfTI file and DICOM series under it is enhanced), "
                                        "or a PACS: dicomweb+http://HOST:PORT/PATH (every listed series)"),
    out: Path = typer.Option(..., "--out", help="output folder: mirrors SRC; holds manifest.sqlite, index.html, logs"),
    model: str | None = typer.Option(None, help=_ENHANCE_MODEL_HELP + " (per item)"),
    samples: int | None = typer.Option(None, help=f"diffusion samples per item (default {_SAMPLING.samples})"),
    steps: int | None = typer.Option(None, help=f"DDIM steps per sample (default {_SAMPLING.steps})"),
    workers: int | None = typer.Option(None, help="worker processes on this machine/rank (default 1)"),
    threads: int | None = typer.Option(None, help="torch threads per worker (default: cores // workers)"),
    seed: int | None = typer.Option(None, help="random seed (default 0)"),
    device: str | None = typer.Option(None, help="auto (GPU LOCAL_RANK under torchrun), cpu, cuda or cuda:N"),
    amp: str | None = typer.Option(None, help="autocast: auto (default; bf16 on CUDA and on CPUs with native bf16), "
                                              "bf16, fp16 or none (float32: the same bits on every engine)"),
    fmt: str | None = typer.Option(None, "--format", help="auto (both for DICOM input), nifti, dicom or both"),
    retry_failed: bool | None = typer.Option(None, "--retry-failed", help="queue failed items again"),
    engine: str | None = typer.Option(None, help="local (worker processes) or dask (dask.distributed cluster)"),
    scheduler: str | None = typer.Option(None, help="dask scheduler tcp://HOST:PORT (default: a local cluster "
                                                    "of --workers processes)"),
    store_back: bool | None = typer.Option(None, "--store-back", help="PACS source: send the enhanced series and "
                                                                      "the uncertainty map back with STOW-RS"),
    credentials: Path | None = typer.Option(None, "--credentials", help="PACS: JSON file with user and password, "
                                            "or token (default: MEDSR_DICOMWEB_* environment variables)"),
    modality: str | None = typer.Option(None, help="PACS: only series of this modality (e.g. CT)"),
    study_date: str | None = typer.Option(None, help="PACS: only studies of this date, YYYYMMDD or a range "
                                                     "YYYYMMDD-YYYYMMDD"),
    series_description: str | None = typer.Option(None, help="PACS: only series whose description matches "
                                                             "(DICOM wildcards * and ?)"),
    config: Path | None = typer.Option(None, help="YAML of ArchiveOptions fields (pipelines/archive.py); flags win"),
) -> None:
    """Enhance a whole archive, resumably: medsr archive SRC --out DST. Shards across torchrun ranks or a dask
    cluster; a PACS can be the source and, with --store-back, the destination."""
    from medsr.model_choice import AUTO
    from medsr.runtime import resolve_model
    from pipelines.archive import format_summary, load_archive_options, run_archive

    try:
        opts = load_archive_options(config, model=model, samples=samples,
                                    steps=steps, workers=workers, threads=threads, seed=seed, device=device,
                                    amp=amp, format=fmt, retry_failed=retry_failed, engine=engine, scheduler=scheduler,
                                    store_back=store_back,
                                    credentials=None if credentials is None else str(credentials),
                                    modality=modality, study_date=study_date, series_description=series_description)
        if opts.model not in ("", AUTO):
            opts.model = str(resolve_model(opts.model))  # a shipped name -> its file (workers get a path)
        opts.model = opts.model or AUTO
        summary = run_archive(src, out, opts)
    except MedsrError as exc:
        _fail(exc)
        return
    typer.echo(format_summary(summary))
