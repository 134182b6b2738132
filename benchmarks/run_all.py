"""Run every benchmark and print what each prints: sampling (bench_sampling.py) and training throughput
(bench_train.py, when present); the target comparison (bench_targets.py, trains two models) only with --targets.

    .venv/bin/python benchmarks/run_all.py                 # default sizes (the figures in benchmarks/RESULTS.md)
    .venv/bin/python benchmarks/run_all.py --tiny          # smoke run of each script

Each script runs in its own process, one after the other (never concurrently: they would time each other).
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads for each script (0: torch default)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--model", default=None, help="checkpoint for the sampling benchmark")
    ap.add_argument("--targets", action="store_true", help="also run bench_targets.py (trains two models: long)")
    args = ap.parse_args(argv)
    common = ["--threads", str(args.threads), "--device", args.device] + (["--tiny"] if args.tiny else [])
    plan = [("sampling", "bench_sampling.py", common + (["--model", args.model] if args.model else [])),
            ("training", "bench_train.py", common)]
    if args.targets:
        plan.append(("targets", "bench_targets.py", common))
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    print(f"medsr benchmarks, commit {_commit()}, {stamp}, {'tiny' if args.tiny else 'default'} sizes", flush=True)
    failed = []
    for name, script, extra in plan:
        path = HERE / script
        print(f"\n## {name} ({script})", flush=True)
        if not path.is_file():
            print(f"skipped: {script} not present", flush=True)
            continue
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(path), *extra], cwd=REPO)
        print(f"({script}: {time.perf_counter() - t0:.0f} s, exit {proc.returncode})", flush=True)
        if proc.returncode != 0:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
