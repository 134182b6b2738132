"""A real PACS takes medsr's DICOM as it is: Orthanc stores it by C-STORE and STOW-RS and gives it back.

``medsr enhance`` writes a derived series and a Parametric Map from a real CT slice; a private Orthanc
(Debian ``orthanc`` + ``orthanc-dicomweb``) is started by this module in a temp folder with its own config,
and stopped by its PID. Orthanc 1.10 has no option to listen on one address only, so it runs in a private
network namespace (``unshare``) whose only interface is its own 127.0.0.1: nothing outside this test can reach
its ports. The exchange runs in one child process in that namespace (``python tests/test_pacs.py --session``);
it saves what the PACS returned, and the tests here check it:

- C-STORE (pynetdicom) and STOW-RS (dicomweb-client) are both accepted for every object, source included;
- Orthanc lists the derived objects in the source's study as separate series with distinct numbers;
- the Parametric Map and the images retrieved by WADO-RS decode to the values medsr wrote;
- dicom3tools' ``dcentvfy`` finds the retrieved source and derived objects one consistent study.

Each part skips with its reason where a tool is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pacs_fixtures import run_in_namespace, start_orthanc, stop_orthanc, why_not

SESSION_TIMEOUT_S = 180
pytestmark = pytest.mark.slow  # starts a real Orthanc in a network namespace and a child process: about 5 s


# --- the exchange, run as a child process inside a private network namespace --------------------------------------

def _c_store(files: list[Path], port: int, aet: str) -> list[int]:
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title="MEDSRTEST")
    for sop in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop, [str(ds.file_meta.TransferSyntaxUID) for ds in datasets
                                       if str(ds.SOPClassUID) == sop][:1])
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    if not assoc.is_established:
        raise RuntimeError("C-STORE association refused")
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _round(mode: str, files: list[Path], http: str, port: int, aet: str, out: Path) -> dict[str, Any]:
    """Store ``files`` by ``mode``, list the study's series, retrieve every instance by WADO-RS into ``out``."""
    import urllib.request

    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=f"{http}/dicom-web")
    if mode == "c-store":
        statuses = _c_store(files, port, aet)
    else:
        result = client.store_instances([pydicom.dcmread(f) for f in files])
        stored = {str(i.ReferencedSOPInstanceUID) for i in result.get("ReferencedSOPSequence", [])}
        failed = {str(i.ReferencedSOPInstanceUID) for i in result.get("FailedSOPSequence", [])}
        uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
        statuses = [0 if u in stored and u not in failed else 0xA700 for u in uids]
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    series = client.search_for_series(study_instance_uid=study)
    listed = [{"uid": s["0020000E"]["Value"][0], "modality": s["00080060"]["Value"][0],
               "number": int(s["00200011"]["Value"][0]) if s.get("00200011", {}).get("Value") else None}
              for s in series]
    out.mkdir(parents=True)
    for s in listed:
        for inst in client.search_for_instances(study_instance_uid=study, series_instance_uid=s["uid"]):
            sop = inst["00080018"]["Value"][0]
            ds = client.retrieve_instance(study, s["uid"], sop)
            ds.save_as(out / f"{sop}.dcm", enforce_file_format=True)
    for orthanc_id in json.loads(urllib.request.urlopen(f"{http}/studies").read()):
        urllib.request.urlopen(urllib.request.Request(f"{http}/studies/{orthanc_id}", method="DELETE")).read()
    left = len(json.loads(urllib.request.urlopen(f"{http}/instances").read()))  # the next round starts empty
    return {"statuses": statuses, "series": listed, "left_after_delete": left}


def _session(files: list[Path], work: Path) -> None:
    """Start Orthanc in ``work`` on free 127.0.0.1 ports, run both rounds, write ``work/result.json``; stop it."""
    proc, http, dicom_port, aet = start_orthanc(work)
    try:
        result = {"pid": proc.pid, "rounds": {mode: _round(mode, files, http, dicom_port, aet, work / mode)
                                              for mode in ("c-store", "stow-rs")}}
    finally:
        stop_orthanc(proc)
    result["exit_code"] = proc.returncode
    (work / "result.json").write_text(json.dumps(result))


# --- the tests -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def enhanced(ct_small_enhanced: tuple[Any, Path]) -> tuple[Path, Path]:
    """(the source CT file, medsr's output folder for it) from a real ``medsr enhance`` run (tiny model)."""
    from enhance_fixtures import DICOM_REF

    from medsr.io.refs import resolve_ref

    return resolve_ref(DICOM_REF), ct_small_enhanced[1]


@pytest.fixture(scope="module")
def exchange(enhanced: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    why = why_not()
    if why:
        pytest.skip(why)
    source, folder = enhanced
    files = [source, *sorted((folder / "dicom_mean").glob("*.dcm")), *sorted((folder / "dicom_std").glob("*.dcm"))]
    work = tmp_path_factory.mktemp("pacs")
    (work / "files.json").write_text(json.dumps([str(f) for f in files]))
    code, output = run_in_namespace([__file__, "--session", str(work)], SESSION_TIMEOUT_S)
    assert code == 0, output[-4000:]
    result = json.loads((work / "result.json").read_text())
    return {**result, "work": work, "files": files, "source": source, "folder": folder}


def test_orthanc_was_stopped(exchange: dict[str, Any]) -> None:
    assert exchange["exit_code"] is not None
    with pytest.raises(ProcessLookupError):
        os.kill(exchange["pid"], 0)  # unshare -rn keeps the host's PIDs: Orthanc's is gone


@pytest.mark.parametrize("mode", ["c-store", "stow-rs"])
def test_every_object_is_accepted_and_filed_in_the_source_study(exchange: dict[str, Any], mode: str) -> None:
    rnd = exchange["rounds"][mode]
    assert rnd["statuses"] == [0] * len(exchange["files"]) and rnd["left_after_delete"] == 0
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in exchange["files"]]
    expected = {str(h.SeriesInstanceUID) for h in headers}
    assert len(expected) == 3  # source, enhanced images, parametric map
    listed = {s["uid"]: s for s in rnd["series"]}
    assert set(listed) == expected  # all in the source's study, each its own series
    numbers = [listed[str(h.SeriesInstanceUID)]["number"] for h in (headers[0], headers[1], headers[-1])]
    assert len(set(numbers)) == 3 and numbers[1:] == [numbers[0] + 1000, numbers[0] + 1001]
    assert sorted(s["modality"] for s in rnd["series"]) == ["CT", "CT", "OT"]


@pytest.mark.parametrize("mode", ["c-store", "stow-rs"])
def test_wado_rs_returns_the_values_medsr_wrote(exchange: dict[str, Any], mode: str) -> None:
    back = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p) for p in (exchange["work"] / mode).glob("*.dcm"))}
    assert len(back) == len(exchange["files"])
    for path in exchange["files"][1:]:
        ours = pydicom.dcmread(path)
        theirs = back[ours.SOPInstanceUID]
        np.testing.assert_array_equal(theirs.pixel_array, ours.pixel_array)
        for kw in ("RescaleSlope", "RescaleIntercept", "ImagePositionPatient", "FrameOfReferenceUID"):
            assert theirs.get(kw) == ours.get(kw), kw
    from medsr.io import load_scan

    pm = next(ds for ds in back.values() if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30")
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "[hnsf'U]"
    std = load_scan(exchange["folder"] / "dicom_std").array[0, ..., 0].T  # (rows, cols) as medsr wrote it
    values = pm.pixel_array * float(mapping.RealWorldValueSlope) + float(mapping.RealWorldValueIntercept)
    np.testing.assert_array_equal(values, std)
    assert float(np.ptp(values)) > 0


@pytest.mark.skipif(shutil.which("dcentvfy") is None, reason="dicom3tools not installed (apt-get install dicom3tools)")
def test_retrieved_objects_form_one_consistent_study(exchange: dict[str, Any]) -> None:
    files = sorted(str(p) for p in (exchange["work"] / "stow-rs").glob("*.dcm"))
    run = subprocess.run(["dcentvfy", *files], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout + run.stderr == "", run.stdout + run.stderr


if __name__ == "__main__" and sys.argv[1:2] == ["--session"]:
    _work = Path(sys.argv[2])
    _session([Path(p) for p in json.loads((_work / "files.json").read_text())], _work)
