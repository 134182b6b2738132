"""medsr archive on a small real archive: discovery, skips with reasons, resume after kill -9, no duplicate work,
two worker processes, untouched inputs, no patient identifiers in the manifest or logs.

The archive is built here from real scans (nibabel's anatomical.nii and example4d.nii.gz, pydicom's CT_small and
MR_small, a CT series written with pydicom from the InVesalius head CT) plus bad files. The model is tiny and
untrained (its output layer is given small random weights so samples differ and scores are not all zero).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from holding import HOLD_SECOND_ITEM
from pydicom.uid import BasicTextSRStorage, generate_uid
from typer.testing import CliRunner

from medsr.cli import app
from medsr.config import load_config
from medsr.model import build_unet, checkpoint_payload, save_checkpoint
from pipelines.archive import ArchiveOptions, format_summary, run_archive
from pipelines.discover import Item, discover
from pipelines.manifest import Manifest, shard_of

sys.path.insert(0, str(Path(__file__).parent / "io"))
from iodata import NIBABEL_DATA, datafile, load_cranium_crop, new_dataset, tree_hash, write_ct_series  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IDENTIFIERS = ("Doe^Jane", "Doe Jane", "MEDSR-TEST-0042", "CompressedSamples", "1CT1", "4MR1", "19700101")
DONE = {"nifti/anat_crop", "dicom/singles/CT_small", "dicom/singles/MR_small", "dicom/study1/ct", "dicom/study2"}
SKIPPED = {  # item id -> category (the localizer and the SR document are series: their ids hold a fresh UID)
    "nifti:nifti/bad/with_nan.nii.gz": "NaN/Inf voxels",
    "nifti:nifti/bad/epi_4d.nii.gz": "4D image",
    "nifti:nifti/tiny.nii.gz": "too small",
    "file:dicom/bad/truncated_header.dcm": "truncated or damaged DICOM",
    "file:dicom/bad/truncated_pixels.dcm": "truncated or damaged DICOM",  # pixel data cut: seen in the header
    "dicom/bad/localizer.dcm": "localizer",
    "dicom/mixed/sr": "non-image DICOM",
}
OUTPUT_FILES = {"nifti": {"mean.nii.gz", "std.nii.gz", "q05.nii.gz", "q95.nii.gz", "review.png", "report.json"}}
OUTPUT_FILES["dicom"] = OUTPUT_FILES["nifti"] | {"dicom_mean", "dicom_std"}


def _write_sr(path: Path) -> None:
    """A Basic Text SR document: a real-world non-image DICOM object (no PixelData)."""
    ds = new_dataset(BasicTextSRStorage)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "MEDSR-TEST-0042", "19700101"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SR", 90, 1
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    ds.save_as(path, enforce_file_format=True)


def _recoded(name: str, path: Path, **changes: object) -> Path:
    """A copy of a pydicom test file as a new series (fresh UIDs), with some attributes changed."""
    ds = pydicom.dcmread(datafile(name))
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The source archive: 7 items to enhance, 7 to skip, a text file to ignore."""
    src = tmp_path_factory.mktemp("archive") / "src"
    anat = nib.load(NIBABEL_DATA / "anatomical.nii")
    t1 = np.asarray(anat.dataobj, dtype=np.float32)
    _nifti(src / "nifti" / "anat_crop.nii.gz", t1[4:28, 4:36, 12:13], anat.affine)
    _nifti(src / "nifti" / "tiny.nii.gz", t1[10:13, 10:13, 12:13], anat.affine)
    with_nan = t1[4:28, 4:36, 12:13].copy()
    with_nan[5:7, 5:7] = np.nan
    _nifti(src / "nifti" / "bad" / "with_nan.nii.gz", with_nan, anat.affine)
    shutil.copy(NIBABEL_DATA / "example4d.nii.gz", src / "nifti" / "bad" / "epi_4d.nii.gz")

    singles = src / "dicom" / "singles"
    singles.mkdir(parents=True)
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(datafile(name), singles / name)
    hu = load_cranium_crop()  # (8, 32, 24) real head CT
    write_ct_series(src / "dicom" / "study1" / "ct", hu)
    split, _ = write_ct_series(src / "dicom" / "study2" / "part_a", hu[:6])  # one series across two folders
    (src / "dicom" / "study2" / "part_b").mkdir()
    for p in split[3:]:
        p.rename(src / "dicom" / "study2" / "part_b" / p.name)
    write_ct_series(src / "dicom" / "mixed", hu[:4], description="first")  # two series in one folder
    write_ct_series(src / "dicom" / "mixed", hu[4:], description="second")
    _write_sr(src / "dicom" / "mixed" / "sr")

    bad = src / "dicom" / "bad"
    bad.mkdir()
    raw = datafile("CT_small.dcm").read_bytes()
    (bad / "truncated_header.dcm").write_bytes(raw[:1500])
    cut = _recoded("CT_small.dcm", bad / "full.dcm")
    (bad / "truncated_pixels.dcm").write_bytes(cut.read_bytes()[:20000])
    cut.unlink()
    _recoded("MR_small.dcm", bad / "localizer.dcm", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    (src / "notes").mkdir()
    (src / "notes" / "readme.txt").write_text("scanned at site B\n")
    return src


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained 2D x2 model; the zero-initialised output layer gets small random weights."""
    cfg = load_config(None, ["model.channels=[8,16]", "model.attention_levels=[false,false]",
                             "model.num_head_channels=8", "model.norm_num_groups=4", "degrade=block:2x2",
                             "data.patch_size=[16,16]"])
    torch.manual_seed(0)
    net = build_unet(cfg.model)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    state = net.state_dict()
    save_checkpoint(path, checkpoint_payload(cfg, state, model_state=state))
    return path


@pytest.fixture(scope="module")
def source_hash(archive: Path) -> dict[str, str]:
    return tree_hash(archive)


def options(model: Path, **kw: object) -> ArchiveOptions:
    kw.setdefault("threads", 1)  # more threads than free cores makes torch spin on a busy machine
    return ArchiveOptions(model=str(model), samples=2, steps=1, device="cpu", amp="none", progress=False, **kw)


@pytest.fixture(scope="module")
def first_run(archive: Path, tiny_model: Path, source_hash: dict[str, str],
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    dst = tmp_path_factory.mktemp("out") / "dst"
    return dst, run_archive(archive, dst, options(tiny_model))


def rows(dst: Path) -> dict[str, dict]:
    with sqlite3.connect(f"file:{dst / 'manifest.sqlite'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return {r["id"]: dict(r) for r in db.execute("SELECT * FROM items")}


def outputs(dst: Path) -> dict[str, set[str]]:
    """Each finished output folder (relative) -> the names it holds, found by report.json on disk."""
    return {str(p.parent.relative_to(dst)): {c.name for c in p.parent.iterdir()}
            for p in dst.rglob("report.json") if ".medsr-archive" not in p.parts}


def mtimes(dst: Path) -> dict[str, float]:
    return {str(p.relative_to(dst)): p.stat().st_mtime_ns for p in dst.rglob("report.json")}


def check_complete(dst: Path) -> None:
    """Every item finished exactly as expected; one complete output per done item, nothing half-written."""
    items = rows(dst)
    assert len(items) == 14
    done = {r["out_dir"] for r in items.values() if r["state"] == "done"}
    mixed = {d for d in done if d.startswith("dicom/mixed/")}
    assert done == DONE | mixed and len(mixed) == 2, done
    assert all(m.split("/")[-1].startswith("series3_") for m in mixed)  # SeriesNumber + short hash, no DICOM text
    skipped = {(r["id"] if r["id"].startswith(("nifti:", "file:")) else json.loads(r["sources"])[0]): r
               for r in items.values() if r["state"] == "skipped"}
    assert {k: r["category"] for k, r in skipped.items()} == SKIPPED
    assert all(r["reason"] for r in skipped.values())
    found = outputs(dst)
    assert set(found) == done
    for folder, names in found.items():
        assert names == OUTPUT_FILES["nifti" if folder.startswith("nifti") else "dicom"], (folder, names)
    assert not any((dst / ".medsr-archive" / "staging").iterdir())
    assert not [p for p in dst.rglob(".tmp-*")]
    for r in items.values():
        assert r["state"] != "done" or (r["score"] is not None and r["seconds"] > 0 and r["finished"] >= r["started"])


# --- discovery -------------------------------------------------------------------------------------------

def test_discovery_groups_series_by_uid_and_places_outputs(archive: Path) -> None:
    items = {it.id: it for it in discover(archive)}
    by_out = {"/".join(it.out_parts): it for it in items.values() if it.out_parts}
    assert set(by_out) >= DONE
    assert len(by_out["dicom/study2"].sources) == 6  # split over part_a and part_b: one item
    assert {s.split("/")[2] for s in by_out["dicom/study2"].sources} == {"part_a", "part_b"}
    assert len(by_out["dicom/study1/ct"].sources) == 8
    mixed = [it for it in items.values() if it.out_parts[:2] == ("dicom", "mixed")]
    assert len(mixed) == 2 and all(len(it.sources) == 4 for it in mixed)
    assert not [it for it in items.values() if "readme" in it.id]  # junk ignored, not an item
    sr = [it for it in items.values() if it.category == "non-image DICOM"]
    assert len(sr) == 1 and "Basic Text SR" in sr[0].reason and not sr[0].out_parts
    assert items["nifti:nifti/bad/epi_4d.nii.gz"].state == "skipped"  # decided from the header


# --- whole runs ------------------------------------------------------------------------------------------

def test_archive_run_outputs_skips_and_summary(first_run: tuple[Path, dict], archive: Path,
                                               source_hash: dict[str, str]) -> None:
    dst, summary = first_run
    check_complete(dst)
    assert summary["counts"] == {"done": 7, "skipped": 7, "failed": 0, "pending": 0, "running": 0}
    assert summary["this_run"]["processed"] == 14 - 5  # 5 skipped from headers alone, never claimed
    assert summary["reasons"]["skipped"]["truncated or damaged DICOM"] == 2
    sc = summary["score"]
    assert sc["n"] == 7 and 0 < sc["min"] <= sc["median"] <= sc["max"]
    assert summary["review_first"][0]["score"] == sc["max"]
    assert json.loads((dst / "summary.json").read_text())["counts"] == summary["counts"]
    table = format_summary(summary)
    assert "review first" in table and "NaN/Inf voxels" in table and "localizer" in table
    report = json.loads((dst / "dicom" / "study1" / "ct" / "report.json").read_text())
    assert report["output"]["shape"] == [48, 64, 8]  # 24 x 32 x 8 CT series, x2 in-plane
    assert tree_hash(archive) == source_hash


def test_second_run_does_nothing(first_run: tuple[Path, dict], archive: Path, tiny_model: Path) -> None:
    dst, _ = first_run
    before, stamps = rows(dst), mtimes(dst)
    again = run_archive(archive, dst, options(tiny_model))
    assert again["this_run"]["processed"] == 0
    assert rows(dst) == before and mtimes(dst) == stamps


def test_no_patient_identifiers_in_manifest_or_logs(first_run: tuple[Path, dict]) -> None:
    dst, _ = first_run
    with sqlite3.connect(dst / "manifest.sqlite") as db:
        dump = "\n".join(db.iterdump())
    texts = [dump, (dst / "archive.log").read_text(), (dst / "summary.json").read_text()]
    assert "dicom:" in dump and "truncated" in texts[1]
    for value in IDENTIFIERS:
        assert not [t for t in texts if value in t], value


def test_resume_after_simulated_crash(first_run: tuple[Path, dict], archive: Path, tiny_model: Path,
                                      tmp_path: Path, source_hash: dict[str, str]) -> None:
    """Killed mid-item (running row, half-written staging), killed after publishing (row not yet done), and a
    stray incomplete folder in place: only the unfinished items are redone, each output exists once."""
    dst = tmp_path / "dst"
    shutil.copytree(first_run[0], dst)
    items = {r["out_dir"]: r for r in rows(dst).values()}
    half, published, stray = items["dicom/study1/ct"], items["nifti/anat_crop"], items["dicom/singles/MR_small"]
    shutil.rmtree(dst / half["out_dir"])
    staged = dst / ".medsr-archive" / "staging" / half["key"] / "out" / "ct"
    staged.mkdir(parents=True)
    (staged / "mean.nii.gz").write_bytes(b"half written")
    shutil.rmtree(dst / stray["out_dir"])
    (dst / stray["out_dir"]).mkdir()
    (dst / stray["out_dir"] / "mean.nii.gz").write_bytes(b"from an older tool, no report.json")
    with sqlite3.connect(dst / "manifest.sqlite") as db:
        db.execute("UPDATE items SET state='running' WHERE id IN (?, ?)", (half["id"], published["id"]))
        db.execute("UPDATE items SET state='pending' WHERE id = ?", (stray["id"],))
    stamps = mtimes(dst)
    summary = run_archive(archive, dst, options(tiny_model))
    assert summary["this_run"]["processed"] == 2  # the half-written one and the stray one
    check_complete(dst)
    after = mtimes(dst)
    assert {k for k in after if after[k] != stamps.get(k)} == {"dicom/study1/ct/report.json",
                                                                "dicom/singles/MR_small/report.json"}
    assert rows(dst)[published["id"]]["state"] == "done"
    assert tree_hash(archive) == source_hash


@pytest.mark.slow  # several processes; tens of seconds on a 2-core machine
def test_kill_9_mid_run_then_restart_finishes_once(archive: Path, tiny_model: Path, tmp_path: Path,
                                                   source_hash: dict[str, str]) -> None:
    """Killed with -9 while an item runs, right after the first one is done (a wrapper holds the second item
    until the kill, so the moment is the same on every machine); the restart finishes everything once."""
    dst, marker = tmp_path / "dst", tmp_path / "holding"
    args = ["archive", str(archive), "--out", str(dst), "--model", str(tiny_model), "--samples", "2", "--steps", "2",
            "--device", "cpu", "--threads", "1"]
    proc = subprocess.Popen([sys.executable, "-c", HOLD_SECOND_ITEM, "pipelines.archive", str(marker), *args],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300  # a hang guard only: the kill waits for the marker, not for a clock
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the run never reached its second item (exit code {proc.poll()})"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    at_kill = rows(dst)
    done_before = {k: r for k, r in at_kill.items() if r["state"] == "done"}
    assert len(done_before) == 1
    assert [k for k, r in at_kill.items() if r["state"] == "running"] == [marker.read_text()]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "7 done, 7 skipped, 0 failed, 0 left" in result.output
    check_complete(dst)
    after = rows(dst)
    for key, r in done_before.items():  # never redone
        assert after[key]["finished"] == r["finished"] and after[key]["attempts"] == 1
    assert after[marker.read_text()]["attempts"] == 2  # the interrupted item ran again, once
    log_text = (dst / "archive.log").read_text()
    assert "interrupted while running; queued again" in log_text
    for value in IDENTIFIERS:
        assert value not in result.output and value not in log_text
    assert tree_hash(archive) == source_hash


def test_damaged_copy_never_takes_the_good_series_down(tmp_path: Path, tiny_model: Path) -> None:
    """``siteA/study1/ct.dcm`` and a truncated copy of the same instance elsewhere (sorted first): the copy is
    skipped on its own, the good slice is enhanced."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    good = src / "siteA" / "study1" / "ct.dcm"
    good.parent.mkdir(parents=True)
    shutil.copy(datafile("CT_small.dcm"), good)
    (src / "backup").mkdir()
    (src / "backup" / "ct.dcm").write_bytes(good.read_bytes()[:20000])  # same SOPInstanceUID, pixels cut short
    items = {it.id: it for it in discover(src)}
    assert len(items) == 2
    cut = items["file:backup/ct.dcm"]
    assert cut.state == "skipped" and cut.category == "truncated or damaged DICOM" and "cut short" in cut.reason
    (series,) = [it for it in items.values() if it.kind == "dicom"]
    assert series.state == "pending" and series.sources == ["siteA/study1/ct.dcm"]
    summary = run_archive(src, dst, options(tiny_model))
    assert summary["counts"] == {"done": 1, "skipped": 1, "failed": 0, "pending": 0, "running": 0}
    assert (dst / "siteA" / "study1" / "ct" / "report.json").is_file()
    states = {r["id"]: (r["state"], r["category"]) for r in rows(dst).values()}
    assert states["file:backup/ct.dcm"] == ("skipped", "truncated or damaged DICOM")


@pytest.mark.slow  # several processes; tens of seconds on a 2-core machine
def test_two_workers_same_outputs(first_run: tuple[Path, dict], archive: Path, tiny_model: Path, tmp_path: Path,
                                  source_hash: dict[str, str]) -> None:
    dst = tmp_path / "dst"
    summary = run_archive(archive, dst, options(tiny_model, workers=2))
    check_complete(dst)
    assert outputs(dst) == outputs(first_run[0])
    one = {r["out_dir"]: r["score"] for r in rows(first_run[0]).values() if r["state"] == "done"}
    two = {r["out_dir"]: r["score"] for r in rows(dst).values() if r["state"] == "done"}
    assert one.keys() == two.keys() and all(two[k] == pytest.approx(one[k], rel=1e-3) for k in one)
    assert summary["counts"] == first_run[1]["counts"]
    workers = {r["owner"].split("/worker")[-1] for r in rows(dst).values() if r["state"] == "done"}
    assert 1 <= len(workers) <= 2 and str(os.getpid()) not in workers  # the work ran in worker processes
    assert tree_hash(archive) == source_hash


@pytest.mark.slow  # several processes; tens of seconds on a 2-core machine
def test_torchrun_ranks_split_the_work(archive: Path, tiny_model: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank r takes the items whose key is r modulo the world size; one discovery per torchrun launch."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-1")
    dst = tmp_path / "dst"
    first = run_archive(archive, dst, options(tiny_model), rank=0, world=2)
    after_rank0 = rows(dst)
    assert len(after_rank0) == 14  # discovery covers the whole archive, whichever rank runs it
    assert {shard_of(r["key"], 2) for r in after_rank0.values()} == {0, 1}  # both ranks have work
    for r in after_rank0.values():
        if shard_of(r["key"], 2) == 1:
            assert r["started"] is None and r["state"] in ("pending", "skipped")
        else:
            assert r["state"] in ("done", "skipped")
    second = run_archive(archive, dst, options(tiny_model), rank=1, world=2)
    check_complete(dst)
    assert first["this_run"]["processed"] + second["this_run"]["processed"] == 9
    assert "discovery:" in (dst / "archive-rank0.log").read_text()
    assert "discovery:" not in (dst / "archive-rank1.log").read_text()  # same launch: rank 1 reused it


_CLAIMER = """
import json, random, sys, time
from pipelines.manifest import Manifest
m = Manifest(sys.argv[1])
ids = [r["id"] for r in m.rows()]
random.Random(int(sys.argv[3])).shuffle(ids)
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
got = [i for i in ids if m.claim(i, sys.argv[3]) is not None]
for i in got:
    m.finish(i, "done", seconds=0.0, score=0.0)
print(json.dumps(got))
"""


@pytest.mark.slow  # several processes; tens of seconds on a 2-core machine
def test_concurrent_claims_never_duplicate_work(tmp_path: Path) -> None:
    """Three processes race to claim the same 60 items of one manifest: each item goes to exactly one."""
    manifest = Manifest(tmp_path / "manifest.sqlite")
    manifest.add_items([Item(f"nifti:scan{i}.nii", "nifti", [f"scan{i}.nii"], out_parts=(f"scan{i}",))
                        for i in range(60)])
    manifest.close()
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", _CLAIMER, str(tmp_path / "manifest.sqlite"), str(start), str(k)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True) for k in range(3)]
    claimed = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    everything = [i for got in claimed for i in got]
    assert len(everything) == len(set(everything)) == 60
    assert {r["state"] for r in rows(tmp_path).values()} == {"done"}
