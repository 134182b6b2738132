"""A private Orthanc PACS with its DICOMweb plugin, for tests that talk to a real PACS.

Orthanc 1.10 has no option to listen on one address only, so it runs in a private network namespace
(``unshare -rn``) whose only interface is its own 127.0.0.1: nothing outside the test can reach its ports. The
test therefore runs its PACS exchange as a child process in that namespace (:func:`run_in_namespace`), which
starts Orthanc (:func:`start_orthanc`) in a temp folder with its own config and stops it by its PID
(:func:`stop_orthanc`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
REPO = Path(__file__).resolve().parents[1]

__all__ = ["ORTHANC", "DICOMWEB_PLUGIN", "why_not", "free_port", "wait_http", "start_orthanc", "stop_orthanc",
           "run_in_namespace"]


def why_not() -> str:
    """Why a PACS exchange cannot run here ("" when it can)."""
    if ORTHANC is None or not DICOMWEB_PLUGIN.exists():
        return "Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)"
    for module in ("pynetdicom", "dicomweb_client"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e '.[test]')"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare/ip missing: Orthanc 1.10 cannot be held to 127.0.0.1 without a private network namespace"
    probe = subprocess.run(["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return ("no private network namespace allowed here (unshare -rn failed); Orthanc 1.10 cannot be held "
                "to 127.0.0.1 otherwise")
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, auth: tuple[str, str] | None = None) -> None:
    """Wait until ``url`` answers (any HTTP status counts: the server is up)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:  # 401 without credentials: it is up
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"Orthanc did not answer in 60 s: {log.read_text()[-2000:]}")


def start_orthanc(work: Path, users: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str, int, str]:
    """Orthanc on free 127.0.0.1 ports with its database in ``work/db``; ``users`` turns on HTTP basic auth.

    Returns:
        (process, http base URL, DICOM port, DICOM AE title).
    """
    http_port, dicom_port, aet = free_port(), free_port(), "MEDSRPACS"
    (work / "db").mkdir(parents=True, exist_ok=True)
    config = {"Name": "medsr-test", "StorageDirectory": str(work / "db"), "IndexDirectory": str(work / "db"),
              "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": aet, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {},
              "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": False,
              "DicomModalities": {}, "OrthancPeers": {}, "Plugins": [str(DICOMWEB_PLUGIN)],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
              "SaveJobs": False, "StableAge": 1, "HttpTimeout": 20}
    (work / "orthanc.json").write_text(json.dumps(config))
    log = work / "orthanc.log"
    assert ORTHANC is not None
    with log.open("wb") as sink:
        proc = subprocess.Popen([ORTHANC, str(work / "orthanc.json")], stdout=sink, stderr=subprocess.STDOUT)
    http = f"http://127.0.0.1:{http_port}"
    try:
        wait_http(f"{http}/system", proc, log)
    except BaseException:
        stop_orthanc(proc)
        raise
    return proc, http, dicom_port, aet


def stop_orthanc(proc: subprocess.Popen[bytes]) -> int:
    """Stop Orthanc by its PID (terminate, then kill); returns its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def run_in_namespace(argv: list[str], timeout_s: float) -> tuple[int, str]:
    """Run ``python ARGV`` in a private network namespace (only its own loopback, brought up); kill its whole
    process group if it runs past ``timeout_s``. Returns (exit code, output)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable,
                              *argv], env=env, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    try:
        output, _ = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        output = b""
    finally:
        if child.poll() is None:  # timed out: end the child's own process group (the session and its Orthanc)
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    return int(child.returncode), output.decode(errors="replace")
