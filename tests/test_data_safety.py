"""Nothing lost, nothing overwritten (issue 11): every hostile or careless input is made here, in a temp dir.

Each command-line case checks the four guarantees the README states: the inputs' bytes (sha256) are unchanged,
nothing appears outside the output folder, a bad input ends with ``medsr: error:`` naming the file (exit 2, no
traceback), and a good one gets its own complete output folder. Inputs are small crops of real scans (nibabel's
T1, pydicom's CT_small) so enhancing them with the tiny random-weight model takes a second or two.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import yaml
from enhance_fixtures import NIFTI_REF, tiny_config, tiny_model, write_tiny_checkpoint
from pydicom.uid import generate_uid
from typer.testing import CliRunner, Result

import medsr.cli
import medsr.enhance
from medsr.config import load_config
from medsr.enhance import EnhanceOptions, enhance_scan
from medsr.errors import MedsrError
from medsr.io import load_scan, sanitize_component
from medsr.io.paths import printable
from medsr.io.refs import resolve_ref
from medsr.model import load_checkpoint, load_model, save_checkpoint
from medsr.outputs import write_outputs
from pipelines.archive import ArchiveOptions, load_archive_options, run_archive
from pipelines.discover import discover

FAST = ["--samples", "1", "--steps", "1", "--device", "cpu", "--amp", "none"]
T1 = np.asarray(nib.load(str(resolve_ref(NIFTI_REF))).dataobj, dtype=np.float32)  # real T1, 33x41x25


# --- helpers -----------------------------------------------------------------------------------------------------

def tree(root: Path) -> dict[str, str]:
    """sha256 of every file (and the target of every link) under ``root``, by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = f"link -> {os.readlink(p)}"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run(*args: str) -> Result:
    torch.set_num_threads(1)
    return CliRunner().invoke(medsr.cli.app, list(args))


def assert_safe(before: dict[str, str], root: Path, out: Path | None) -> None:
    """Every file that was there is byte-identical; anything new lies inside ``out``."""
    after = tree(root)
    for rel, digest in before.items():
        assert after.get(rel) == digest, f"{rel} was changed or removed"
    prefix = "" if out is None else out.relative_to(root).as_posix() + "/"
    new = [rel for rel in after if rel not in before]
    stray = [rel for rel in new if not (prefix and rel.startswith(prefix))]
    assert not stray, f"written outside the output folder: {stray}"


def assert_refused(res: Result, *needles: str) -> None:
    assert res.exit_code == 2, res.output
    assert "medsr: error:" in res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)


def nifti(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None, **header: Any) -> Path:
    """A 16x16x2 crop of the real T1 (or ``data``), 2 mm voxels unless ``affine`` says otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = T1[8:24, 12:28, 10:12].copy() if data is None else data
    img = nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine)
    for key, value in header.items():
        img.header[key] = value
    nib.save(img, str(path))
    return path


def small_ct(path: Path, size: int = 24, **changes: Any) -> Path:
    """A centre crop of pydicom's real CT_small as a fresh one-slice series, with some attributes changed."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    lo = (128 - size) // 2
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[lo:lo + size, lo:lo + size]).tobytes()
    ds.Rows = ds.Columns = size
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in changes.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", tiny_config())


@pytest.fixture
def no_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Geometry and size problems must stop the run before any diffusion sampling starts."""
    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("sampling started on an input that should have been refused at load")

    monkeypatch.setattr(medsr.enhance, "enhance_scan", refuse)


def report(folder: Path) -> dict[str, Any]:
    def no_constants(name: str) -> None:
        raise AssertionError(f"report.json holds a bare {name}")

    return json.loads((folder / "report.json").read_text(), parse_constant=no_constants)


# --- 1. one folder per input, readable names, input recorded, reruns replace the whole folder ---------------------

def test_inputs_with_one_name_get_separate_folders(ckpt: Path, tmp_path: Path) -> None:
    a, b = nifti(tmp_path / "a" / "brain.nii.gz"), nifti(tmp_path / "b" / "brain.nii.gz", T1[0:16, 0:16, 0:2].copy())
    c = nifti(tmp_path / "b" / "brain.nii", T1[16:32, 16:32, 4:6].copy())  # brain.nii next to brain.nii.gz
    before, out = tree(tmp_path), tmp_path / "o"
    res = run("enhance", str(a), str(b), str(c), "--model", str(ckpt), "--out", str(out), *FAST)
    assert res.exit_code == 0, res.output
    assert_safe(before, tmp_path, out)
    folders = sorted(p for p in out.iterdir())
    assert len(folders) == 3 and (out / "brain") in folders
    sources = {report(f)["input"]["source"] for f in folders}
    assert sources == {str(a.resolve()), str(b.resolve()), str(c.resolve())}
    assert res.stderr.count("note:") == 2 and "has the same name" in res.stderr  # said so
    means = [np.asarray(nib.load(f / "mean.nii.gz").dataobj) for f in folders]
    assert not np.allclose(means[0], means[1]) and not np.allclose(means[1], means[2])


def test_non_ascii_names_stay_readable_and_distinct(ckpt: Path, tmp_path: Path) -> None:
    tokyo, osaka = nifti(tmp_path / "東京.nii.gz"), nifti(tmp_path / "大阪.nii.gz")
    before, out = tree(tmp_path), tmp_path / "o"
    res = run("enhance", str(tokyo), str(osaka), "--model", str(ckpt), "--out", str(out), *FAST)
    assert res.exit_code == 0, res.output
    assert_safe(before, tmp_path, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(["東京", "大阪"])
    assert report(out / "東京")["input"]["source"] == str(tokyo.resolve())


@pytest.mark.parametrize(("text", "expected"), [("東京", "東京"), ("Müller", "Müller"), ("a/b\\c", "a_b_c"),
                                                ("x\x1b[2Jy", "x_2Jy"), ("evil\u202egpj.exe", "evil_gpj.exe"),
                                                ("../..", "unnamed"), ("\x00", "unnamed")])
def test_sanitised_names_keep_letters_drop_separators_and_controls(text: str, expected: str) -> None:
    assert sanitize_component(text) == expected


def test_rerun_replaces_the_whole_folder(ckpt: Path, tmp_path: Path) -> None:
    scan = small_ct(tmp_path / "in" / "ct.dcm")
    before, out = tree(tmp_path), tmp_path / "o"
    first = run("enhance", str(scan), "--model", str(ckpt), "--out", str(out), "--save-samples", *FAST)
    assert first.exit_code == 0, first.output
    assert {"dicom_mean", "dicom_std", "samples.nii.gz"} <= {p.name for p in (out / "ct").iterdir()}
    second = run("enhance", str(scan), "--model", str(ckpt), "--out", str(out), "--format", "nifti", *FAST)
    assert second.exit_code == 0, second.output
    assert_safe(before, tmp_path, out)
    names = sorted(p.name for p in (out / "ct").iterdir())
    assert names == sorted(report(out / "ct")["files"])  # only the second run's files, nothing merged in
    assert "dicom_mean" not in names and "samples.nii.gz" not in names
    assert [p.name for p in out.iterdir()] == ["ct"]  # no temporary or old folders left behind


def test_a_folder_medsr_did_not_write_is_left_alone(ckpt: Path, tmp_path: Path) -> None:
    scan = nifti(tmp_path / "brain.nii.gz")
    user = tmp_path / "o" / "brain"
    user.mkdir(parents=True)
    (user / "thesis.txt").write_text("years of work\n")
    before = tree(tmp_path)
    res = run("enhance", str(scan), "--model", str(ckpt), "--out", str(tmp_path / "o"), *FAST)
    assert res.exit_code == 0, res.output
    assert_safe(before, tmp_path, tmp_path / "o")
    assert "holds files medsr did not write" in res.stderr
    (done,) = [p for p in (tmp_path / "o").iterdir() if p != user]
    assert done.name.startswith("brain_") and report(done)["input"]["source"] == str(scan.resolve())


# --- 2. no output ever lands on an input ---------------------------------------------------------------------------

def test_output_never_lands_on_the_input(ckpt: Path, tmp_path: Path) -> None:
    d = tmp_path / "d"
    scan = nifti(d / "mean" / "mean.nii.gz")  # a previous output used as input, --out its grandparent
    before = tree(tmp_path)
    res = run("enhance", str(scan), "--model", str(ckpt), "--out", str(d), *FAST)
    assert res.exit_code == 0, res.output
    assert_safe(before, tmp_path, d)
    assert "would overwrite the input" in res.stderr
    assert sorted(p.name for p in (d / "mean").iterdir()) == ["mean.nii.gz"]


def test_dicom_folder_input_is_never_replaced(ckpt: Path, tmp_path: Path) -> None:
    series = tmp_path / "series"
    small_ct(series / "slice.dcm")
    before = tree(tmp_path)
    res = run("enhance", str(series), "--model", str(ckpt), "--out", str(tmp_path), "--format", "nifti", *FAST)
    assert res.exit_code == 0, res.output
    after = tree(tmp_path)
    assert all(after[rel] == digest for rel, digest in before.items())
    assert sorted(p.name for p in series.iterdir()) == ["slice.dcm"]


def test_write_outputs_refuses_the_input_folder(tmp_path: Path) -> None:
    scan_path = nifti(tmp_path / "x" / "x.nii.gz")
    scan = load_scan(scan_path)
    model = tiny_model(tmp_path / "m.pt")
    result = enhance_scan(scan, model, EnhanceOptions(samples=1, steps=1, device="cpu", amp="none"))
    before = tree(tmp_path)
    with pytest.raises(MedsrError, match="would overwrite the input"):
        write_outputs(scan, result, model, EnhanceOptions(), tmp_path, name="x")
    assert tree(tmp_path) == before


# --- 3. planted links are never followed ---------------------------------------------------------------------------

def test_planted_links_send_nothing_elsewhere(ckpt: Path, tmp_path: Path) -> None:
    scan = small_ct(tmp_path / "in" / "ct.dcm", PatientName="Doe^Jane")
    victim = tmp_path / "victim"
    victim.mkdir()
    out = tmp_path / "o"
    out.mkdir()
    (out / "ct").symlink_to(victim, target_is_directory=True)  # the item's folder itself
    res = run("enhance", str(scan), "--model", str(ckpt), "--out", str(out), *FAST)
    assert res.exit_code == 0, res.output
    assert list(victim.iterdir()) == [] and (out / "ct").is_symlink()
    # a previous output holding links at the old predictable temporary names
    res = run("enhance", str(scan), "--model", str(ckpt), "--out", str(tmp_path / "o2"), *FAST)
    assert res.exit_code == 0, res.output
    for pid in range(os.getpid() - 2, os.getpid() + 3):
        (tmp_path / "o2" / "ct" / f".tmp-dicom_mean-{pid}").symlink_to(victim, target_is_directory=True)
    res = run("enhance", str(scan), "--model", str(ckpt), "--out", str(tmp_path / "o2"), *FAST)
    assert res.exit_code == 0, res.output
    assert list(victim.iterdir()) == []
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "o2" / "ct").iterdir())


# --- 4. broken geometry is refused at load, before any compute, naming the file -------------------------------------

def _singular() -> np.ndarray:
    a = np.diag([2.0, 2.0, 2.0, 1.0])
    a[:3, 1] = a[:3, 0]  # two axes the same way
    return a


@pytest.mark.parametrize(("kind", "message"), [
    ("singular sform", "singular"), ("zero sform", "voxel size"), ("NaN sform", "not finite"),
    ("NaN qform", "not finite")])
def test_broken_nifti_geometry_is_refused_before_sampling(kind: str, message: str, ckpt: Path, tmp_path: Path,
                                                          no_sampling: None) -> None:
    path = tmp_path / f"{kind.replace(' ', '_')}.nii.gz"
    data = T1[8:24, 12:28, 10:12].copy()
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    hdr.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    if kind == "singular sform":
        hdr.set_sform(_singular(), code=1)
    elif kind == "zero sform":
        hdr["srow_x"][:3] = hdr["srow_y"][:3] = hdr["srow_z"][:3] = 0.0
    elif kind == "NaN sform":
        hdr["srow_x"][:] = np.nan
    else:
        hdr["quatern_b"] = np.nan  # the sform is fine, but a coded qform is damaged
    hdr.set_data_offset(352)
    # written byte for byte, as a hostile file would be (nibabel's writer repairs some of these)
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + data.astype("<f4").tobytes()))
    before = tree(tmp_path)
    res = run("enhance", str(path), "--model", str(ckpt), "--out", str(tmp_path / "o"), *FAST)
    assert_refused(res, str(path), message)
    assert_safe(before, tmp_path, None)  # not even an empty output folder


@pytest.mark.parametrize(("changes", "message"), [
    ({"PixelSpacing": [0, 0]}, "PixelSpacing 0\\0"),
    ({"PixelSpacing": [-0.66, 0.66]}, "spacing must be positive"),
    ({"SliceThickness": 0, "SpacingBetweenSlices": 0}, "SliceThickness/SpacingBetweenSlices 0"),
    ({"ImageOrientationPatient": [1, 0, 0, 1, 0, 0]}, "parallel"),
    ({"ImageOrientationPatient": [1, 0, 0, 0.2, 0.98, 0]}, "skewed"),
    ({"RescaleSlope": 0}, "RescaleSlope is 0"),
    ({"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB", "PlanarConfiguration": 0}, "colour"),
])
def test_damaged_dicom_tags_are_refused_naming_the_file(changes: dict[str, Any], message: str,
                                                        tmp_path: Path) -> None:
    if changes.get("SamplesPerPixel") == 3:  # an RGB version of the slice: three copies of each pixel
        ds = pydicom.dcmread(small_ct(tmp_path / "grey.dcm"))
        grey = (ds.pixel_array.astype(np.int32) - ds.pixel_array.min()) * 255 // np.ptp(ds.pixel_array)
        changes = {**changes, "BitsAllocated": 8, "BitsStored": 8, "HighBit": 7, "PixelRepresentation": 0,
                   "PixelData": np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1).tobytes()}
    path = small_ct(tmp_path / "bad.dcm", **changes)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(MedsrError, match="bad.dcm") as err:
        load_scan(path)
    assert message in str(err.value)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_dicom_geometry_error_from_the_command_line(ckpt: Path, tmp_path: Path, no_sampling: None) -> None:
    path = small_ct(tmp_path / "flat.dcm", PixelSpacing=[0, 0])
    before = tree(tmp_path)
    res = run("enhance", str(path), "--model", str(ckpt), "--out", str(tmp_path / "o"), *FAST)
    assert_refused(res, str(path), "PixelSpacing")
    assert_safe(before, tmp_path, None)


# --- 5. never an all-NaN result, never a bare NaN in report.json ---------------------------------------------------

def test_intensities_that_would_overflow_are_refused_at_load(ckpt: Path, tmp_path: Path, no_sampling: None) -> None:
    path = nifti(tmp_path / "huge.nii.gz", np.full((16, 16, 2), 3e38, np.float32))
    before = tree(tmp_path)
    res = run("enhance", str(path), "--model", str(ckpt), "--out", str(tmp_path / "o"), *FAST)
    assert_refused(res, str(path), "intensities up to 3e+38")
    assert_safe(before, tmp_path, None)


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "nan.pt", tiny_config())
    ckpt = load_checkpoint(path)
    name = next(k for k, v in ckpt["ema"].items() if v.is_floating_point())
    ckpt["ema"][name] = torch.full_like(ckpt["ema"][name], float("nan"))
    save_checkpoint(path, {k: v for k, v in ckpt.items() if k != "format"})
    scan = nifti(tmp_path / "brain.nii.gz")
    before = tree(tmp_path)
    res = run("enhance", str(scan), "--model", str(path), "--out", str(tmp_path / "o"), *FAST)
    assert_refused(res, str(path), "NaN/Inf")
    assert_safe(before, tmp_path, None)


def test_non_finite_network_output_is_an_error_not_a_result(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "m.pt")
    with torch.no_grad():
        next(model.net.parameters()).fill_(float("inf"))  # weights damaged after loading (a bad GPU, a bug)
    scan = load_scan(nifti(tmp_path / "brain.nii.gz"))
    with pytest.raises(MedsrError, match="produced NaN/Inf values"):
        enhance_scan(scan, model, EnhanceOptions(samples=1, steps=1, device="cpu", amp="none"))


def test_report_json_is_strict_json_even_for_an_undefined_score(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "m.pt")
    scan = load_scan(nifti(tmp_path / "brain.nii.gz"))
    result = enhance_scan(scan, model, EnhanceOptions(samples=1, steps=1, device="cpu", amp="none"))
    result.score.mean_std = math.nan  # e.g. a score over no voxels
    folder = write_outputs(scan, result, model, EnhanceOptions(samples=1), tmp_path / "o")
    assert report(folder)["score"]["mean_std_fraction_of_range"] is None


# --- 6. declared size checked before decompressing ------------------------------------------------------------------

def test_a_decompression_bomb_is_refused_from_its_header(tmp_path: Path, no_sampling: None) -> None:
    path = tmp_path / "bomb.nii.gz"
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2048, 2048, 256))  # 4 GiB of float32 declared; the file holds a header and a few bytes
    hdr.set_data_dtype(np.float32)
    hdr.set_data_offset(352)
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + bytes(4096)))
    assert path.stat().st_size < 1000
    before = tree(tmp_path)
    res = run("info", str(path))
    assert_refused(res, str(path), "4.00 GiB decompressed", "MEDSR_MAX_IMAGE_BYTES")
    assert_safe(before, tmp_path, None)


def test_the_size_limit_is_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nii, dcm = nifti(tmp_path / "brain.nii.gz"), small_ct(tmp_path / "ct.dcm")
    load_scan(nii), load_scan(dcm)  # the default limit lets ordinary scans through
    monkeypatch.setenv("MEDSR_MAX_IMAGE_BYTES", "1000")
    for path in (nii, dcm):
        with pytest.raises(MedsrError, match=f"{path.name}: header declares .* more than the limit"):
            load_scan(path)
    monkeypatch.setenv("MEDSR_MAX_IMAGE_BYTES", "lots")
    with pytest.raises(MedsrError, match="MEDSR_MAX_IMAGE_BYTES must be a whole number"):
        load_scan(nii)


def test_a_dicom_declaring_a_huge_image_is_refused_before_decoding(tmp_path: Path) -> None:
    path = small_ct(tmp_path / "big.dcm", Rows=60000, Columns=60000, NumberOfFrames=100)
    with pytest.raises(MedsrError, match="big.dcm: header declares .* more than the limit"):
        load_scan(path)


# --- 7, 8. the archive: special files, config values, unreadable folders, changed inputs -----------------------------

def test_archive_discovery_skips_special_files_without_reading_them(tmp_path: Path) -> None:
    src = tmp_path / "src"
    nifti(src / "brain.nii.gz")
    (src / "zero.dcm").symlink_to("/dev/zero")
    os.mkfifo(src / "pipe.dcm")
    code = ("import json, sys; from pipelines.discover import discover; "
            "print(json.dumps([[i.id, i.state, i.category] for i in discover(sys.argv[1])]))")
    done = subprocess.run([sys.executable, "-c", code, str(src)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr
    items = {i: (s, c) for i, s, c in json.loads(done.stdout)}
    assert items["nifti:brain.nii.gz"] == ("pending", "")
    assert items["file:zero.dcm"] == ("skipped", "not a regular file")
    assert items["file:pipe.dcm"] == ("skipped", "not a regular file")


def test_archive_records_unreadable_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    nifti(src / "ok" / "brain.nii.gz")
    (src / "locked").mkdir()
    real = os.scandir

    def scandir(path: Any = ".") -> Any:  # as for a folder without read permission (tests may run as root)
        if Path(path) == src / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    items = {i.id: i for i in discover(src)}
    assert items["folder:locked"].state == "skipped" and items["folder:locked"].category == "unreadable folder"
    assert "Permission denied" in items["folder:locked"].reason
    assert items["nifti:ok/brain.nii.gz"].state == "pending"


@pytest.mark.parametrize("value", ["1.7", "abc", "[1, 2]", "true", "0"])
def test_archive_config_values_are_type_checked(value: str, tmp_path: Path) -> None:
    config = tmp_path / "archive.yaml"
    config.write_text(f"samples: {value}\n")
    with pytest.raises(MedsrError, match="samples"):
        load_archive_options(config)
    src = tmp_path / "src"
    nifti(src / "brain.nii.gz")
    before = tree(tmp_path)
    res = run("archive", str(src), "--out", str(tmp_path / "o"), "--config", str(config))
    assert_refused(res, "samples")
    assert_safe(before, tmp_path, None)


@pytest.mark.parametrize("text", ["- samples\n- 2\n", "samples: 2\nworkers: 1.5\n", "format: png\n",
                                  "min_size: -1\n", "retry_failed: 3\n"])
def test_archive_config_shapes_and_ranges(text: str, tmp_path: Path) -> None:
    config = tmp_path / "archive.yaml"
    config.write_text(text)
    with pytest.raises(MedsrError):
        load_archive_options(config)


def test_archive_redoes_inputs_changed_after_a_run(ckpt: Path, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    scan = nifti(src / "brain.nii.gz")
    opts = ArchiveOptions(model=str(ckpt), samples=1, steps=1, device="cpu", amp="none", progress=False, threads=1)
    first = run_archive(src, dst, opts)
    assert first["counts"]["done"] == 1
    old = np.asarray(nib.load(dst / "brain" / "mean.nii.gz").dataobj)
    assert run_archive(src, dst, opts)["this_run"]["processed"] == 0  # unchanged: nothing redone
    nifti(scan, T1[0:16, 0:16, 0:2].copy())  # the scan is replaced by another one under the same name
    os.utime(scan, ns=(os.stat(scan).st_atime_ns, os.stat(scan).st_mtime_ns + 10**9))
    third = run_archive(src, dst, opts)
    assert third["this_run"]["done"] == 1
    new = np.asarray(nib.load(dst / "brain" / "mean.nii.gz").dataobj)
    assert not np.allclose(old, new)
    assert "brain.nii.gz changed since the last run; redoing it" in (dst / "archive.log").read_text()


# --- 9-12. the low items: clear errors, not tracebacks or silent changes --------------------------------------------

@pytest.mark.parametrize(("kind", "message"), [("5D", "5D image"), ("RGB", "colour"), ("complex", "complex-valued")])
def test_unsupported_nifti_kinds_are_refused(kind: str, message: str, tmp_path: Path) -> None:
    crop = T1[8:24, 12:28, 10:12]
    if kind == "5D":
        data = np.stack([np.stack([crop, crop], -1)] * 2, -1)  # (16, 16, 2, 2, 2)
    elif kind == "RGB":
        data = np.zeros(crop.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    else:
        data = crop.astype(np.complex64) * (1 + 1j)
    path = nifti(tmp_path / f"{kind}.nii.gz", data)
    with pytest.raises(MedsrError, match=f"{kind}.nii.gz: .*{message}"):
        load_scan(path)


def test_pixel_data_longer_than_declared_is_refused(tmp_path: Path) -> None:
    ds = pydicom.dcmread(small_ct(tmp_path / "ok.dcm"))
    path = small_ct(tmp_path / "long.dcm", PixelData=ds.PixelData * 2)
    with pytest.warns(UserWarning), pytest.raises(MedsrError, match="long.dcm: pixel data decodes to .* damaged"):
        load_scan(path)


@pytest.mark.parametrize("overlap", ["1.0", "-0.5"])
def test_bad_overlap_is_refused(overlap: str, ckpt: Path, tmp_path: Path) -> None:
    scan = nifti(tmp_path / "brain.nii.gz")
    before = tree(tmp_path)
    res = run("enhance", str(scan), "--model", str(ckpt), "--out", str(tmp_path / "o"), "--overlap", overlap, *FAST)
    assert_refused(res, "overlap must be in [0, 1)")
    assert_safe(before, tmp_path, None)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("step", "many", "'step' must be a whole number"),
    ("calibration", -1.0, "stored calibration is invalid.*must be a positive"),
    ("calibration", "abc", "stored calibration has an unknown layout"),
    ("ema", [1, 2], "'ema' is not a dict of tensors"), ("config", ["x"], "stored config is invalid")])
def test_malformed_checkpoint_fields_are_refused(field: str, value: Any, message: str, tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "m.pt", tiny_config())
    ckpt = load_checkpoint(path)
    ckpt[field] = value
    save_checkpoint(path, {k: v for k, v in ckpt.items() if k != "format"})
    with pytest.raises(MedsrError, match=message):
        load_model(path)


@pytest.mark.parametrize(("override", "message"), [
    ("train.lr=0", "train.lr: must be a finite number > 0"), ("train.lr=.nan", "train.lr"),
    ("train.lr=-1e-3", "train.lr"), ("train.batch_size=0", "train.batch_size: must be >= 1"),
    ("train.ckpt_every=0", "train.ckpt_every"), ("train.log_every=0", "train.log_every"),
    ("model.norm_num_groups=5", "model.norm_num_groups: must be a divisor"),
    ("diffusion.schedule=quadratic", "diffusion.schedule: must be one of"), ("data.slice_axis=5", "data.slice_axis"),
    ("degrade.x=1", "config degrade: expected str"), ("train.steps=-1", "train.steps: must be >= 1"),
    ("train.ema_decay=2.0", "train.ema_decay: must be in [0, 1)"), ("train.steps=true", "expected int"),
    ("train.batch_size=2.5", "expected int"), ("train.lr=[1]", "expected a number")])
def test_training_config_is_validated(override: str, message: str) -> None:
    with pytest.raises(MedsrError, match=message.replace("[", r"\[").replace(")", r"\)")):
        load_config(None, [override])


def test_an_override_into_a_setting_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("degrade: block:2x2\n")
    with pytest.raises(MedsrError, match="degrade.x=1.*degrade is a setting, not a section"):
        load_config(config, ["degrade.x=1"])
    config.write_text("- a list\n")
    with pytest.raises(MedsrError, match="c.yaml: a config is a mapping"):
        load_config(config)


def test_train_command_refuses_a_bad_config_clearly(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train": {"lr": 0.0, "out_dir": str(tmp_path / "run")}}))
    before = tree(tmp_path)
    res = run("train", str(config))
    assert_refused(res, "train.lr")
    assert_safe(before, tmp_path, None)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the hostile UID is the point
def test_info_prints_header_text_safely(tmp_path: Path) -> None:
    uid = "1.2.3.\x1b[2J\x1b]0;owned\x07"
    path = small_ct(tmp_path / "esc.dcm", SeriesInstanceUID=uid)
    res = run("info", str(path))
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.output and "\x07" not in res.output
    assert printable(uid) in res.output  # shown, escaped: \x1b[2J...
    res = run("info", str(path), "--json")
    assert json.loads(res.output)["series_uid"] == uid  # JSON keeps the exact text, escaped by the encoder
    assert "\x1b" not in res.output


def test_4d_input_says_how_to_choose_a_volume(ckpt: Path, tmp_path: Path) -> None:
    crop = T1[8:24, 12:28, 10:12]
    path = nifti(tmp_path / "fmri.nii.gz", np.stack([crop, crop[::-1]], -1))
    before = tree(tmp_path)
    res = run("enhance", str(path), "--model", str(ckpt), "--out", str(tmp_path / "o"), *FAST)
    assert_refused(res, str(path), "--volume-index (0..1)")
    assert_safe(before, tmp_path, None)
    res = run("enhance", str(path), "--model", str(ckpt), "--out", str(tmp_path / "o"), "--volume-index", "1", *FAST)
    assert res.exit_code == 0, res.output
    assert_safe(before, tmp_path, tmp_path / "o")
    assert nib.load(tmp_path / "o" / "fmri" / "mean.nii.gz").shape == (32, 32, 2)
