"""Pages a person looks at: OUT/report.html of `cmc segment` and the `cmc listen` status page.

Both are one self-contained HTML file: inline CSS, preview thumbnails inlined as PNG data
URIs, no script, no font, nothing fetched from anywhere, so the page opens offline, from a
file share, or attached to a ticket. Rows are cases (report.html) or studies (status page)
with the preview thumbnail, class volumes, what ran (runtime, precision, timings) and, for
failures, the one-line reason.

Outlier volumes: within a batch, per class, a case is flagged when its volume is far from
the others' by the modified z-score of Iglewicz and Hoaglin, |x - median| / (1.4826 MAD)
> 3.5, computed only with at least `MIN_CASES_FOR_OUTLIERS` cases (a MAD of fewer is
noise). The scale has a floor of 5 % of the median so that near-identical volumes do not
turn a 1 % difference into an outlier. A flag asks for a look, it is not a verdict.

Quality control: cases its verdict flagged come first (then the others in run order), with
"needs review", the score and each flag's sentence in the column beside the preview.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from cmc_serve.pipeline import outputs

REPORT_HTML = "report.html"
THUMB_WIDTH = 360
MIN_CASES_FOR_OUTLIERS = 5
OUTLIER_Z = 3.5

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


# ---------------------------------------------------------------------- class volumes

def class_volumes(case_folder: Path, class_names: Sequence[str]) -> dict[str, float] | None:
    """Volume (ml) per foreground class: statistics.json when written, else counted from
    seg.nii.gz; None when the case has neither."""
    stats = case_folder / outputs.STATISTICS
    if stats.is_file():
        try:
            classes = json.loads(stats.read_text())["classes"]
            return {name: float(c["volume_ml"]) for name, c in classes.items()}
        except (OSError, ValueError, KeyError, TypeError):
            pass
    seg = case_folder / outputs.SEG_NIFTI
    if not seg.is_file():
        return None
    import nibabel as nib

    from cmc_serve.pipeline.statistics import voxel_volume_ml
    from cmc_serve.volume import count_labels

    img = nib.load(str(seg))
    assert isinstance(img, nib.Nifti1Image)  # written by nifti_io.write_label_nifti
    counts = count_labels(np.asarray(img.dataobj, dtype=np.uint8), len(class_names))
    ml = voxel_volume_ml(img.affine)
    return {name: round(float(counts[i]) * ml, 4) for i, name in enumerate(class_names) if i}


def outliers(volumes: Mapping[str, Mapping[str, float]]) -> set[tuple[str, str]]:
    """(case, class) pairs whose volume is an outlier of the batch (module docstring)."""
    flagged: set[tuple[str, str]] = set()
    if len(volumes) < MIN_CASES_FOR_OUTLIERS:
        return flagged
    classes = sorted({c for v in volumes.values() for c in v})
    for cls in classes:
        cases = [k for k, v in volumes.items() if cls in v]
        x = np.array([volumes[k][cls] for k in cases], dtype=np.float64)
        median = float(np.median(x))
        scale = max(1.4826 * float(np.median(np.abs(x - median))), 0.05 * abs(median), 1e-6)
        for case, value in zip(cases, x, strict=True):
            if abs(value - median) / scale > OUTLIER_Z:
                flagged.add((case, cls))
    return flagged


def volume_cell(case: str, volumes: Mapping[str, float] | None,
                flagged: set[tuple[str, str]]) -> str:
    if not volumes:
        return '<span class="muted">-</span>'
    items = []
    for cls, ml in volumes.items():
        mark = ' class="outlier"' if (case, cls) in flagged else ""
        items.append(f"<dt>{esc(cls)}</dt><dd{mark}>{ml:.1f} ml</dd>")
    return "<dl>" + "".join(items) + "</dl>"


def qc_cell(qc: Mapping[str, Any] | None) -> str:
    """Quality control's verdict: the score, and for a flagged case each flag's sentence."""
    if not qc:
        return ""
    score = f"QC score {float(qc.get('score', 0.0)):.2f}"
    if not qc.get("flagged"):
        return f'<div class="qcok">{esc(score)}</div>'
    reasons = "".join(f"<li>{esc(f.get('message'))}</li>" for f in qc.get("flags", []))
    return f'<div>{badge("review")} {esc(score)}</div><ul class="qc">{reasons}</ul>'


def flagged_first(cases: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The cases with those quality control flagged first, each group in run order."""
    return sorted(cases, key=lambda c: not (c.get("qc") or {}).get("flagged"))


def engine_text(engine: Mapping[str, str]) -> str:
    return esc(" / ".join(engine.get(k, "?") for k in ("runtime", "device", "precision"))
               if engine else "-")


# ---------------------------------------------------------------------- report.html

def batch_report_html(out: Path, report: dict[str, Any]) -> str:
    """report.html for a `cmc segment` OUT from its report.json content."""
    classes = report.get("model", {}).get("classes", [])
    cases = report.get("cases", [])
    volumes = {c["case_id"]: v for c in cases if c["status"] != "failed"
               and (v := class_volumes(outputs.case_dir(out, c["case_id"]), classes))}
    flagged = outliers(volumes)
    rows = []
    for c in flagged_first(cases):
        folder = outputs.case_dir(out, c["case_id"])
        total = c.get("timings", {}).get("total")
        detail = (f'<div class="reason">{esc(c.get("stage"))}: {esc(c.get("error"))}</div>'
                  if c["status"] == "failed" else esc(c.get("mode") or "") + qc_cell(c.get("qc")))
        rows.append([f"<b>{esc(c['case_id'])}</b><br>{badge(c['status'])}", detail,
                     thumb_cell(folder / outputs.PREVIEW, c["case_id"]),
                     volume_cell(c["case_id"], volumes.get(c["case_id"]), flagged),
                     engine_text(c.get("engine") or report.get("engine", {})),
                     f"{total:.2f} s" if total is not None else "-"])
    counts = report.get("counts", {})
    model = report.get("model", {})
    subtitle = (f"{counts.get('done', 0)} done, {counts.get('failed', 0)} failed, "
                f"{counts.get('skipped', 0)} skipped &middot; model {esc(model.get('name'))} "
                f"&middot; started {esc(report.get('started'))} &middot; "
                f"{len(flagged)} outlier volume(s) flagged &middot; "
                f"{sum(1 for c in cases if (c.get('qc') or {}).get('flagged'))} case(s) "
                "need review (quality control)")
    return page("cmc segment report", subtitle,
                ["case", "mode / reason / quality", "preview", "class volumes",
                 "runtime / device / "
                 "precision", "time"], rows)


def write_batch_report_html(out: Path) -> Path:
    """Write OUT/report.html from OUT/report.json (atomically); returns its path."""
    report = json.loads((out / outputs.REPORT).read_text())
    path = out / REPORT_HTML
    outputs.write_text(path, batch_report_html(out, report))
    return path
