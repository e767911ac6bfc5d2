"""OUT/report.html of `cmc segment`, the page a person opens after a batch.

Made of `cmc_serve.html_page` like the `cmc listen` status page (one self-contained HTML
file, nothing fetched), from report.json: one row per case with the preview thumbnail,
class volumes (`statistics.class_volumes`), what ran (runtime, precision, timings) and,
for failures, the one-line reason.

Outlier volumes (`statistics.outliers`): a class volume far from the batch's is marked; a
mark asks for a look, it is not a verdict.

Quality control: cases its verdict flagged come first (then the others in run order), with
"needs review", the score and each flag's sentence in the column beside the preview.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cmc_serve.html_page import badge, engine_text, esc, page, thumb_cell
from cmc_serve.pipeline import outputs
from cmc_serve.pipeline.statistics import class_volumes, outliers
from cmc_serve.qc.flags import score_text

REPORT_HTML = "report.html"

# ---------------------------------------------------------------------- cells

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
    score = f"QC score {score_text(float(qc.get('score', 0.0)))}"
    if not qc.get("flagged"):
        return f'<div class="qcok">{esc(score)}</div>'
    reasons = "".join(f"<li>{esc(f.get('message'))}</li>" for f in qc.get("flags", []))
    return f'<div>{badge("review")} {esc(score)}</div><ul class="qc">{reasons}</ul>'


def flagged_first(cases: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The cases with those quality control flagged first, each group in run order."""
    return sorted(cases, key=lambda c: not (c.get("qc") or {}).get("flagged"))


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
