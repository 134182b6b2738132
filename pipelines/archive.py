"""Enhance a whole imaging archive: ``medsr archive SRC --out DST``.

Every NIfTI file and DICOM series under SRC (:mod:`pipelines.discover`) gets exactly what ``medsr enhance``
writes, in a folder of DST that mirrors its place under SRC. DST also holds::

    manifest.sqlite           one row per item: state, reason, timings, score (pipelines.manifest)
    archive.log               what happened, item by item (archive-rank<R>.log under torchrun)
    summary.json              counts, reasons, score distribution, items to review first
    index.html                the review worklist (pipelines.worklist), rebuilt as items finish
    .medsr-archive/staging/   work in progress, one folder per item, removed when the item is published
    .medsr-archive/locks/     advisory locks: one discovery at a time, one process per shard
    .medsr-archive/cache/     DICOMweb sources only: series being enhanced, removed when the item has an outcome

Resumable by construction. An item is written into its private staging folder and *renamed* into the mirrored
tree only when complete (``report.json``, written last by ``write_outputs``, is inside before the rename), so a
folder in the tree is a finished output whatever moment the run is killed at, even with ``kill -9``. The manifest
says ``done`` only after the rename. On restart every unfinished item of this shard is reconciled against the
disk: an output folder with ``report.json`` whose row is not ``done`` (killed between rename and commit) is
recorded as done without redoing it; a ``running`` row with no output goes back to ``pending`` (after
``max_attempts`` such interruptions it is failed, so an input that crashes the process cannot loop forever); a
``done`` row whose output vanished is redone; staging leftovers are deleted. Done and skipped items are never
redone; failed ones only with ``retry_failed``. Inputs are only ever opened for reading.

Scales out three ways: ``workers`` CPU processes (spawn; each loads the model once, torch threads =
cores // workers); ``engine="dask"``, a dask.distributed cluster (:mod:`pipelines.dask_engine`; this process
keeps the manifest, workers enhance and publish); and ``torchrun`` ranks (``RANK``/``WORLD_SIZE``): rank r takes
the items whose sha1 key modulo the world size is r, on GPU ``LOCAL_RANK``; ranks share the WAL-mode manifest.

The source may also be a PACS, ``dicomweb+http://HOST:PORT/PATH`` (:mod:`pipelines.dicomweb`): its series are
listed with QIDO-RS, fetched with WADO-RS into the cache and enhanced exactly like folder items; with
``store_back`` the derived series and Parametric Map of every done item are sent back with STOW-RS, after asking
the PACS which of them it already holds, and the manifest records it (``stored``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import statistics
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import yaml

from medsr.config import SamplingConfig, build_dataclass
from medsr.enhance import EnhanceOptions
from medsr.errors import MedsrError
from medsr.io import atomic_path
from medsr.model_picker import ModelPicker
from medsr.runtime import resolve_device
from pipelines import dicomweb
from pipelines.discover import discover
from pipelines.manifest import INPUT_CHANGED, Manifest, now, shard_of
from pipelines.worker import WorkerSettings, init_worker, process
from pipelines.worklist import write_worklist

__all__ = ["ArchiveOptions", "load_archive_options", "run_archive", "summarise", "format_summary"]

_FINAL = ("done", "skipped", "failed")
_INTERNAL = ".medsr-archive"
log = logging.getLogger("pipelines.archive")


_SAMPLING = SamplingConfig()  # the one home of the sampling defaults


@dataclass
class ArchiveOptions:
    """How to run an archive; a YAML file given to ``--config`` maps onto it field for field.

    Attributes:
        model: "auto" (each item's model chosen from its geometry, as ``medsr enhance --model auto``: thick
            slices → the shipped through-plane model) or a medsr checkpoint path (the CLI resolves names).
        samples, steps, seed, amp: sampling, as for ``medsr enhance``.
        device: auto (GPU ``LOCAL_RANK`` when CUDA is present, else CPU), cpu, cuda or cuda:N.
        format: auto (both NIfTI and DICOM for DICOM input, NIfTI for NIfTI input), nifti, dicom or both.
        workers: CPU worker processes per rank; 1 works in the main process.
        threads: torch threads per worker; 0 = cores // (workers x ranks on this node).
        min_size: smallest in-plane size (voxels) worth enhancing; smaller images are skipped.
        max_attempts: interruptions (kill, crash) an item may suffer before it is marked failed.
        retry_failed: put failed items back in the queue.
        review_top: how many items the summary lists to review first.
        progress: show a progress bar.
        engine: "local" (``workers`` processes on this machine) or "dask" (dask.distributed).
        scheduler: dask scheduler address (``tcp://HOST:PORT``); "" starts a local cluster of ``workers``.
        store_back: DICOMweb sources: send the derived series and Parametric Map back to the PACS.
        credentials: DICOMweb: a JSON file with user/password or token ("" = the environment).
        modality, study_date, series_description: DICOMweb: QIDO-RS filters ("" = all).
        worklist_every_s: rebuild index.html at most this often while items finish (and always at the end).
    """

    model: str = "auto"
    samples: int = _SAMPLING.samples
    steps: int = _SAMPLING.steps
    seed: int = _SAMPLING.seed
    device: str = "auto"
    amp: str = "auto"
    format: str = "auto"
    workers: int = 1
    threads: int = 0
    min_size: int = 8
    max_attempts: int = 3
    retry_failed: bool = False
    review_top: int = 10
    progress: bool = True
    engine: str = "local"
    scheduler: str = ""
    store_back: bool = False
    credentials: str = ""
    modality: str = ""
    study_date: str = ""
    series_description: str = ""
    worklist_every_s: float = 5.0

    def __post_init__(self) -> None:
        """Ranges and choices (types are checked by :func:`load_archive_options`): a bad value stops the run
        before anything is written, instead of failing every item."""
        if self.format not in ("auto", "nifti", "dicom", "both"):
            raise MedsrError(f"archive format must be auto, nifti, dicom or both, got {self.format!r}")
        if self.engine not in ("local", "dask"):
            raise MedsrError(f"archive engine must be local or dask, got {self.engine!r}")
        if self.scheduler and self.engine != "dask":
            raise MedsrError("archive: a scheduler address needs engine dask (--engine dask)")
        if self.scheduler and not self.scheduler.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
            raise MedsrError(f"archive scheduler must be an address like tcp://HOST:PORT, got {self.scheduler!r}")
        if self.store_back and self.format == "nifti":
            raise MedsrError("archive: store_back sends DICOM results; it cannot be used with format nifti")
        for name, low in (("samples", 1), ("steps", 1), ("workers", 1), ("max_attempts", 1), ("min_size", 1),
                          ("threads", 0), ("review_top", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise MedsrError(f"archive {name} must be a whole number >= {low}, got {value!r}")


def load_archive_options(path: str | os.PathLike[str] | None = None, **overrides: Any) -> ArchiveOptions:
    """Options from a YAML file (or defaults), then ``overrides`` that are not None; unknown keys refused."""
    values: Any = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise MedsrError(f"{path}: cannot read archive config ({exc})") from None
        if not isinstance(values, dict):
            raise MedsrError(f"{path}: an archive config is a mapping of option: value, got {values!r}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    opts: ArchiveOptions = build_dataclass(ArchiveOptions, values, "archive")  # types, like training configs
    return opts


def _check(opt: ArchiveOptions) -> None:
    if not opt.model:
        raise MedsrError("archive: no model given")
    ArchiveOptions.__post_init__(opt)  # fields may have been set after construction


@contextmanager
def _lock(path: Path, wait_for_it: bool) -> Iterator[None]:
    """An advisory ``flock``; the OS drops it when the process dies, so a killed run never leaves it held."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait_for_it else fcntl.LOCK_NB))
        except BlockingIOError:
            raise MedsrError(f"another medsr archive run is working on this shard of {path.parents[2]} "
                             f"({path.name}); wait for it or stop it") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    if world < 1 or not 0 <= rank < world:
        raise MedsrError(f"archive: rank {rank} outside world size {world}")
    return rank, world


def _device(name: str) -> str:
    if name == "auto" and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return str(resolve_device(name)) if name != "auto" else "cpu"


@dataclass
class _Source:
    """Where the items come from: a folder (``path``) or a DICOMweb service (``url`` and a client for it)."""

    path: Path | None = None
    url: str = ""
    client: Any = None
    credentials: str = ""

    @property
    def label(self) -> str:
        return self.url or str(self.path)


def _discover(manifest: Manifest, src: _Source, dst: Path, opt: ArchiveOptions) -> None:
    """Add what SRC holds to the manifest. Under one torchrun launch only the first rank walks the tree."""
    token = os.environ.get("TORCHELASTIC_RUN_ID", "")
    with _lock(dst / _INTERNAL / "locks" / "discover.lock", wait_for_it=True):
        if token not in ("", "none") and manifest.get_meta("discovery_token") == token:
            return
        t0 = time.perf_counter()
        if src.path is not None:
            items = discover(src.path, exclude=(dst,))
            prints = {it.id: _fingerprint(src.path, it.sources) for it in items}
        else:
            items, studies, prints = dicomweb.list_series(src.client, opt.modality, opt.study_date,
                                                          opt.series_description)
            ours = manifest.stored_series()  # results this archive stored back are not items to enhance
            items = [it for it in items if it.series_uid not in ours]
        new = manifest.add_items(items)
        if src.path is None:
            manifest.set_studies(studies)
        for item_id in manifest.update_fingerprints(prints):
            log.info("discovery: the input of %s changed since the last run; redoing it", item_id)
        manifest.set_meta("discovery_token", token)
        manifest.set_meta("discovered", now())
        log.info("discovery: %d items %s (%d new) in %.1f s", len(items),
                 "under the archive" if src.path is not None else "listed by the PACS", new, time.perf_counter() - t0)


def _fingerprint(src: Path, sources: list[str]) -> str:
    """Size and modification time (ns) of every source file: a changed input gets a new fingerprint."""
    parts = []
    for rel in sources:
        try:
            st = os.stat(src / rel)
            parts.append(f"{rel}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{rel}:missing")
    return hashlib.sha1("\n".join(parts).encode("utf-8")).hexdigest()


def _report_score(folder: Path) -> float | None:
    """The item's ranking score from its report: the mean calibrated 90% half-width in % of range."""
    try:
        return float(json.loads((folder / "report.json").read_text())["score"]["value"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _reconcile(manifest: Manifest, dst: Path, rank: int, world: int, opt: ArchiveOptions) -> None:
    """Make this shard's rows agree with the disk after an interruption (see the module docstring)."""
    for row in manifest.rows():
        if shard_of(row["key"], world) != rank:
            continue
        folder = dst / row["out_dir"] if row["out_dir"] else None
        finished = folder is not None and (folder / "report.json").is_file()
        state, label = row["state"], row["out_dir"] or row["id"]
        if state in ("pending", "running") and finished and row["reason"] != INPUT_CHANGED:
            assert folder is not None
            manifest.set_state(row["id"], "done", score=_report_score(folder), finished=now())
            log.info("resume: %s was published before the interruption; recorded as done", label)
        elif state == "running":
            if row["attempts"] >= opt.max_attempts:
                manifest.set_state(row["id"], "failed", category="interrupted", finished=now(),
                                   reason=f"interrupted {row['attempts']} times while running (killed or crashed)")
            else:
                manifest.set_state(row["id"], "pending")
            log.info("resume: %s was interrupted while running; %s", label,
                     "marked failed" if row["attempts"] >= opt.max_attempts else "queued again")
        elif state == "done" and not finished:
            manifest.set_state(row["id"], "pending", reason="output missing; redone")
            log.info("resume: output of %s is missing; redoing it", label)
        elif state == "failed" and opt.retry_failed:
            manifest.set_state(row["id"], "pending", attempts_delta=-int(row["attempts"]))
    staging = dst / _INTERNAL / "staging"
    for leftover in staging.iterdir() if staging.is_dir() else []:
        if re.fullmatch(r"[0-9a-f]{16}", leftover.name) and shard_of(leftover.name, world) == rank:
            shutil.rmtree(leftover, ignore_errors=True)
    # DICOMweb cache: partial downloads always go; a complete copy stays only for an item still to be done
    waiting = {r["key"] for r in manifest.rows("pending")}
    cache = dst / _INTERNAL / "cache"
    for leftover in cache.iterdir() if cache.is_dir() else []:
        key = leftover.name.split(".")[0]
        if re.fullmatch(r"[0-9a-f]{16}", key) and shard_of(key, world) == rank and (
                "." in leftover.name or key not in waiting):
            shutil.rmtree(leftover, ignore_errors=True)


class _Inline(Executor):
    """Runs each task at once in this process (workers = 1): same interface as a process pool."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        fut.set_result(fn(*args, **kwargs))
        return fut


def _task(row: Any, src: _Source, dst: Path) -> dict[str, Any]:
    task = {"id": row["id"], "kind": row["kind"], "root": str(src.path), "sources": json.loads(row["sources"]),
            "series_uid": row["series_uid"], "out_dir": str(dst / row["out_dir"]),
            "label": f"series {row['series_uid']}" if row["series_uid"] else row["id"],
            "staging": str(dst / _INTERNAL / "staging" / row["key"])}
    if src.path is None:  # the worker fetches the series itself (credentials from its own environment)
        task["remote"] = {"url": src.url, "credentials": src.credentials, "study": row["study_uid"],
                          "series": row["series_uid"], "cache": str(dst / _INTERNAL / "cache" / row["key"])}
    return task


def _runner(task: dict[str, Any]) -> Any:
    """What runs one task: looked up at call time, so ``process`` can be wrapped (tests hold an item with it)."""
    return dicomweb.process_remote if "remote" in task else process


def _executor(opt: ArchiveOptions, settings: WorkerSettings, model: ModelPicker | None) -> Executor:
    if opt.engine == "dask":
        from pipelines.dask_engine import DaskExecutor

        return DaskExecutor(settings, opt.workers, opt.scheduler)
    if opt.workers <= 1:
        init_worker(settings, model)
        return _Inline()
    return ProcessPoolExecutor(max_workers=opt.workers, mp_context=get_context("spawn"), initializer=init_worker,
                               initargs=(settings,))


def _work(manifest: Manifest, src: _Source, dst: Path, rank: int, world: int, opt: ArchiveOptions,
          settings: WorkerSettings, model: ModelPicker | None) -> dict[str, Any]:
    """Claim and enhance this shard's pending items; returns what this run did."""
    mine = [r for r in manifest.rows() if shard_of(r["key"], world) == rank]
    queue = deque(r["id"] for r in mine if r["state"] == "pending")
    counts = Counter(r["state"] for r in mine)
    owner = f"rank{rank}/pid{os.getpid()}"
    ran: Counter[str] = Counter()
    t0 = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(total=len(mine), initial=sum(counts[s] for s in _FINAL), unit="item", dynamic_ncols=True,
               desc=f"archive rank {rank}/{world}" if world > 1 else "archive", disable=not opt.progress)

    def show() -> None:  # done / failed / left here; tqdm adds the rate and the ETA over all workers
        bar.set_postfix(done=counts["done"], failed=counts["failed"], skipped=counts["skipped"],
                        left=counts["pending"] + counts["running"], refresh=False)

    show()
    executor = _executor(opt, settings, model) if queue else _Inline()
    worklist = _Throttled(lambda: write_worklist(manifest, dst), opt.worklist_every_s)
    in_flight: dict[Future[Any], Any] = {}
    current = None  # claimed, not yet handed over (the inline executor works inside submit)
    try:
        while queue or in_flight:
            slots = getattr(executor, "slots", opt.workers)
            while queue and len(in_flight) < slots:
                current = manifest.claim(queue.popleft(), owner)
                if current is None:  # someone else took it
                    continue
                counts["pending"] -= 1
                counts["running"] += 1
                task = _task(current, src, dst)
                in_flight[executor.submit(_runner(task), task)] = current
                current = None
            if not in_flight:
                break
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            broken = False
            for fut in finished:
                row = in_flight.pop(fut)
                counts["running"] -= 1
                try:
                    res = fut.result()
                except Exception as exc:  # the worker process died (killed, out of memory, segfault)
                    broken = isinstance(executor, ProcessPoolExecutor)
                    if row["attempts"] < opt.max_attempts:
                        manifest.set_state(row["id"], "pending")
                        queue.append(row["id"])
                        counts["pending"] += 1
                        log.warning("%s: worker process died (%s); queued again", row["out_dir"], type(exc).__name__)
                        continue
                    res = {"state": "failed", "category": "worker crashed", "seconds": None, "score": None,
                           "reason": f"the worker process died {row['attempts']} times on this item"}
                worker = f"{owner}/worker{res['pid']}" if res.get("pid", os.getpid()) != os.getpid() else None
                manifest.finish(row["id"], res["state"], category=res["category"], reason=res["reason"],
                                seconds=res["seconds"], score=res["score"], owner=worker)
                if "transfer_s" in res:
                    manifest.set_transfer(row["id"], res["transfer_s"])
                counts[res["state"]] += 1
                ran[res["state"]] += 1
                _log_item(row, res)
                if res["state"] == "done" and opt.store_back:
                    _store(manifest, src, dst, manifest.get(row["id"]))
                show()
                bar.update(1)
                worklist()
            if broken:  # every task left in a broken pool fails the same way; start a fresh pool
                executor.shutdown(wait=False, cancel_futures=True)
                executor = _executor(opt, settings, model)
    except BaseException:  # Ctrl-C and the like: hand the claimed items back before leaving
        for row in [*in_flight.values(), *([current] if current is not None else [])]:
            manifest.set_state(row["id"], "pending", attempts_delta=-1)
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return {"processed": sum(ran.values()), **{s: ran[s] for s in _FINAL},
            "seconds": round(time.perf_counter() - t0, 3), "rank": rank, "world": world}


class _Throttled:
    """Call ``fn`` at most once every ``every_s`` seconds (the worklist is rebuilt from the whole manifest)."""

    def __init__(self, fn: Any, every_s: float) -> None:
        self.fn, self.every_s, self.last = fn, every_s, float("-inf")

    def __call__(self) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.fn()
            self.last = time.monotonic()


def _store(manifest: Manifest, src: _Source, dst: Path, row: Any) -> None:
    """Store one done item's derived objects back in the PACS (what it lacks only); a failure is logged and
    the item stays unstored, to be tried again by the next run."""
    label = row["out_dir"] or row["id"]
    try:
        sent, held, series = dicomweb.store_back(src.client, dst / row["out_dir"])
    except MedsrError as exc:
        log.warning("store-back of %s failed (tried again next run): %s", label, exc)
        return
    manifest.set_stored(row["id"], series)
    log.info("store-back %s: %d object(s) sent, %d already in the PACS", label, sent, held)


def _store_leftovers(manifest: Manifest, src: _Source, dst: Path, rank: int, world: int) -> None:
    """Done items of this shard not yet recorded as stored (an earlier run was killed or the PACS was down)."""
    for row in manifest.rows("done"):
        if shard_of(row["key"], world) == rank and not row["stored"] and row["out_dir"]:
            _store(manifest, src, dst, row)


def _log_item(row: Any, res: dict[str, Any]) -> None:
    where = row["out_dir"] or row["id"]
    if res["state"] == "done":
        log.info("done %s: uncertainty score %.5f, %.1f s", where, res["score"], res["seconds"])
    else:
        log.warning("%s %s: [%s] %s", res["state"], where, res["category"], res["reason"])


def summarise(manifest: Manifest, review_top: int = 10, this_run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Counts by state, skips and failures by reason, score distribution, the most uncertain items."""
    rows = manifest.rows()
    counts = Counter(r["state"] for r in rows)
    scored = sorted((r for r in rows if r["state"] == "done" and r["score"] is not None),
                    key=lambda r: -float(r["score"]))
    scores = sorted(float(r["score"]) for r in scored)
    return {
        "total": len(rows),
        "counts": {s: counts[s] for s in ("done", "skipped", "failed", "pending", "running")},
        "reasons": {s: dict(sorted(Counter(r["category"] for r in rows if r["state"] == s).items()))
                    for s in ("skipped", "failed")},
        "score": {"n": len(scores), "min": scores[0] if scores else None,
                  "median": statistics.median(scores) if scores else None, "max": scores[-1] if scores else None},
        "review_first": [{"out_dir": r["out_dir"], "score": float(r["score"])} for r in scored[:review_top]],
        "this_run": this_run or {},
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run table."""
    c = summary["counts"]
    run = summary.get("this_run") or {}
    lines = [f"archive: {summary['total']} items: {c['done']} done, {c['skipped']} skipped, {c['failed']} failed, "
             f"{c['pending'] + c['running']} left"]
    if run:
        lines.append(f"this run: {run['processed']} items processed in {run['seconds']:.1f} s "
                     f"({run['done']} done, {run['skipped']} skipped, {run['failed']} failed)")
        if run.get("world", 1) > 1 and c["pending"] + c["running"]:
            lines.append(f"rank {run['rank']} of {run['world']} has finished its share; other ranks are still working")
    reasons = [(s, cat, n) for s in ("failed", "skipped") for cat, n in summary["reasons"][s].items()]
    if reasons:
        lines += ["", f"{'state':<8}  {'reason':<28}  {'items':>5}"]
        lines += [f"{s:<8}  {cat:<28}  {n:>5}" for s, cat, n in reasons]
    sc = summary["score"]
    if sc["n"]:
        lines += ["", f"uncertainty score over {sc['n']} done items: min {sc['min']:.5f}, median {sc['median']:.5f}, "
                      f"max {sc['max']:.5f}"]
        lines += ["", "review first (highest uncertainty):", f"{'score':>9}  output"]
        lines += [f"{r['score']:>9.5f}  {r['out_dir']}" for r in summary["review_first"]]
    return "\n".join(lines)


def _source(src: str | os.PathLike[str], dst: str | os.PathLike[str], opt: ArchiveOptions) -> tuple[_Source, Path]:
    dst_p = Path(dst).resolve()
    if dicomweb.is_dicomweb(src):
        url = dicomweb.parse_source(str(src))
        return _Source(url=url, client=dicomweb.connect(url, opt.credentials or None),
                       credentials=opt.credentials), dst_p
    if opt.store_back:
        raise MedsrError("archive: --store-back needs a DICOMweb source (dicomweb+http://HOST:PORT/PATH)")
    src_p = Path(src).resolve()
    if not src_p.is_dir():
        raise MedsrError(f"{src}: not a folder")
    if src_p == dst_p or dst_p in src_p.parents:  # an output root inside the archive is fine (left out)
        raise MedsrError(f"{dst}: the output folder must not be the archive or contain it")
    return _Source(path=src_p), dst_p


def run_archive(src: str | os.PathLike[str], dst: str | os.PathLike[str], options: ArchiveOptions | None = None,
                rank: int | None = None, world: int | None = None) -> dict[str, Any]:
    """Enhance every NIfTI file and DICOM series under ``src`` into ``dst``; see the module docstring.

    Args:
        src: the archive (read only): a folder, or ``dicomweb+http(s)://HOST:PORT/PATH`` for a PACS.
        dst: the output root; created if missing. An output root inside ``src`` is left out of discovery.
        options: see :class:`ArchiveOptions`.
        rank, world: this process's shard; default from ``RANK``/``WORLD_SIZE`` (torchrun), else 0 of 1.

    Returns:
        The summary (:func:`summarise`), also written to ``dst/summary.json``.
    """
    opt = options or ArchiveOptions()
    _check(opt)
    source, dst_p = _source(src, dst, opt)
    rank, world = _rank_world(rank, world)
    device = _device(opt.device)
    picker = ModelPicker(opt.model, device)
    picker.check()  # a bad checkpoint (or a shipped model missing from the install) fails before anything is written
    model_label = ("auto (chosen per item)" if picker.auto
                   else f"{Path(opt.model).name} (step {picker.load(opt.model).step})")
    sampling = EnhanceOptions(samples=opt.samples, steps=opt.steps, seed=opt.seed, device=device, amp=opt.amp)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # pool workers: cores // workers each; the main process (workers = 1) only when asked for, restored after
    pooled = opt.workers > 1 or opt.engine == "dask"
    threads = (opt.threads or max(1, cores // (opt.workers * local))) if pooled else opt.threads
    settings = WorkerSettings(opt.model, sampling, opt.format, opt.min_size, threads)
    (dst_p / _INTERNAL / "staging").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(dst_p / ("archive.log" if world == 1 else f"archive-rank{rank}.log"))
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    manifest = Manifest(dst_p / "manifest.sqlite")
    torch_threads = torch.get_num_threads()
    try:
        known = manifest.get_meta("source")
        if known is None:
            manifest.set_meta("source", source.label)
        elif known != source.label:
            raise MedsrError(f"{dst}: holds the outputs of another archive ({known}); choose another --out")
        log.info("start: model %s, %d sample(s) x %d step(s), device %s, %s engine, %d worker(s), "
                 "shard %d of %d", model_label, opt.samples, opt.steps, device, opt.engine,
                 opt.workers, rank, world)
        _discover(manifest, source, dst_p, opt)
        with _lock(dst_p / _INTERNAL / "locks" / f"shard-{rank}-of-{world}.lock", wait_for_it=False):
            _reconcile(manifest, dst_p, rank, world, opt)
            if opt.store_back:
                _store_leftovers(manifest, source, dst_p, rank, world)
            run = _work(manifest, source, dst_p, rank, world, opt, settings,
                        picker if opt.workers <= 1 else None)
        summary = summarise(manifest, opt.review_top, run)
        with atomic_path(dst_p / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        write_worklist(manifest, dst_p)
        log.info("finished: %s", json.dumps({k: summary[k] for k in ("counts", "reasons", "score")}))
        return summary
    finally:
        torch.set_num_threads(torch_threads)
        manifest.close()
        log.removeHandler(handler)
        handler.close()
