"""The ``medsr`` command: one subcommand per user task, each a thin call into the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from medsr.errors import MedsrError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _fail(exc: MedsrError) -> None:
    typer.echo(f"medsr: error: {exc}", err=True)
    raise typer.Exit(code=2)


@app.command()
def info(
    path: Path = typer.Argument(..., help="NIfTI file, DICOM file, or folder holding a DICOM series"),
    series_uid: Optional[str] = typer.Option(None, help="choose one series in a folder holding several"),
    volume: Optional[int] = typer.Option(None, help="volume index of a 4D NIfTI"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Print what a scan is (format, modality, shape, spacing, orientation, range, series UID); no patient data."""
    from medsr.io import load_scan
    from medsr.io.describe import describe_scan

    try:
        summary = describe_scan(load_scan(path, series_uid=series_uid, volume_index=volume))
    except MedsrError as exc:
        _fail(exc)
        return
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            typer.echo(f"{key:<{width}}  {value}")


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
    if result.val:
        last = result.val[-1]
        typer.echo(f"step {result.step}: val PSNR {last['sr_psnr']:.2f} dB (interpolation {last['interp_psnr']:.2f})")
    typer.echo(f"checkpoint: {result.checkpoint}")


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="medsr")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
