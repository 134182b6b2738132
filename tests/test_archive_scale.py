"""Archives at scale: a PACS as source and destination, a dask cluster as engine, the review worklist in a browser.

- DICOMweb: a private Orthanc with its DICOMweb plugin and HTTP basic auth (``pacs_fixtures``, in its own network
  namespace) holds three CT series and an MR slice. ``medsr archive dicomweb+http://... --store-back --modality CT``
  is killed with -9 while its second series is held after download, restarted, and run a third time after the
  manifest is made to forget one store-back. Checked: the filters, every CT series enhanced once, the downloaded
  series reused after the kill (not fetched again), every derived object in the PACS exactly as on disk and sent
  exactly once, the cache emptied, the password nowhere in the outputs or the output of the command.
- dask: a LocalCluster of 2 worker processes (1 thread each); one worker is killed with -9 while both are busy;
  the run still finishes every item once, nothing half-written, and the outputs equal the one-process run's.
- worklist: DST/index.html opened in Debian's headless chromium: no console error, rows in score order,
  thumbnails on disk, a non-blank screenshot; the same page with a script error does log one (the check can fail).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from holding import HOLD_SECOND_ITEM
from typer.testing import CliRunner

from medsr.cli import app
from medsr.errors import MedsrError
from pipelines.archive import ArchiveOptions, run_archive
from pipelines.manifest import Manifest

sys.path.insert(0, str(Path(__file__).parent / "io"))
from iodata import NIBABEL_DATA, datafile, load_cranium_crop, write_ct_series  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "s3cret-Pw-7781"  # the PACS password: must never reach a file, a log or the terminal
SESSION_TIMEOUT_S = 420
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def rows(dst: Path) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(f"file:{dst / 'manifest.sqlite'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return {r["id"]: dict(r) for r in db.execute("SELECT * FROM items")}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from enhance_fixtures import tiny_config, write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", tiny_config())


# --- fast checks ---------------------------------------------------------------------------------------------------

def test_password_in_the_url_is_refused_and_not_echoed(tmp_path: Path, tiny_model: Path) -> None:
    res = CliRunner().invoke(app, ["archive", f"dicomweb+http://medsr:{PASSWORD}@127.0.0.1:9/dicom-web",
                                   "--out", str(tmp_path / "dst"), "--model", str(tiny_model)])
    assert res.exit_code == 2 and "never on the command line" in res.output
    assert PASSWORD not in res.output and not (tmp_path / "dst").exists()


def test_store_back_needs_a_pacs_source(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "src").mkdir()
    res = CliRunner().invoke(app, ["archive", str(tmp_path / "src"), "--out", str(tmp_path / "dst"),
                                   "--model", str(tiny_model), "--store-back"])
    assert res.exit_code == 2 and "--store-back needs a DICOMweb source" in res.output


def test_old_manifest_gains_the_remote_columns(tmp_path: Path) -> None:
    """A manifest written before DICOMweb (no study_uid / stored / transfer_s) opens, keeps its rows, migrates."""
    path = tmp_path / "manifest.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE items (id TEXT PRIMARY KEY, key TEXT NOT NULL, kind TEXT NOT NULL, sources TEXT "
                   "NOT NULL, series_uid TEXT NOT NULL DEFAULT '', out_dir TEXT UNIQUE, state TEXT NOT NULL DEFAULT "
                   "'pending', category TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '', attempts INTEGER "
                   "NOT NULL DEFAULT 0, owner TEXT NOT NULL DEFAULT '', started TEXT, finished TEXT, seconds REAL, "
                   "score REAL, discovered TEXT NOT NULL)")
        db.execute("INSERT INTO items(id, key, kind, sources, out_dir, state, score, discovered) VALUES "
                   "('nifti:a.nii', '0123456789abcdef', 'nifti', '[\"a.nii\"]', 'a', 'done', 0.5, 'x')")
    manifest = Manifest(path)
    try:
        manifest.set_stored("nifti:a.nii", ["1.2.3"])
        row = manifest.get("nifti:a.nii")
        assert row is not None and row["state"] == "done" and row["score"] == 0.5
        assert json.loads(row["stored_series"]) == ["1.2.3"] and row["study_uid"] is None
        assert row["transfer_s"] is None and row["fingerprint"] is None
    finally:
        manifest.close()


# --- a small folder archive: the one-process reference run, the dask run, the worklist -----------------------------

@pytest.fixture(scope="module")
def folder_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five real T1 slices (nibabel's anatomical.nii, 33 x 41 at 2 mm) and a slice with NaNs (skipped)."""
    src = tmp_path_factory.mktemp("folder") / "src"
    anat = nib.load(NIBABEL_DATA / "anatomical.nii")
    t1 = np.asarray(anat.dataobj, dtype=np.float32)
    for k in (8, 10, 12, 14, 16):
        (src / "t1").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(t1[:, :, k:k + 1], anat.affine), str(src / "t1" / f"slice{k:02d}.nii.gz"))
    bad = t1[:, :, 12:13].copy()
    bad[3:5, 3:5] = np.nan
    nib.save(nib.Nifti1Image(bad, anat.affine), str(src / "with_nan.nii.gz"))
    return src


def _options(model: Path, **kw: Any) -> ArchiveOptions:
    return ArchiveOptions(model=str(model), samples=4, steps=6, device="cpu", amp="none", threads=1, progress=False,
                          **kw)


@pytest.fixture(scope="module")
def inline_run(folder_archive: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("inline") / "dst"
    summary = run_archive(folder_archive, dst, _options(tiny_model))
    assert summary["counts"]["done"] == 5 and summary["counts"]["skipped"] == 1
    return dst


def _spawned_workers(pid: int) -> list[Any]:
    """The live dask worker processes under ``pid``. Short-lived children (dask and multiprocessing helpers) may
    exit or linger as zombies between listing and reading their command line: they are not workers."""
    import psutil

    workers = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        if "spawn_main" in cmd and "resource_tracker" not in cmd:
            workers.append(p)
    return workers


@pytest.mark.slow  # a dask cluster of two processes and a kill; ~30-60 s on a shared 2-core machine
def test_dask_two_workers_survive_a_killed_worker(folder_archive: Path, tiny_model: Path, inline_run: Path,
                                                  tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    dst = tmp_path / "dst"
    args = [sys.executable, "-m", "medsr", "archive", str(folder_archive), "--out", str(dst), "--model",
            str(tiny_model), "--engine", "dask", "--workers", "2", "--threads", "1", "--samples", "4", "--steps", "6",
            "--device", "cpu", "--amp", "none"]  # as the inline run: float32, so the outputs compare bit for bit
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    staging = dst / ".medsr-archive" / "staging"
    killed, busy = None, []
    try:
        deadline = time.monotonic() + 240  # a hang guard only: the kill waits for two busy workers
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            busy = sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []
            workers = _spawned_workers(proc.pid)
            if len(busy) == 2 and len(workers) == 2:  # both workers are inside an item: kill one of them
                killed = workers[0].pid
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.01)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = output.decode(errors="replace")
    assert killed is not None, f"never saw both workers busy: {text[-3000:]}"
    assert proc.returncode == 0, text[-3000:]
    assert "6 items: 5 done, 1 skipped, 0 failed, 0 left" in text
    final = rows(dst)
    again = {r["key"] for r in final.values() if r["attempts"] == 2}
    assert len(again) == 1 and again <= set(busy), (again, busy)  # the killed worker's item ran once more
    assert all(r["attempts"] == 1 for r in final.values() if r["key"] not in again and r["state"] == "done")
    assert "worker process died (KilledWorker); queued again" in (dst / "archive.log").read_text()
    assert not any(staging.iterdir())
    assert {r["owner"].split("/worker")[-1] for r in final.values() if r["state"] == "done"} - {""}  # workers did it
    for r in final.values():  # outputs equal the one-process run's: same model, seed and item
        if r["state"] == "done":
            ours = nib.load(dst / r["out_dir"] / "mean.nii.gz").get_fdata()
            ref = nib.load(inline_run / r["out_dir"] / "mean.nii.gz").get_fdata()
            np.testing.assert_array_equal(ours, ref)
            assert (dst / r["out_dir"] / "report.json").is_file()


def _chromium(*args: str, timeout: int = 90) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Failed to load resource" in line]


@pytest.mark.slow  # three headless chromium runs, a few seconds each
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; scripts/setup.sh)")
def test_worklist_in_headless_chromium(inline_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    page = inline_run / "index.html"
    assert page.is_file()
    url = page.as_uri()
    dom = _chromium("--dump-dom", "--virtual-time-budget=3000", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console_errors(dom.stderr) == []
    shown = re.findall(r'<tr class="item" data-state="(\w+)" data-score="([0-9.]*)" data-out="([^"]*)"', dom.stdout)
    manifest = rows(inline_run)
    done = sorted((r for r in manifest.values() if r["state"] == "done"), key=lambda r: -r["score"])
    assert [(s, o) for s, _, o in shown[:5]] == [("done", r["out_dir"]) for r in done]  # most uncertain first
    assert [float(v) for _, v, _ in shown[:5]] == pytest.approx([r["score"] for r in done], abs=1e-5)
    assert len(set(float(v) for _, v, _ in shown[:5])) == 5  # real, distinct scores: the order is tested
    assert shown[5][0] == "skipped" and "NaN/Inf voxels" in dom.stdout
    for r in done:  # every done row links its files and shows its review figure
        assert f'src="{r["out_dir"]}/review.png"' in dom.stdout and f'href="{r["out_dir"]}/report.json"' in dom.stdout
    shot = tmp_path / "shot.png"
    run = _chromium(f"--screenshot={shot}", "--window-size=1200,900", "--virtual-time-budget=3000", url)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50  # text, table rules and greyscale thumbnails
    for src in re.findall(r'<img src="([^"]+)"', dom.stdout):  # headless logs no failed image load: check the files
        assert (inline_run / src).is_file(), src
    # the console check can fail: the same page with a script error reports it
    broken = inline_run / "broken.html"
    broken.write_text(page.read_text().replace("</body>", "<script>not_defined_anywhere()</script></body>"))
    try:
        bad = _chromium("--dump-dom", "--virtual-time-budget=3000", broken.as_uri())
    finally:
        broken.unlink()
    assert _console_errors(bad.stderr), bad.stderr[-2000:]


# --- DICOMweb: the session runs inside the PACS's private network namespace -----------------------------------------

def _pacs_session(work: Path) -> None:
    """In the namespace: Orthanc with auth, upload, three archive runs (killed, restarted, re-checked), results."""
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session
    from pacs_fixtures import start_orthanc, stop_orthanc

    from pipelines import dicomweb

    cfg = json.loads((work / "config.json").read_text())
    proc, http, _, _ = start_orthanc(work / "orthanc", users={"medsr": PASSWORD})
    result: dict[str, Any] = {"pid": proc.pid}
    try:
        session = create_session()
        session.auth = ("medsr", PASSWORD)
        client = DICOMwebClient(url=f"{http}/dicom-web", session=session)
        uploads = [pydicom.dcmread(p) for p in cfg["uploads"]]
        client.store_instances(uploads)
        url = f"dicomweb+{http}/dicom-web"
        env = {**os.environ, "MEDSR_DICOMWEB_USER": "medsr", "MEDSR_DICOMWEB_PASSWORD": PASSWORD}
        result["filters"] = {name: sorted(it.series_uid for it in dicomweb.list_series(client, **kw)[0])
                             for name, kw in {"all": {}, "ct": {"modality": "CT"}, "mr": {"modality": "MR"},
                                              "date": {"study_date": "20240101-20240201"},
                                              "description": {"series_description": "second"}}.items()}
        dst = work / "dst"
        args = ["archive", url, "--out", str(dst), "--store-back", "--modality", "CT", "--model", cfg["model"],
                "--samples", "2", "--steps", "2", "--device", "cpu", "--threads", "1"]
        try:  # no credentials in this process's environment: the PACS refuses, medsr says why
            dicomweb.list_series(dicomweb.connect(f"{http}/dicom-web"))
            result["no_credentials"] = "listed without credentials"
        except MedsrError as exc:
            result["no_credentials"] = str(exc)
        marker = work / "holding"
        first = subprocess.Popen([sys.executable, "-c", HOLD_SECOND_ITEM, "pipelines.dicomweb", str(marker), *args],
                                 env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300  # a hang guard only: the kill waits for the marker
        while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        held = marker.read_text() if marker.exists() else None
        result["held"] = held
        result["cache_at_kill"] = sorted(p.name for p in (dst / ".medsr-archive" / "cache").iterdir())
        first.kill()
        out1, _ = first.communicate(timeout=60)
        result["first"] = {"code": first.returncode, "output": out1.decode(errors="replace"), "rows": rows(dst)}
        runs = []
        for n in (2, 3):
            if n == 3:  # as if killed between the STOW and the manifest update: the PACS must be asked first
                with sqlite3.connect(dst / "manifest.sqlite") as db:
                    db.execute("UPDATE items SET stored = NULL, stored_series = NULL WHERE state = 'done' AND id != ?",
                               (held,))
            run = subprocess.run([sys.executable, "-m", "medsr", *args], env=env, cwd=REPO, capture_output=True,
                                 text=True, timeout=300)
            runs.append({"code": run.returncode, "output": run.stdout + run.stderr, "rows": rows(dst)})
        result["runs"] = runs
        pacs: dict[str, list[str]] = {}
        for series in client.search_for_series():
            study, uid = series["0020000D"]["Value"][0], series["0020000E"]["Value"][0]
            pacs[uid] = sorted(i["00080018"]["Value"][0] for i in client.search_for_instances(study, uid))
        result["pacs"] = pacs
    finally:
        result["exit_code"] = stop_orthanc(proc)
    (work / "result.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def pacs_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from pacs_fixtures import run_in_namespace, why_not

    why = why_not()
    if why:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("pacs_archive")
    hu = load_cranium_crop()  # (8, 32, 24) real head CT
    first, _ = write_ct_series(work / "up" / "a", hu, description="first")
    second, _ = write_ct_series(work / "up" / "b", hu[2:6], description="second")
    uploads = []
    for path, date in [*((p, "20240105") for p in first), *((p, "20240310") for p in second)]:
        ds = pydicom.dcmread(path)
        ds.StudyDate = date
        ds.save_as(path, enforce_file_format=True)
        uploads.append(str(path))
    for name in ("CT_small.dcm", "MR_small.dcm"):  # real single slices, each its own study
        shutil.copy(datafile(name), work / "up" / name)
        uploads.append(str(work / "up" / name))
    (work / "config.json").write_text(json.dumps({"model": str(tiny_model), "uploads": uploads}))
    code, output = run_in_namespace([__file__, "--pacs-session", str(work)], SESSION_TIMEOUT_S)
    assert code == 0, output[-4000:]
    result = json.loads((work / "result.json").read_text())
    series = {name: str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
              for name, p in (("first", first[0]), ("second", second[0]), ("ct_small", work / "up" / "CT_small.dcm"),
                              ("mr_small", work / "up" / "MR_small.dcm"))}
    return {**result, "work": work, "series": series, "dst": work / "dst"}


@pytest.mark.slow  # Orthanc and three archive runs in a private network namespace; ~1-2 min on a shared machine
def test_pacs_filters_and_credentials(pacs_run: dict[str, Any]) -> None:
    s, f = pacs_run["series"], pacs_run["filters"]
    assert f["all"] == sorted(s.values())
    assert f["ct"] == sorted([s["first"], s["second"], s["ct_small"]]) and f["mr"] == [s["mr_small"]]
    assert f["date"] == [s["first"]] and f["description"] == [s["second"]]
    assert "refused the credentials (HTTP 401)" in pacs_run["no_credentials"]
    assert pacs_run["exit_code"] is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pacs_run["pid"], 0)  # Orthanc was stopped


@pytest.mark.slow
def test_pacs_archive_killed_restarted_stores_each_object_once(pacs_run: dict[str, Any]) -> None:
    s, dst = pacs_run["series"], pacs_run["dst"]
    first = pacs_run["first"]
    assert first["code"] == -signal.SIGKILL
    at_kill = first["rows"]
    done_before = [k for k, r in at_kill.items() if r["state"] == "done"]
    assert len(done_before) == 1 and at_kill[done_before[0]]["stored"]  # done and stored before the kill
    held = pacs_run["held"]
    assert at_kill[held]["state"] == "running" and pacs_run["cache_at_kill"] == [at_kill[held]["key"]]
    run2, run3 = pacs_run["runs"]
    assert run2["code"] == 0 and "3 items: 3 done, 0 skipped, 0 failed, 0 left" in run2["output"], run2["output"]
    final = run2["rows"]
    assert set(final) == {f"dicomweb:{s[k]}" for k in ("first", "second", "ct_small")}  # MR filtered out
    assert all(r["study_uid"] and r["stored"] for r in final.values())
    assert final[done_before[0]]["finished"] == at_kill[done_before[0]]["finished"]  # never redone
    assert final[done_before[0]]["attempts"] == 1 and final[held]["attempts"] == 2
    assert final[held]["transfer_s"] == 0.0  # the series downloaded before the kill was reused, not fetched again
    others = [k for k in final if k != held]
    assert all(final[k]["transfer_s"] > 0 for k in others)
    log_text = (dst / "archive.log").read_text()
    sent = {int(n) for n in re.findall(r"store-back \S+: (\d+) object\(s\) sent, 0 already", log_text)}
    assert len(re.findall(r"store-back \S+: \d+ object\(s\) sent, 0 already", log_text)) == 3  # once per item
    # run 3: the manifest forgot two store-backs; the PACS is asked and nothing is sent again, and the two
    # derived CT series now listed (no longer known as ours) are recognised as medsr's after download and skipped
    assert run3["code"] == 0, run3["output"]
    rechecked = re.findall(r"store-back \S+: 0 object\(s\) sent, (\d+) already in the PACS", log_text)
    assert len(rechecked) == 2 and {int(n) for n in rechecked} <= sent
    extra = {k: r for k, r in run3["rows"].items() if k not in final}
    assert len(extra) == 2 and {r["category"] for r in extra.values()} == {"medsr output"}
    assert {r["series_uid"] for r in extra.values()} <= {u for r in final.values() for u in json.loads(
        r["stored_series"])}
    # the PACS holds the sources and, for every item, exactly the derived objects on disk
    pacs = pacs_run["pacs"]
    assert len(pacs) == 4 + 2 * 3
    for r in final.values():
        folder = dst / r["out_dir"]
        derived: dict[str, list[str]] = {}
        for p in [*(folder / "dicom_mean").glob("*.dcm"), *(folder / "dicom_std").glob("*.dcm")]:
            h = pydicom.dcmread(p, stop_before_pixels=True)
            derived.setdefault(str(h.SeriesInstanceUID), []).append(str(h.SOPInstanceUID))
            assert str(h.StudyInstanceUID) == r["study_uid"]  # filed in the source's study
        assert sorted(derived) == sorted(json.loads(r["stored_series"]))
        for uid, sops in derived.items():
            assert pacs[uid] == sorted(sops)
    assert not any((dst / ".medsr-archive" / "cache").iterdir())
    assert (dst / "index.html").is_file()
    for path in [p for p in dst.rglob("*") if p.is_file()]:  # the password is nowhere: files, logs, manifest
        assert PASSWORD.encode() not in path.read_bytes(), path
    for out in (first["output"], run2["output"], run3["output"]):
        assert PASSWORD not in out


if __name__ == "__main__" and sys.argv[1:2] == ["--pacs-session"]:
    sys.path.insert(0, str(REPO / "tests"))
    _pacs_session(Path(sys.argv[2]))
