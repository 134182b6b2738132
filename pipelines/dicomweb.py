"""A PACS as the archive: list series with QIDO-RS, fetch them with WADO-RS, store results back with STOW-RS.

``medsr archive dicomweb+http://HOST:PORT/dicom-web --out DST [--store-back]`` treats every series the PACS
lists (optionally filtered by modality, study date and series description) as one archive item. The HTTP work
is done by ``dicomweb-client``; this module only decides what to ask for and where the answers go:

- **Listing** (:func:`list_series`): one QIDO-RS series query; each series becomes an item
  ``dicomweb:<SeriesInstanceUID>`` whose output folder is made of digests and the integer SeriesNumber only
  (no DICOM text reaches a path). Its fingerprint is the number of instances the PACS reports, so a series that
  grew since the last run is redone. Series this archive stored back are left out of the listing (the manifest
  knows their UIDs); any other series medsr derived is recognised after download (its SoftwareVersions) and
  skipped, so results are never enhanced again.
- **Retrieval** (:func:`fetch_series`): WADO-RS into ``DST/.medsr-archive/cache/<key>.part-<pid>/``, renamed to
  ``cache/<key>/`` only when every instance is on disk: a cache folder without ``.part`` is complete, so an item
  interrupted after its download is not downloaded again. :func:`process_remote` removes the cache folder once
  the item has an outcome.
- **Store-back** (:func:`store_back`): before sending, the PACS is asked which derived instances it already
  holds (QIDO-RS per derived series); only the missing ones are sent with STOW-RS. A run killed between the
  STOW and the manifest update therefore never stores anything twice.

Credentials never come from the command line: a URL with ``user:password@`` is refused. They come from the
environment (``MEDSR_DICOMWEB_TOKEN`` for a bearer token, or ``MEDSR_DICOMWEB_USER`` and
``MEDSR_DICOMWEB_PASSWORD``) or from a JSON file (``{"user": ..., "password": ...}`` or ``{"token": ...}``)
named by ``--credentials`` or ``MEDSR_DICOMWEB_CREDENTIALS``. Nothing here logs or stores them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydicom

from medsr.errors import Category, MedsrError
from pipelines.discover import Item
from pipelines.worker import process

__all__ = ["SCHEME", "is_dicomweb", "parse_source", "connect", "list_series", "fetch_series", "process_remote",
           "store_back", "derived_files"]

SCHEME = "dicomweb+"
log = logging.getLogger("pipelines.archive")

_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"
_MODALITY, _SERIES_NUMBER, _N_INSTANCES = "00080060", "00200011", "00201209"


def is_dicomweb(source: str | os.PathLike[str]) -> bool:
    """True for ``dicomweb+http(s)://...`` archive sources."""
    return isinstance(source, str) and source.startswith(SCHEME)


def parse_source(source: str) -> str:
    """The service URL of a ``dicomweb+http(s)://HOST[:PORT]/PATH`` source; user info and queries refused."""
    url = source[len(SCHEME):] if source.startswith(SCHEME) else source
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MedsrError(f"{source}: a DICOMweb source is dicomweb+http://HOST:PORT/PATH or dicomweb+https://...")
    if parts.username is not None or parts.password is not None:
        raise MedsrError("the DICOMweb URL holds a user name or password: give credentials in the environment "
                         "(MEDSR_DICOMWEB_USER / MEDSR_DICOMWEB_PASSWORD or MEDSR_DICOMWEB_TOKEN) or a "
                         "credentials file, never on the command line")
    if parts.query or parts.fragment:
        raise MedsrError(f"{url}: no query in the DICOMweb URL; filter with --modality, --study-date, "
                         "--series-description")
    return url.rstrip("/")


def _credentials(credentials_file: str | None) -> dict[str, str]:
    path = credentials_file or os.environ.get("MEDSR_DICOMWEB_CREDENTIALS", "")
    if path:
        try:
            found = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise MedsrError(f"{path}: cannot read the DICOMweb credentials file "
                             f"({type(exc).__name__}); expected JSON with user and password, or token") from None
        if not isinstance(found, dict) or not ({"user", "password"} <= found.keys() or "token" in found):
            raise MedsrError(f"{path}: the DICOMweb credentials file needs \"user\" and \"password\", or \"token\"")
        return {k: str(v) for k, v in found.items() if k in ("user", "password", "token")}
    env = os.environ
    if env.get("MEDSR_DICOMWEB_TOKEN"):
        return {"token": env["MEDSR_DICOMWEB_TOKEN"]}
    if env.get("MEDSR_DICOMWEB_USER"):
        return {"user": env["MEDSR_DICOMWEB_USER"], "password": env.get("MEDSR_DICOMWEB_PASSWORD", "")}
    return {}


def connect(url: str, credentials_file: str | None = None, timeout_s: float = 60.0) -> Any:
    """A ``DICOMwebClient`` for ``url`` with the credentials from the environment or the file."""
    try:
        from dicomweb_client.api import DICOMwebClient
        from dicomweb_client.session_utils import create_session
    except ImportError:
        raise MedsrError("a DICOMweb source needs dicomweb-client: pip install 'medsr[archive]'") from None
    session = create_session()
    creds = _credentials(credentials_file)
    if "token" in creds:
        session.headers["Authorization"] = f"Bearer {creds['token']}"
    elif creds:
        session.auth = (creds["user"], creds["password"])
    return DICOMwebClient(url=url, session=session, timeout=timeout_s)


def _explain(exc: Exception, url: str, what: str) -> MedsrError:
    """A request failure as a MedsrError naming the service (never the credentials) and what failed."""
    import requests

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        why = f"the PACS refused the credentials (HTTP {status}); set MEDSR_DICOMWEB_USER/PASSWORD, " \
              "MEDSR_DICOMWEB_TOKEN or a credentials file"
    elif status is not None:
        why = f"HTTP {status}"
    elif isinstance(exc, requests.ConnectionError):
        why = "cannot connect"
    else:
        why = type(exc).__name__
    return MedsrError(f"{url}: {what} failed: {why}", Category.NOT_FOUND if status == 404 else Category.INVALID)


def _value(attrs: dict[str, Any], tag: str) -> Any:
    values = attrs.get(tag, {}).get("Value") or [None]
    return values[0]


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def list_series(client: Any, modality: str = "", study_date: str = "",
                series_description: str = "") -> tuple[list[Item], dict[str, str], dict[str, str]]:
    """Every series the PACS lists for the filters, as archive items.

    Args:
        client: from :func:`connect`.
        modality: e.g. ``CT``; "" for all.
        study_date: ``YYYYMMDD`` or a range ``YYYYMMDD-YYYYMMDD`` (either end may be left open); "" for all.
        series_description: DICOM wildcard match (``*`` and ``?``); "" for all.

    Returns:
        (items, {item id: StudyInstanceUID}, {item id: fingerprint}).
    """
    filters = {k: v for k, v in (("Modality", modality), ("StudyDate", study_date),
                                 ("SeriesDescription", series_description)) if v}
    fields = [_STUDY_UID, _SERIES_NUMBER, _N_INSTANCES, _MODALITY]
    try:
        found = client.search_for_series(search_filters=filters, fields=fields, get_remaining=True)
    except Exception as exc:
        raise _explain(exc, client.base_url, "QIDO-RS series query") from None
    items, studies, prints = [], {}, {}
    for attrs in found:
        series, study = _value(attrs, _SERIES_UID), _value(attrs, _STUDY_UID)
        if not series or not study:
            continue
        number = _value(attrs, _SERIES_NUMBER)
        item = Item(f"dicomweb:{series}", "dicom", [], series_uid=str(series))
        label = f"series{int(number)}" if isinstance(number, (int, float)) or str(number).isdigit() else "series"
        item.out_parts = (f"study_{_digest(str(study))[:12]}", f"{label}_{item.key[:8]}")
        items.append(item)
        studies[item.id] = str(study)
        prints[item.id] = f"instances:{_value(attrs, _N_INSTANCES)}"
    return sorted(items, key=lambda it: it.id), studies, prints


def fetch_series(client: Any, study: str, series: str, cache: Path) -> tuple[Path, bool]:
    """The series' instances as files in ``cache`` (complete or absent); returns (folder, downloaded now).

    Files are named by their position (``000001.dcm`` ...), never by DICOM text.
    """
    if cache.is_dir():
        return cache, False
    part = cache.with_name(f"{cache.name}.part-{os.getpid()}")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    try:
        n = 0
        for n, ds in enumerate(client.iter_series(study, series), start=1):
            ds.save_as(part / f"{n:06d}.dcm", enforce_file_format=True)
        if n == 0:
            raise MedsrError(f"{client.base_url}: WADO-RS returned no instance for a listed series",
                             Category.NOT_FOUND)
        os.rename(part, cache)
    except MedsrError:
        raise
    except Exception as exc:
        raise _explain(exc, client.base_url, "WADO-RS retrieval") from None
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return cache, True


def process_remote(task: dict[str, Any]) -> dict[str, Any]:
    """Fetch the item's series into the cache, enhance it like a folder item, remove the cache; never raises.

    ``task["remote"]`` holds url, credentials (a file path or ""), study, series and cache (a folder path).
    The result carries ``transfer_s`` (download seconds; 0 when a complete cached copy was reused).
    """
    remote = task["remote"]
    cache = Path(remote["cache"])
    t0 = time.perf_counter()
    try:
        client = connect(remote["url"], remote["credentials"] or None)
        folder, downloaded = fetch_series(client, remote["study"], remote["series"], cache)
    except MedsrError as exc:
        return {"state": "failed", "category": "PACS retrieval", "reason": str(exc)[:500], "score": None,
                "seconds": round(time.perf_counter() - t0, 3), "pid": os.getpid(), "transfer_s": None}
    transfer = time.perf_counter() - t0 if downloaded else 0.0
    try:
        files = sorted(p.name for p in folder.iterdir() if p.suffix == ".dcm")
        if _made_by_medsr(folder / files[0]):
            result = {"state": "skipped", "category": "medsr output", "score": None, "pid": os.getpid(),
                      "reason": "a series medsr derived (SoftwareVersions names medsr); not enhanced again",
                      "seconds": round(time.perf_counter() - t0, 3)}
        else:
            result = process({**task, "root": str(folder), "sources": files})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["transfer_s"] = round(transfer, 3)
    return result


def _made_by_medsr(path: Path) -> bool:
    """True for an object medsr wrote (its SoftwareVersions end with ``medsr <version>``)."""
    try:
        found = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SoftwareVersions"]).get(
            "SoftwareVersions", "")
    except Exception:  # unreadable: the enhancement reports it properly
        return False
    values = [found] if isinstance(found, str) else [str(v) for v in found]
    return any(v.startswith("medsr ") for v in values)


def derived_files(folder: Path) -> list[Path]:
    """The DICOM objects medsr wrote for an item: the enhanced series and the Parametric Map."""
    return sorted((folder / "dicom_mean").glob("*.dcm")) + sorted((folder / "dicom_std").glob("*.dcm"))


def store_back(client: Any, folder: Path) -> tuple[int, int, list[str]]:
    """Send the item's derived objects that the PACS does not hold yet with STOW-RS.

    Returns:
        (instances sent now, instances the PACS already held, derived SeriesInstanceUIDs).
    """
    files = derived_files(folder)
    if not files:
        raise MedsrError(f"{folder}: no DICOM output to store back (was the archive run with --format nifti?)")
    headers = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in files}
    by_series: dict[tuple[str, str], list[Path]] = {}
    for f, h in headers.items():
        by_series.setdefault((str(h.StudyInstanceUID), str(h.SeriesInstanceUID)), []).append(f)
    missing: list[Path] = []
    try:
        for (study, series), group in by_series.items():
            held = {_value(a, _SOP_UID) for a in client.search_for_instances(
                study_instance_uid=study, series_instance_uid=series, fields=[_SOP_UID], get_remaining=True)}
            missing += [f for f in group if str(headers[f].SOPInstanceUID) not in held]
        if missing:
            answer = client.store_instances([pydicom.dcmread(f) for f in missing])
            failed = answer.get("FailedSOPSequence", []) if answer is not None else []
            if failed:
                raise MedsrError(f"{client.base_url}: STOW-RS refused {len(failed)} of {len(missing)} objects")
    except MedsrError:
        raise
    except Exception as exc:
        raise _explain(exc, client.base_url, "store-back (QIDO-RS / STOW-RS)") from None
    return len(missing), len(files) - len(missing), sorted({s for _, s in by_series})
