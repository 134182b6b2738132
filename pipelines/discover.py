"""Find the work in an archive: every NIfTI file and every DICOM series under a folder, from headers only.

DICOM files are grouped by SeriesInstanceUID wherever they sit: a series split across folders is one item, two
series in one folder are two items. DICOM headers are read by :func:`medsr.io.survey` (no pixel data), so discovery
is quick even on large archives. Files that are not DICOM (text, images, ...) are ignored; damaged DICOM files
(header or pixel data cut short) become skipped items of their own, as do non-image objects (SR, RTSTRUCT: no pixel
data), localisers and 4D NIfTI. Copies of one SOP instance count once (the first readable copy in path order), so a
damaged or duplicated copy never takes a good series down.

Output folders mirror the input tree: ``a/b/scan.nii.gz`` -> ``a/b/scan``; a single-file DICOM ``a/b/img.dcm`` ->
``a/b/img``; a multi-file series -> the folder holding it (``a/b/series_dir``), or, when that folder holds other
items too, ``<folder>/series<SeriesNumber>_<hash of the UID>``. Every component is sanitised; no DICOM text other
than the integer SeriesNumber ever reaches a path.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import nibabel as nib

from medsr.io import DicomHeader, DicomSurvey, sanitize_component, survey
from medsr.io.validate import max_image_bytes

__all__ = ["Item", "discover", "item_key"]

_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def item_key(item_id: str) -> str:
    """A stable 16-hex-digit digest of an item id: staging folder name, name suffix and shard selector.

    Python's ``hash()`` is salted per process, so it would shard differently on every rank; sha1 does not.
    """
    return hashlib.sha1(item_id.encode("utf-8")).hexdigest()[:16]


@dataclass
class Item:
    """One unit of work: a NIfTI file, a DICOM series, or a damaged file recorded as skipped.

    Attributes:
        id: ``nifti:<relative path>``, ``dicom:<SeriesInstanceUID>`` (``dicom:file:<path>`` without a UID) or
            ``file:<relative path>``.
        kind: "nifti", "dicom" or "file".
        sources: POSIX paths relative to the archive root, sorted.
        series_uid: SeriesInstanceUID for DICOM items, "" otherwise.
        out_parts: proposed output folder relative to the output root, sanitised components; empty when the item
            produces no output (skipped at discovery).
        state: "pending", or "skipped" when the headers already show it cannot be enhanced.
        category, reason: why it is skipped (a short category and a one-line explanation).
    """

    id: str
    kind: str
    sources: list[str]
    series_uid: str = ""
    out_parts: tuple[str, ...] = ()
    state: str = "pending"
    category: str = ""
    reason: str = ""
    series_number: int | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return item_key(self.id)


def walk(root: Path, exclude: tuple[Path, ...] = (),
         problems: list[tuple[Path, str, str]] | None = None) -> Iterator[Path]:
    """Regular files under ``root`` in sorted order; hidden files/folders and the ``exclude`` folders are left
    out. What cannot be read safely goes to ``problems`` as (path, category, reason) instead: unreadable folders,
    special files (a link to /dev/zero would be read forever) and files over the size limit."""
    excluded = {p.resolve() for p in exclude}
    found = problems if problems is not None else []
    limit = max_image_bytes()

    def unreadable(err: OSError) -> None:
        found.append((Path(err.filename or root), "unreadable folder", f"cannot list the folder ({err.strerror})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        here = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and (here / n).resolve() not in excluded)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = here / name
            try:
                st = os.stat(path)  # follows links: a link to a regular file is read like the file
            except OSError as exc:
                found.append((path, "unreadable file", f"cannot read the file ({exc.strerror})"))
                continue
            if not stat.S_ISREG(st.st_mode):
                found.append((path, "not a regular file", "not a regular file (device, pipe, socket or a link "
                                                          "to one); medsr reads regular files only"))
            elif st.st_size > limit:
                found.append((path, "too large", f"{st.st_size} bytes, more than the limit of {limit} "
                                                 "(MEDSR_MAX_IMAGE_BYTES)"))
            else:
                yield path


def _nifti_stem(name: str) -> str:
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _nifti_item(path: Path, rel: str) -> Item:
    parts = PurePosixPath(rel).parts
    item = Item(f"nifti:{rel}", "nifti", [rel], out_parts=_clean((*parts[:-1], _nifti_stem(parts[-1]))))
    try:
        shape = tuple(nib.load(str(path)).shape)  # type: ignore[attr-defined]
    except Exception:  # load_scan reports unreadable files with the full story
        return item
    if any(s > 1 for s in shape[3:]):
        item.state, item.category = "skipped", "4D image"
        item.reason = f"4D image, shape {shape}; medsr enhances 2D/3D images (split the volumes first)"
        item.out_parts = ()
    return item


def _clean(parts: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return tuple(sanitize_component(p) for p in parts)


def _dicom_items(found: DicomSurvey, root: Path) -> list[Item]:
    def rel(h: DicomHeader) -> str:
        return h.path.relative_to(root).as_posix()

    items = []
    for h in found.damaged:
        items.append(Item(f"file:{rel(h)}", "file", [rel(h)], state="skipped", category="truncated or damaged DICOM",
                          reason=h.problem))
    for series in found.series:
        key = series.key if series.uid else f"file:{rel(series.files[0])}"
        item = Item(f"dicom:{key}", "dicom", sorted(rel(h) for h in series.files), series_uid=series.uid,
                    series_number=series.number)
        images = series.images
        usable = [h for h in images if not h.localizer]
        if not images:
            sops = ", ".join(sorted({h.sop_class for h in series.files}))
            item.state, item.category = "skipped", "non-image DICOM"
            item.reason = (f"no image pixel data ({sops}, modality {series.modality or 'unknown'}); "
                           "medsr reads image objects only")
        elif not usable:
            item.state, item.category = "skipped", "localizer"
            item.reason = "localizer (scout) images: ImageType contains LOCALIZER"
        else:
            item.sources = sorted(rel(h) for h in usable)
        items.append(item)
    return items


def _place_series(items: list[Item]) -> None:
    """Give each pending DICOM item its output folder (NIfTI items already have theirs)."""
    owners: dict[tuple[str, ...], set[str]] = defaultdict(set)  # folder -> pending items with a source below it
    for item in items:
        if item.state != "pending":
            continue
        for rel in item.sources:
            parents = PurePosixPath(rel).parts[:-1]
            for i in range(len(parents) + 1):
                owners[parents[:i]].add(item.id)
    for item in items:
        if item.kind != "dicom" or item.state != "pending":
            continue
        if len(item.sources) == 1:
            parts = PurePosixPath(item.sources[0]).parts
            stem = parts[-1][:-4] if parts[-1].lower().endswith(".dcm") else parts[-1]
            item.out_parts = _clean((*parts[:-1], stem))
            continue
        folder = PurePosixPath(os.path.commonpath(item.sources)).parts  # sources are distinct files
        if folder and owners[folder] == {item.id}:  # the folder (and all below it) holds this series only
            item.out_parts = _clean(folder)
        else:
            number = "" if item.series_number is None else str(item.series_number)
            item.out_parts = _clean((*folder, f"series{number}_{item.key[:8]}"))


def discover(root: str | os.PathLike[str], exclude: tuple[Path, ...] = ()) -> list[Item]:
    """Every NIfTI file and DICOM series under ``root`` as :class:`Item` s, sorted by id.

    Args:
        root: the archive folder; opened read-only.
        exclude: folders to leave out (the output folder, when it sits inside the archive).
    """
    root = Path(root)
    items: list[Item] = []
    others: list[Path] = []
    problems: list[tuple[Path, str, str]] = []
    for path in walk(root, exclude, problems):
        if path.name.lower().endswith(_NIFTI_SUFFIXES):
            items.append(_nifti_item(path, path.relative_to(root).as_posix()))
        else:
            others.append(path)
    items += _dicom_items(survey(others), root)
    for path, category, reason in problems:  # recorded as skipped, so nothing is left out silently
        rel = path.relative_to(root).as_posix() if path != root else "."
        kind = "folder" if category == "unreadable folder" else "file"
        items.append(Item(f"{kind}:{rel}", kind, [rel], state="skipped", category=category, reason=reason))
    _place_series(items)
    return sorted(items, key=lambda it: it.id)
