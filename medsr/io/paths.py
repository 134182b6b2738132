"""Safe output paths and atomic writes: outputs never land outside the chosen folder, never half-written."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from medsr.errors import MedsrError

__all__ = ["sanitize_component", "safe_join", "atomic_path", "printable", "output_name"]

_UNSAFE = re.compile(r"[^\w.-]+")  # \w is Unicode-aware: letters and digits of any script (東京, Müller) stay


def sanitize_component(text: str, max_len: int = 64) -> str:
    """One path component of letters/digits (any script), ``.``, ``_`` and ``-``: no '..', separators,
    control or formatting characters; never empty. NFC first, so "é" typed two ways gives one name."""
    clean = _UNSAFE.sub("_", unicodedata.normalize("NFC", str(text))).strip("._") or "unnamed"
    return clean[:max_len].rstrip("._") or "unnamed"


def printable(text: object) -> str:
    """``text`` safe to print on a terminal: control and formatting characters (ESC, bidi overrides) as
    ``\\xNN``/``\\uNNNN`` escapes; newlines kept. Header text (DICOM UIDs, descriptions) is untrusted."""
    out = []
    for ch in str(text):
        if ch == "\n" or ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def output_name(source: str | os.PathLike[str]) -> str:
    """The output folder name of an input: its file name without .nii.gz/.nii/.dcm (or its folder name),
    sanitised. Built from the path only, never from DICOM text."""
    stem = Path(source).name
    for suffix in (".nii.gz", ".nii", ".dcm"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return sanitize_component(stem or "scan")


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
