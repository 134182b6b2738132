"""Named references to real scans that ship inside installed packages, so configs stay portable.

``pydicom:NAME`` (pydicom's or pydicom-data's test files), ``nilearn:mni152`` (the MNI152 2009a T1 template),
``nibabel:NAME`` (nibabel's test data), ``invesalius:Cranium`` (Debian invesalius-examples); anything else is
a path. Nothing is downloaded: a missing package gives a clear error saying what to install.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from medsr.errors import Category, MedsrError
from medsr.io.invesalius import load_inv3
from medsr.io.scan import Scan

__all__ = ["resolve_ref", "load_ref"]

INVESALIUS_DIR = Path("/usr/share/doc/invesalius-examples/examples")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MedsrError(f"package {name!r} is not installed (pip install {name})", Category.NOT_FOUND)
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_ref(ref: str | os.PathLike[str]) -> Path:
    """Turn a named reference or a path into an existing path."""
    text = str(ref)
    scheme, _, name = text.partition(":")
    if scheme == "pydicom" and name:
        from pydicom.data import get_testdata_file

        try:
            found = get_testdata_file(name)
        except Exception as exc:  # pydicom may try a download for unknown names; never let it
            raise MedsrError(f"{text}: not available offline ({exc})", Category.NOT_FOUND) from None
        if not found:
            raise MedsrError(f"{text}: not found in pydicom's test data (pip install pydicom-data)",
                             Category.NOT_FOUND)
        return Path(str(found))
    if scheme == "nilearn" and name == "mni152":
        return _package_dir("nilearn") / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if scheme == "nibabel" and name:
        return _package_dir("nibabel") / "tests" / "data" / name
    if scheme == "invesalius" and name:
        path = INVESALIUS_DIR / f"{name}.inv3"
        if not path.is_file():
            raise MedsrError(f"{text}: {path} missing (apt-get install invesalius-examples)", Category.NOT_FOUND)
        return path
    return Path(text)


def load_ref(ref: str | os.PathLike[str], modality: str | None = None) -> Scan:
    """Load a scan from a named reference or path (InVesalius projects included)."""
    from medsr.io.load import load_scan

    path = resolve_ref(ref)
    scan = load_inv3(path) if path.suffix == ".inv3" else load_scan(path)
    if modality:
        scan.modality = modality
    return scan
