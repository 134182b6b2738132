"""Copy a training run's checkpoint and log into the repository for the next session: compact and consistent.

    python -m pipelines.commit_checkpoint /work/runs/throughplane_x4 pipelines/throughplane_x4

Why: every committed version of a resumable checkpoint stays in git's history at its full size (a submission
over 512 MiB is rejected whole), so each one should be as small as resuming allows. Half of a checkpoint is
Adam's two moments; they are stored here in bfloat16, and ``torch.optim.Optimizer.load_state_dict`` casts them
back to the parameters' float32 on resume (8 mantissa bits: each moment within 0.4%, so Adam's step changes by
well under 1%). The weights (raw and EMA), step, RNG states, config and calibration stay exact. ``log.csv`` comes
along without the rows past the checkpoint's step (a run stopped after its last checkpoint logged steps that
the resume redoes). The run folder is only read; both files are written atomically.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import torch

from medsr.errors import MedsrError
from medsr.io.paths import atomic_path
from medsr.model import load_checkpoint, save_checkpoint
from medsr.train import truncate_log

MOMENTS = ("exp_avg", "exp_avg_sq")


def compact_optimizer(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (an optimizer ``state_dict``) with its float32 Adam moments in bfloat16; the rest as it is."""
    if not state:
        return state
    packed = {index: {k: v.to(torch.bfloat16) if k in MOMENTS and v.dtype == torch.float32 else v
                      for k, v in per_param.items()}
              for index, per_param in state.get("state", {}).items()}
    return {**state, "state": packed}


def commit_checkpoint(run: Path, dest: Path) -> dict[str, Any]:
    """Write ``dest/last.pt`` (compacted ``run/last.pt``) and ``dest/log.csv`` (``run/log.csv`` up to its step)."""
    source = run / "last.pt"
    ckpt = load_checkpoint(source)
    if not ckpt.get("optimizer"):
        raise MedsrError(f"{source}: no optimizer state: not a resumable training checkpoint")
    ckpt["optimizer"] = compact_optimizer(ckpt["optimizer"])
    dest.mkdir(parents=True, exist_ok=True)
    save_checkpoint(dest / "last.pt", {k: v for k, v in ckpt.items() if k != "format"})
    log = run / "log.csv"
    if log.is_file():
        with atomic_path(dest / "log.csv") as tmp:
            shutil.copyfile(log, tmp)
        truncate_log(dest / "log.csv", int(ckpt["step"]))
    return {"step": int(ckpt["step"]), "bytes_before": source.stat().st_size,
            "bytes_after": (dest / "last.pt").stat().st_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the training's out_dir (holds last.pt and log.csv)")
    parser.add_argument("dest", type=Path, help="the repository folder of that model (e.g. pipelines/lowdose_ct)")
    args = parser.parse_args(argv)
    if args.run.resolve() == args.dest.resolve():
        raise SystemExit("run and dest are the same folder: the run's own checkpoint is never rewritten")
    out = commit_checkpoint(args.run, args.dest)
    print(f"step {out['step']}: {out['bytes_before'] / 2**20:.1f} MiB -> {out['bytes_after'] / 2**20:.1f} MiB "
          f"in {args.dest}")


if __name__ == "__main__":
    main()
