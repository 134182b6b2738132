"""``DST/index.html``: the archive's review worklist, a static page a person opens from disk.

Items whose enhancement is most uncertain come first: done items by their manifest ``score`` (the per-scan
uncertainty score the archive records for "review first", see :func:`pipelines.archive.summarise`), highest
first; then failed, waiting and skipped items with their reasons. Each done row shows its review figure as a
thumbnail and links to the item's files. The page is one self-contained HTML file: inline CSS, no script, no
server, no remote asset, every link relative, so it works offline and when DST is copied elsewhere. It is
rebuilt from the manifest as items finish and written atomically (a reader never sees half a page).

Nothing here shows patient data: labels are output folders and item ids (archive paths, SeriesInstanceUIDs),
reasons are medsr's own one-line messages (identifiers already blanked by the worker).
"""

from __future__ import annotations

import html
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from medsr.io import atomic_path

__all__ = ["order", "write_worklist", "render"]

_STATE_RANK = {"done": 0, "failed": 1, "running": 2, "pending": 3, "skipped": 4}
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #ddd;padding:6px 8px;text-align:left;
vertical-align:top}th{background:#f3f3f3}td.score{font-variant-numeric:tabular-nums;white-space:nowrap}
img{max-width:240px;max-height:120px;border:1px solid #ccc;display:block}
.done{color:#176c2e}.failed{color:#a4161a;font-weight:600}.skipped{color:#777}.pending,.running{color:#8a5a00}
ul.files{margin:0;padding-left:1.1em}p.counts span{margin-right:1.2em}
"""


def order(rows: Iterable[Any]) -> list[Any]:
    """Rows in worklist order: done by descending score (unscored last), then failed, running, pending, skipped."""
    def key(r: Any) -> tuple[int, float, str]:
        score = r["score"] if r["state"] == "done" and r["score"] is not None else None
        return (_STATE_RANK.get(r["state"], 9), -float(score) if score is not None else float("inf"),
                str(r["out_dir"] or r["id"]))

    return sorted(rows, key=key)


def _href(rel: str) -> str:
    return quote(rel, safe="/")


def _files(dst: Path, out_dir: str) -> list[str]:
    folder = dst / out_dir
    try:
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        return []


def render(rows: list[Any], dst: Path, limit: int = 2000) -> str:
    """The page for these manifest rows (already in worklist order); at most ``limit`` rows are listed."""
    counts = Counter(r["state"] for r in rows)
    esc = html.escape
    body = []
    for rank, r in enumerate(rows[:limit], start=1):
        state, out_dir = r["state"], r["out_dir"] or ""
        label = out_dir or r["id"]
        files = _files(dst, out_dir) if state == "done" and out_dir else []
        thumb = ""
        if "review.png" in files:
            src = _href(f"{out_dir}/review.png")
            thumb = f'<a href="{src}"><img src="{src}" alt="review figure of {esc(label)}" loading="lazy"></a>'
        score = f"{float(r['score']):.5f}" if state == "done" and r["score"] is not None else ""
        links = "".join(f'<li><a href="{_href(f"{out_dir}/{name}")}">{esc(name)}</a></li>' for name in files)
        why = esc(f"[{r['category']}] {r['reason']}" if r["category"] else r["reason"] or "")
        body.append(
            f'<tr class="item" data-state="{esc(state)}" data-score="{score}" data-out="{esc(out_dir)}">'
            f'<td>{rank}</td><td>{thumb}</td><td class="score">{score}</td>'
            f'<td class="{esc(state)}">{esc(state)}</td><td>{esc(label)}</td><td>{why}</td>'
            f'<td><ul class="files">{links}</ul></td></tr>')
    more = (f"<p>{len(rows) - limit} more items are not listed here; see manifest.sqlite and summary.json.</p>"
            if len(rows) > limit else "")
    left = counts["pending"] + counts["running"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>medsr archive review worklist</title>
<link rel="icon" href="data:,">
<style>{_CSS}</style></head>
<body><h1>medsr archive: review worklist</h1>
<p>Most uncertain first: done items sorted by their uncertainty score (highest first), then failed, waiting and
skipped items. Research use only; the enhanced images are model estimates, not measurements.</p>
<p class="counts"><span>{len(rows)} items</span><span>{counts['done']} done</span>
<span>{counts['failed']} failed</span><span>{counts['skipped']} skipped</span><span>{left} left</span></p>
<table><thead><tr><th>#</th><th>review figure</th><th>score</th><th>state</th><th>item</th><th>reason</th>
<th>files</th></tr></thead>
<tbody>
{os.linesep.join(body)}
</tbody></table>{more}
</body></html>
"""


def write_worklist(manifest: Any, dst: str | os.PathLike[str]) -> Path:
    """Rebuild ``dst/index.html`` from the manifest, atomically; returns its path."""
    dst = Path(dst)
    page = render(order(manifest.rows()), dst)
    with atomic_path(dst / "index.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return dst / "index.html"
