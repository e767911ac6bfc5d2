"""The HTML both pages a person looks at are made of: OUT/report.html (`pipeline.html_report`)
and the `cmc listen` status page (`node.status_http`).

One self-contained document: inline CSS, preview thumbnails inlined as PNG data URIs, no
script, no font, nothing fetched from anywhere, so a page opens offline, from a file share,
or attached to a ticket. Cells are escaped by their callers with `esc`.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

THUMB_WIDTH = 360

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px;color:#1d232a;
background:#f6f7f9}h1{font-size:22px;margin:0 0 4px}p.sub{color:#56606b;margin:0 0 16px}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 3px #0002;width:100%}
th,td{padding:8px 10px;border-bottom:1px solid #e3e6ea;vertical-align:top;text-align:left;
font-size:13px}th{background:#eef1f4;font-weight:600}td.num{text-align:right;
font-variant-numeric:tabular-nums}img.thumb{display:block;max-width:360px;height:auto;
image-rendering:pixelated;background:#000}.badge{display:inline-block;padding:2px 8px;
border-radius:10px;font-weight:600;font-size:12px;color:#fff}.done{background:#2e7d32}
.failed{background:#c62828}.segmenting{background:#1565c0}.delivering{background:#6a1b9a}
.received{background:#546e7a}.skipped{background:#8d6e63}.outlier{background:#fff3cd;
font-weight:700}.outlier::after{content:" \\26A0 outlier";color:#b26a00;font-size:11px}
.reason{color:#b71c1c;max-width:420px;overflow-wrap:anywhere}.review{background:#e65100}
ul.qc{margin:4px 0 0;padding-left:18px;color:#8a3b00;max-width:420px}.qcok{color:#2e7d32}
.uid{word-break:break-all;
max-width:240px;display:inline-block}td:first-child{min-width:190px}.nowrap{white-space:nowrap}.muted{color:#78828c}dl{margin:0}dt{font-weight:600}
dd{margin:0 0 4px}.held{background:#b26a00}.flag{color:#b26a00}section.attention{background:#fff;
border-left:4px solid #c62828;padding:8px 14px;margin:0 0 16px;box-shadow:0 1px 3px #0002}
section.attention h2{font-size:15px;margin:4px 0}section.attention li{margin:4px 0;font-size:13px}
form.act{display:inline;margin-left:6px}
"""


def thumbnail_data_uri(png: Path, width: int = THUMB_WIDTH) -> str | None:
    """`png` shrunk to at most `width` pixels wide, as a data: URI (None if unreadable).
    Cached by file and modification time: the status page is rendered every few seconds."""
    try:
        stamp = png.stat().st_mtime_ns
    except OSError:
        return None
    return _thumbnail(str(png), stamp, width)


@lru_cache(maxsize=512)
def _thumbnail(png: str, mtime_ns: int, width: int) -> str | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(png) as source:
            img = source.convert("RGB")
        if img.width > width:
            img = img.resize((width, max(1, round(img.height * width / img.width))),
                             Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
    except (OSError, UnidentifiedImageError):
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def badge(state: str) -> str:
    return f'<span class="badge {esc(state)}">{esc(state)}</span>'


def thumb_cell(png: Path, alt: str) -> str:
    uri = thumbnail_data_uri(png) if png.is_file() else None
    if uri is None:
        return '<span class="muted">no preview</span>'
    return f'<img class="thumb" src="{uri}" alt="{esc(alt)}">'


def page(title: str, subtitle: str, columns: Sequence[str], rows: Sequence[Sequence[str]],
         refresh_seconds: int | None = None, preamble: str = "") -> str:
    """The whole document; cells and `preamble` (HTML above the table) are escaped by the
    caller."""
    refresh = (f'<meta http-equiv="refresh" content="{refresh_seconds}">'
               if refresh_seconds else "")
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "\n".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not rows:
        body = f'<tr><td colspan="{len(columns)}" class="muted">nothing yet</td></tr>'
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{refresh}'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{esc(title)}</h1><p class=\"sub\">{subtitle}</p>{preamble}"
            f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"
            "</body></html>\n")


def engine_text(engine: Mapping[str, str]) -> str:
    return esc(" / ".join(engine.get(k, "?") for k in ("runtime", "device", "precision"))
               if engine else "-")
