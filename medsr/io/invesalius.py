"""InVesalius project files (``.inv3``): a tar.gz with ``main.plist`` (shape, dtype, spacing) and raw ``matrix.dat``.

Debian's ``invesalius-examples`` ships a real head CT in this form, one of the few full volumes available
offline, so medsr can train on it. Read-only: the archive is streamed, never extracted next to the input.
"""

from __future__ import annotations

import os
import plistlib
import tarfile
from pathlib import Path

import numpy as np

from medsr.errors import Category, MedsrError
from medsr.io.scan import Scan

__all__ = ["load_inv3"]


def load_inv3(path: str | os.PathLike[str]) -> Scan:
    """Read the image matrix of an InVesalius project as a :class:`Scan` ``(1, X, Y, Z)``.

    The matrix is stored (slices, rows, columns); the project records no patient orientation, so the affine
    is the diagonal of the spacing in RAS axes (geometry is only used for spacing when training).
    """
    p = Path(path)
    try:
        with tarfile.open(p, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            meta = plistlib.load(tar.extractfile(members["main.plist"]))  # type: ignore[arg-type]
            info = meta["matrix"]
            raw = tar.extractfile(members[info["filename"]]).read()  # type: ignore[union-attr]
    except (OSError, KeyError, tarfile.TarError, plistlib.InvalidFileException) as exc:
        raise MedsrError(f"{p}: not a readable InVesalius project ({type(exc).__name__}: {exc})",
                          Category.UNREADABLE) from None
    shape = tuple(int(s) for s in info["shape"])
    data = np.frombuffer(raw, dtype=np.dtype(info["dtype"]))
    if data.size != int(np.prod(shape)):
        raise MedsrError(f"{p}: matrix holds {data.size} values, expected {shape}", Category.DAMAGED)
    array = data.reshape(shape).transpose(2, 1, 0).astype(np.float32)[None]
    sx, sy, sz = (float(s) for s in meta["spacing"])
    affine = np.diag([sx, sy, sz, 1.0])
    return Scan(array=array, affine=affine, modality=str(meta.get("modality", "CT")), source=str(p))
