"""benchmarks/bench_sampling.py and run_all.py run end to end at --tiny size and print what they promise.

No timing asserts: only that every section prints its line with numbers in it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NUM = r"-?[\d.]+(?:e[+-]?\d+)?"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--tiny", "--threads", "1",
                           "--device", "cpu", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


SAMPLING_LINES = [
    r"^machine: cpu=.+, cores=\d+, torch=\S+, threads=1, device=cpu, cuda=none, cpu_bf16=(yes|no), load=",
    r"^setup: model=random weights, tiny architecture; degrade block:4x4, .*window \[32, 32\]",
    rf"^\(a\) scan: pydicom:CT_small.dcm crop 32x32x1 \(1024 voxels\), block:4x4; bicubic PSNR {NUM} dB",
    rf"^sampler ddim \(4 steps, 3 samples\): {NUM} voxels/s \({NUM} voxel-samples/s\), {NUM} s, PSNR of mean {NUM} dB",
    rf"^sampler ddpm \(100 steps, 2 samples\): {NUM} voxels/s .*PSNR of mean {NUM} dB",
    rf"^sampler speed-up per sample: ddim 4 steps is {NUM}x ddpm 100 steps",
    rf"^overhead: sampling step {NUM} ms vs bare network {NUM} ms on the same 18 windows \(\d+ network calls\): "
    rf"ratio (?P<ratio>{NUM}), target <= 1.10: (?P<verdict>met|not met)$",
    rf"^samples: 3 batched {NUM} s vs one after another {NUM} s: {NUM}x, max \|difference\| of means {NUM}",
    rf"^network alone: {NUM} ms per window one at a time vs {NUM} ms in batches of 3: {NUM}x, the ceiling",
    rf"^memory: 32 slices \(output 32x32x32\): peak RSS growth {NUM} MiB, output arrays 0.5 MiB",
    rf"^memory: 64 slices \(output 32x32x64\): peak RSS growth {NUM} MiB, output arrays 1.0 MiB",
    rf"^memory: from 32 to 64 slices growth rose {NUM} MiB for 0.5 MiB more output arrays",
    rf"^amp fp32: {NUM} s, PSNR of mean {NUM} dB",
    rf"^amp bf16: {NUM} s \({NUM}x fp32 speed\), PSNR of mean {NUM} dB, difference [+-]{NUM} dB",
]


@pytest.mark.slow
def test_bench_sampling_tiny_prints_every_section() -> None:
    out = _run("bench_sampling.py")
    for pattern in SAMPLING_LINES:
        assert re.search(pattern, out, re.M), (pattern, out)
    overhead = re.search(SAMPLING_LINES[6], out, re.M)
    assert overhead is not None
    # the verdict must follow from the printed ratio (whichever it is on this machine)
    assert (overhead["verdict"] == "met") == (float(overhead["ratio"]) <= 1.10), overhead.group(0)


@pytest.mark.slow
def test_run_all_tiny_runs_each_benchmark() -> None:
    out = _run("run_all.py")
    assert re.search(r"^medsr benchmarks, commit \S+, .+, tiny sizes$", out, re.M), out
    assert "## sampling (bench_sampling.py)" in out and "## training (bench_train.py)" in out
    assert re.search(r"^\(bench_sampling.py: \d+ s, exit 0\)$", out, re.M), out
    assert re.search(r"^\(bench_train.py: \d+ s, exit 0\)$", out, re.M), out
    assert re.search(rf"^2D fp32: {NUM} patches/s", out, re.M), out
    assert re.search(r"^overhead: sampling step", out, re.M), out
    assert "failed:" not in out


SPEED_LINES = [
    r"^setup: model=random weights, tiny architecture; degrade block:4x4, window \[16, 16\], new overlap 0.125, "
    r"v0.1 overlap 0.25",
    rf"^\(1\) pass v0.1: 64x64 image, window 16x16 overlap 0.25: 25 windows \(1.56x the image's voxels\), {NUM} s "
    rf"\({NUM} s CPU\) per sample-step, attention {NUM}% of it",
    rf"^\(1\) pass new: 64x64 image, window 16x16 overlap 0.125: 25 windows \(1.56x the image's voxels\), {NUM} s",
    rf"^\(2\) batching: 2 samples x 2 steps batched {NUM} s \({NUM} s CPU\) vs one after another {NUM} s "
    rf"\({NUM} s CPU\): {NUM}x wall, {NUM}x CPU, max \|difference\| of means {NUM}",
    rf"^CT_small.dcm 32² +bicubic +- +- +- +- +- +{NUM} +{NUM}$",
    rf"^CT_small.dcm 32² +v0.1 +10 +{NUM} +{NUM} +1.00x +1.00x +{NUM} +{NUM}$",
    rf"^CT_small.dcm 32² +new +1 +{NUM} +{NUM} +{NUM}x +{NUM}x +{NUM} +{NUM}$",
    rf"^CT_small.dcm 32² +new +2 +{NUM} +{NUM} +{NUM}x +{NUM}x +{NUM} +{NUM}$",
    rf"^bad_sequence.dcm 32² +v0.1 +10 +{NUM} ",
    rf"^bad_sequence.dcm 32² +new +2 +{NUM} ",
    rf"^bad_sequence.dcm 32² +new sf(?: \(dflt\))? +2 +{NUM} +{NUM} +{NUM}x +{NUM}x +{NUM} +{NUM}$",
]


@pytest.mark.slow
def test_bench_speed_tiny_prints_the_table() -> None:
    out = _run("bench_speed.py", "--samples", "2", "--steps", "1,2", "--shared-steps", "2")
    for pattern in SPEED_LINES:
        assert re.search(pattern, out, re.M), (pattern, out)


@pytest.mark.slow
def test_bench_throughplane_volume_measures_the_asked_grid_even_beyond_the_scan(tmp_path: Path) -> None:
    """The held-out volume (168 x 206 x 128) is mirrored out to the asked in-plane size; the line says the grid.
    A tiny random through-plane model keeps it quick (the shipped one is what the benchmark is for)."""
    from enhance_fixtures import tiny_config, write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "tiny tp.pt", tiny_config("block:1x4", (16, 16)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_throughplane_volume.py"), "--size", "176",
                           "--slices", "2", "--samples", "2", "--model", str(ckpt)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^through-plane x4: 176x176x2 -> 176x176x8, 2 samples x 2 DDIM steps \(first step shared\) "
                     r"= 4 network passes", out, re.M), out
    assert re.search(rf"^wall {NUM} s \({NUM} min\), {NUM} output voxels/s, peak RSS {NUM} MB", out, re.M), out


@pytest.mark.slow
def test_bench_inplane_volume_enhances_the_asked_volume_and_reports_throughput() -> None:
    """The shipped default model on a small crop of the held-out volume: the grid grows 4x in-plane only, the pass
    count is the cost model's, and throughput and memory are printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_inplane_volume.py"), "--size", "16",
                           "--slices", "3", "--samples", "3"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^in-plane x4: 16x16x3 -> 64x64x3, 3 samples x 2 DDIM steps \(first step shared\) = 4 network "
                     r"passes per slice", out, re.M), out
    assert re.search(rf"^wall {NUM} s \({NUM} min\), CPU {NUM} s, {NUM} output voxels/s \({NUM} per CPU second\), "
                     rf"peak RSS {NUM} MB", out, re.M), out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["output"] == [64, 64, 3] and result["passes_per_slice"] == 4
