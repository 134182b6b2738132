"""The benchmark scripts run end to end at ``--tiny`` size and print what they promise (no timing asserts)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--tiny", "--threads", "1", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_train_tiny_prints_throughput_lines() -> None:
    out = _run("bench_train.py", "--device", "cpu")
    assert re.search(r"^machine: cpu=.+, cores=\d+, torch=\S+, threads=1, device=cpu, cuda=none", out, re.M), out
    assert re.search(r"^setup: data=nilearn:mni152 \(real pipeline", out, re.M), out
    for dims in ("2D", "3D"):
        for amp in ("fp32", "bf16"):
            pattern = rf"^{dims} {amp}: [\d.]+ patches/s, [\d.]+ ms/step, data wait [\d.]+% of step time \(patch"
            assert re.search(pattern, out, re.M), out


@pytest.mark.slow
def test_bench_targets_tiny_prints_the_table() -> None:
    out = _run("bench_targets.py", "--device", "cpu")
    assert re.search(r"^setup: diffusion .*; model .*; 4 steps x 2 patches of 32\^2 on nilearn:mni152", out, re.M)
    assert re.search(r"^target\s+held-out scan\s+mean-of-4\s+1-sample\s+bicubic\s+gain$", out, re.M), out
    for target in ("plain", "residual"):
        for scan in ("nibabel:anatomical.nii", "pydicom:MR2_UNCR.dcm"):
            row = rf"^{target}\s+{re.escape(scan)}\s+-?[\d.]+\s+-?[\d.]+\s+-?[\d.]+\s+[+-][\d.]+$"
            assert re.search(row, out, re.M), out
