"""Safe output paths and atomic writes: outputs never land outside the chosen folder, never half-written."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from medsr.errors import MedsrError

__all__ = ["sanitize_component", "safe_join", "atomic_path"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_component(text: str, max_len: int = 64) -> str:
    """One path component made only of ``[A-Za-z0-9._-]``; no '..', no separators, never empty."""
    clean = _UNSAFE.sub("_", str(text)).strip("._") or "unnamed"
    return clean[:max_len]


def safe_join(root: str | os.PathLike[str], *parts: str) -> Path:
    """``root / parts`` after sanitising each part; refuses anything that would resolve outside ``root``."""
    base = Path(root).resolve()
    out = base.joinpath(*(sanitize_component(p) for p in parts)).resolve()
    if base != out and base not in out.parents:
        raise MedsrError(f"refusing to write outside {base}: {out}")
    return out


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds.

    The temporary name keeps the real suffix (so writers that look at ``.nii.gz`` behave) and starts with
    ``.tmp-`` so a reader of the folder never mistakes it for a finished output.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{final.name}-", suffix=suffix, dir=final.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
