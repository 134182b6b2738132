"""Archive at scale, measured on a small real archive with a tiny model, every figure from this one run:

(a) throughput: items per minute of ``medsr archive --engine dask`` with a LocalCluster of 1 and of 2 worker
    processes (1 torch thread each), wall time of the run's work loop (cluster start included) and with the
    cluster start left out (first result to last);
(b) memory: peak resident memory of each dask worker process during the run (sampled every 0.2 s);
(c) manifest overhead: the main process's SQLite work per item (claim + finish + store of transfer time),
    timed on a manifest of the same size, next to the time an item takes to enhance;
(d) DICOMweb transfer per item: the same series served by a private Orthanc (its DICOMweb plugin, in a network
    namespace of its own), fetched by WADO-RS into the cache (``transfer_s`` in the manifest), and the
    store-back (QIDO-RS check + STOW-RS) per item, from the run's log timestamps.

    .venv/bin/python benchmarks/bench_archive.py            # ~5-10 minutes on 2 shared CPU cores

The whole benchmark runs inside ``unshare -rn`` (loopback only), so Orthanc and the dask cluster are unreachable
from outside. Numbers from a busy machine say little: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "io")]


def _archive(src: Path, n_series: int) -> list[Path]:
    """``n_series`` real CT series (8 slices of 32 x 24, the InVesalius head CT, shifted crops) under ``src``."""
    import numpy as np
    from iodata import load_cranium_crop, write_ct_series

    hu = load_cranium_crop()
    files = []
    for k in range(n_series):
        shifted = np.roll(hu, shift=k, axis=2)  # distinct pixel data, same real anatomy
        paths, _ = write_ct_series(src / f"series{k:02d}", shifted, description=f"bench {k}")
        files += paths
    return files


class _PeakRss:
    """Peak RSS of this process's spawned children (the dask workers), sampled in a thread."""

    def __init__(self) -> None:
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            for p in me.children(recursive=True):
                try:
                    if "spawn_main" in " ".join(p.cmdline()):
                        self.peak[p.pid] = max(self.peak.get(p.pid, 0), p.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.2)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _rows(dst: Path) -> list[dict[str, Any]]:
    import sqlite3

    with sqlite3.connect(dst / "manifest.sqlite") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM items")]


def _span(rows: list[dict[str, Any]]) -> float:
    """First start to last finish (s): the work with the cluster start left out."""
    from datetime import datetime

    starts = [datetime.fromisoformat(r["started"]) for r in rows if r["started"]]
    ends = [datetime.fromisoformat(r["finished"]) for r in rows if r["finished"]]
    return (max(ends) - min(starts)).total_seconds()


def _manifest_overhead(n: int, work: Path) -> float:
    """Mean seconds of the main process's manifest work per item (claim, finish, transfer) on n items."""
    from pipelines.discover import Item
    from pipelines.manifest import Manifest

    m = Manifest(work / "overhead.sqlite")
    m.add_items([Item(f"dicom:{k}", "dicom", [f"s{k}/a.dcm"], series_uid=str(k), out_parts=(f"s{k}",))
                 for k in range(n)])
    t0 = time.perf_counter()
    for k in range(n):
        m.claim(f"dicom:{k}", "bench")
        m.finish(f"dicom:{k}", "done", seconds=1.0, score=0.1)
        m.set_transfer(f"dicom:{k}", 0.1)
    per = (time.perf_counter() - t0) / n
    m.close()
    return per


def _bench(work: Path, n_series: int, samples: int, steps: int) -> dict[str, Any]:
    import torch
    from enhance_fixtures import tiny_config, write_tiny_checkpoint
    from pacs_fixtures import start_orthanc, stop_orthanc

    from pipelines.archive import ArchiveOptions, run_archive

    torch.set_num_threads(1)
    model = write_tiny_checkpoint(work / "tiny.pt", tiny_config())
    src = work / "src"
    files = _archive(src, n_series)
    out: dict[str, Any] = {"items": n_series, "slices_per_item": 8, "samples": samples, "steps": steps,
                           "cores": os.cpu_count(), "load_before": os.getloadavg()[0]}

    def opts(**kw: Any) -> ArchiveOptions:
        return ArchiveOptions(model=str(model), samples=samples, steps=steps, device="cpu", amp="none", threads=1,
                              progress=False, **kw)

    for n in (1, 2):
        dst = work / f"dask{n}"
        with _PeakRss() as rss:
            summary = run_archive(src, dst, opts(engine="dask", workers=n))
        rows = [r for r in _rows(dst) if r["state"] == "done"]
        assert len(rows) == n_series, summary["counts"]
        wall, span = summary["this_run"]["seconds"], _span(rows)
        out[f"dask_{n}"] = {"wall_s": wall, "items_per_min": 60 * n_series / wall, "work_span_s": span,
                            "items_per_min_no_startup": 60 * n_series / span,
                            "item_s_median": statistics.median(r["seconds"] for r in rows),
                            "worker_peak_rss_mib": sorted(round(v / 2**20) for v in rss.peak.values())}
    out["manifest_s_per_item"] = _manifest_overhead(n_series * 20, work)
    # DICOMweb: the same series in a private Orthanc; fetched, enhanced (one process), stored back
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    proc, http, _, _ = start_orthanc(work / "orthanc")
    try:
        DICOMwebClient(url=f"{http}/dicom-web").store_instances([pydicom.dcmread(f) for f in files])
        dst = work / "pacs"
        t0 = time.perf_counter()
        run_archive(f"dicomweb+{http}/dicom-web", dst, opts(store_back=True))
        wall = time.perf_counter() - t0
        rows = [r for r in _rows(dst) if r["state"] == "done"]
        assert len(rows) == n_series
        log = (dst / "archive.log").read_text().splitlines()
        from datetime import datetime

        def stamp(line: str) -> datetime:
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")

        stores = []  # store-back: the "store-back" line minus the "done" line just before it
        for i, line in enumerate(log):
            if " store-back " in line and i and " done " in log[i - 1]:
                stores.append((stamp(line) - stamp(log[i - 1])).total_seconds())
        mib = sum(f.stat().st_size for f in files) / n_series / 2**20
        out["dicomweb"] = {"wall_s": wall, "transfer_s_median": statistics.median(r["transfer_s"] for r in rows),
                           "item_s_median": statistics.median(r["seconds"] for r in rows),
                           "store_back_s_median": statistics.median(stores) if stores else None,
                           "series_mib": round(mib, 3)}
    finally:
        stop_orthanc(proc)
    out["load_after"] = os.getloadavg()[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--series", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--in-namespace", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_namespace is not None:
        result = _bench(args.in_namespace, args.series, args.samples, args.steps)
        (args.in_namespace / "result.json").write_text(json.dumps(result, indent=2))
        return
    import tempfile

    from pacs_fixtures import run_in_namespace

    with tempfile.TemporaryDirectory() as tmp:
        code, output = run_in_namespace([__file__, "--in-namespace", tmp, "--series", str(args.series),
                                         "--samples", str(args.samples), "--steps", str(args.steps)], 3000)
        if code != 0:
            sys.exit(f"bench_archive failed:\n{output[-4000:]}")
        print(json.dumps(json.loads((Path(tmp) / "result.json").read_text()), indent=2))


if __name__ == "__main__":
    main()
