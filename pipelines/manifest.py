"""The archive manifest: one SQLite table of items with their state, timings, score and reason.

Several processes (``torchrun`` ranks) may write it at once, so the database runs in WAL mode with a busy
timeout, every write is one short transaction, and an item is claimed with an atomic
``UPDATE ... WHERE state = 'pending'``: two processes can never both work on one item. Only the main process of
each rank opens it; worker processes never touch it. WAL needs a local file system (not NFS).

States: ``pending`` -> ``running`` -> ``done`` | ``skipped`` (the input cannot be enhanced) | ``failed``
(an error while enhancing). Nothing here holds patient data: paths relative to the archive, SeriesInstanceUIDs,
output folders, reasons written by medsr.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipelines.discover import Item, item_key

__all__ = ["Manifest", "shard_of", "now", "STATES", "INPUT_CHANGED", "reserved"]

STATES = ("pending", "running", "done", "skipped", "failed")
INPUT_CHANGED = "input changed since the last run; redone"  # reason of an item queued again by its fingerprint


def reserved(name: str) -> bool:
    """Top-level names of the output root that hold the archive's own files, never an item's folder."""
    return name.startswith("manifest.sqlite") or name in ("summary.json", "index.html") or (
        name.startswith("archive") and name.endswith(".log"))

_SCHEMA = ["""
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,          -- nifti:<path>, dicom:<SeriesInstanceUID>, file:<path>
    key TEXT NOT NULL,            -- sha1 of id (16 hex): staging folder, shard
    kind TEXT NOT NULL,           -- nifti | dicom | file
    sources TEXT NOT NULL,        -- JSON list of paths relative to the archive root
    series_uid TEXT NOT NULL DEFAULT '',
    out_dir TEXT UNIQUE,          -- relative to the output root, NULL when the item has no output
    state TEXT NOT NULL DEFAULT 'pending',
    category TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT NOT NULL DEFAULT '',
    started TEXT,
    finished TEXT,
    seconds REAL,
    score REAL,
    discovered TEXT NOT NULL
)""", "CREATE INDEX IF NOT EXISTS items_state ON items(state)",
           "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"]


# Columns added after the first release, in order; a manifest that lacks one gets it when opened.
_ADDED_COLUMNS = [
    ("fingerprint", "TEXT"),            # input sizes and times (folder) or instance count (DICOMweb)
    ("study_uid", "TEXT"),              # DICOMweb items: the remote StudyInstanceUID (series_uid holds the series)
    ("stored", "TEXT"),                 # DICOMweb --store-back: when the PACS was seen to hold every derived object
    ("stored_series", "TEXT"),          # JSON list of the derived SeriesInstanceUIDs stored back
    ("transfer_s", "REAL"),             # DICOMweb: seconds spent downloading the series (0: cached copy reused)
]


def now() -> str:
    """UTC timestamp, ISO 8601 with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def shard_of(key: str, world: int) -> int:
    """The rank that owns an item: its key (a sha1 prefix) modulo the world size."""
    return int(key[:8], 16) % max(1, world)


class Manifest:
    """The SQLite manifest at ``path`` (created if missing)."""

    def __init__(self, path: str | os.PathLike[str], timeout_s: float = 120.0) -> None:
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: survives kill -9 of any writer
        with self.transaction():
            for statement in _SCHEMA:
                self.db.execute(statement)
            columns = {r[1] for r in self.db.execute("PRAGMA table_info(items)")}
            for name, kind in _ADDED_COLUMNS:  # manifests written by older versions gain the newer columns
                if name not in columns:
                    self.db.execute(f"ALTER TABLE items ADD COLUMN {name} {kind}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``: takes the write lock at once, so the transaction never deadlocks."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- meta ---------------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # --- discovery ----------------------------------------------------------------------------------------
    def add_items(self, items: Iterable[Item]) -> int:
        """Insert newly found items (known ones keep their state and output folder); returns how many are new.

        Output folders are made unique here, in one transaction, so concurrent ranks agree: a folder already
        taken, or one that would sit inside (or around) another item's folder, gets ``_<key>`` appended.
        """
        with self.transaction() as db:
            known = {r["id"]: r for r in db.execute("SELECT id, state, out_dir FROM items")}
            taken = {r["out_dir"] for r in known.values() if r["out_dir"]}
            prefixes = {"/".join(d.split("/")[:i]) for d in taken for i in range(1, d.count("/") + 1)}
            new = 0
            stamp = now()
            for item in items:
                sources = json.dumps(item.sources)
                if item.id in known:
                    if known[item.id]["state"] == "pending":  # e.g. slices added since the last run
                        db.execute("UPDATE items SET sources = ? WHERE id = ?", (sources, item.id))
                    continue
                out_dir = _unique(item, taken, prefixes) if item.out_parts else None
                if out_dir is not None:
                    taken.add(out_dir)
                    parts = out_dir.split("/")
                    prefixes.update("/".join(parts[:i]) for i in range(1, len(parts)))
                db.execute(
                    "INSERT INTO items(id, key, kind, sources, series_uid, out_dir, state, category, reason, "
                    "discovered) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (item.id, item_key(item.id), item.kind, sources, item.series_uid, out_dir, item.state,
                     item.category, item.reason, stamp))
                new += 1
        return new

    def update_fingerprints(self, prints: dict[str, str]) -> list[str]:
        """Store each item's input fingerprint; a finished item whose inputs changed since it was recorded goes
        back to pending (its output is replaced when redone). Returns the ids queued again."""
        again = []
        with self.transaction() as db:
            for row in db.execute("SELECT id, state, out_dir, fingerprint FROM items").fetchall():
                new = prints.get(row["id"])
                if new is None or new == row["fingerprint"]:
                    continue
                if row["fingerprint"] is not None and row["out_dir"] and row["state"] in ("done", "skipped", "failed"):
                    db.execute("UPDATE items SET state = 'pending', category = '', attempts = 0, fingerprint = ?, "
                               "reason = ? WHERE id = ?", (new, INPUT_CHANGED, row["id"]))
                    again.append(str(row["id"]))
                else:
                    db.execute("UPDATE items SET fingerprint = ? WHERE id = ?", (new, row["id"]))
        return again

    def set_studies(self, studies: dict[str, str]) -> None:
        """Record the remote StudyInstanceUID of DICOMweb items (needed to retrieve and to store back)."""
        with self.transaction() as db:
            db.executemany("UPDATE items SET study_uid = ? WHERE id = ?", [(v, k) for k, v in studies.items()])

    def set_stored(self, item_id: str, series_uids: list[str]) -> None:
        """The PACS holds every derived object of this item (checked, or sent just now)."""
        self.db.execute("UPDATE items SET stored = ?, stored_series = ? WHERE id = ?",
                        (now(), json.dumps(series_uids), item_id))

    def stored_series(self) -> set[str]:
        """Every SeriesInstanceUID this archive stored back: its own results, never items of a later listing."""
        found: set[str] = set()
        for (value,) in self.db.execute("SELECT stored_series FROM items WHERE stored_series IS NOT NULL"):
            found.update(json.loads(value))
        return found

    def set_transfer(self, item_id: str, seconds: float | None) -> None:
        self.db.execute("UPDATE items SET transfer_s = ? WHERE id = ?", (seconds, item_id))

    # --- queries ------------------------------------------------------------------------------------------
    def rows(self, state: str | None = None) -> list[sqlite3.Row]:
        if state is None:
            return list(self.db.execute("SELECT * FROM items ORDER BY id"))
        return list(self.db.execute("SELECT * FROM items WHERE state = ? ORDER BY id", (state,)))

    def get(self, item_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.db.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        return row

    # --- state changes (each one short transaction) -------------------------------------------------------
    def claim(self, item_id: str, owner: str) -> sqlite3.Row | None:
        """Atomically move a pending item to running; None if another process got it first."""
        cur = self.db.execute(
            "UPDATE items SET state = 'running', owner = ?, started = ?, finished = NULL, attempts = attempts + 1, "
            "stored = NULL, stored_series = NULL "  # a redone item has new derived objects to store
            "WHERE id = ? AND state = 'pending'", (owner, now(), item_id))
        return self.get(item_id) if cur.rowcount == 1 else None

    def finish(self, item_id: str, state: str, *, category: str = "", reason: str = "",
               seconds: float | None = None, score: float | None = None, owner: str | None = None) -> None:
        if state not in ("done", "skipped", "failed"):
            raise ValueError(f"not a final state: {state!r}")
        self.db.execute("UPDATE items SET state = ?, category = ?, reason = ?, seconds = ?, score = ?, finished = ?, "
                        "owner = COALESCE(?, owner) WHERE id = ?",
                        (state, category, reason, seconds, score, now(), owner, item_id))

    def set_state(self, item_id: str, state: str, *, category: str = "", reason: str = "",
                  attempts_delta: int = 0, **fields: Any) -> None:
        """Any other transition (resets on resume); ``fields`` sets extra columns (score, seconds, finished)."""
        extra = "".join(f", {k} = ?" for k in fields)
        self.db.execute(f"UPDATE items SET state = ?, category = ?, reason = ?, attempts = attempts + ?{extra} "
                        "WHERE id = ?", (state, category, reason, attempts_delta, *fields.values(), item_id))


def _unique(item: Item, taken: set[str], prefixes: set[str]) -> str:
    """``item.out_parts`` as a relative folder no other item uses, nests in, or contains."""
    parts = list(item.out_parts)
    if reserved(parts[0]):  # an archive folder named like one of our files: keep the mirror, one level renamed
        parts[0] = f"{parts[0]}_src"
    base = parts[-1]
    for attempt in (0, 8, 16):
        if attempt:
            parts[-1] = f"{base[:63 - attempt]}_{item.key[:attempt]}"
        cand = "/".join(parts)
        ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
        clash = cand in taken or cand in prefixes or any(a in taken for a in ancestors) or reserved(cand)
        if not clash:
            return cand
    raise RuntimeError(f"cannot find a free output folder for {item.id}")  # 16 hex digits of sha1 collided
