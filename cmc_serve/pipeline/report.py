"""What a `cmc segment` run did: OUT/report.json and OUT/failures.csv, built and written here.

The report answers the questions users otherwise open issues about: which package versions
ran, which runtime/device/precision was really used (no silent CPU fallback), and where the
time went per case and stage (read, pre-process, infer, post-process, write): end-to-end
time is dominated by I/O and pre/post-processing far more often than by the network.
Each case record carries quality control's verdict (`qc`, `CaseQc.to_json()`, also in the
case's `done` record) and the report counts the flagged cases (`flagged`): a flagged case
is done, with its outputs written, and only asks for a person's look.

`report_document` is the one builder of report.json (a run's `RunReport.to_dict` and the
merge of shard reports, `cmc_serve.pipeline.shards`, alike), `write_report` its one writer
(with failures.csv beside it) and `read_report` its reader.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from cmc_serve.pipeline import outputs

STAGES = ("read", "preprocess", "infer", "postprocess", "qc", "write")
REPORT_FORMAT, REPORT_FORMAT_VERSION = "cmc-segment-report", 1
PACKAGES = ("cmc", "numpy", "scipy", "nibabel", "onnxruntime", "onnxruntime-gpu", "openvino",
            "tensorrt", "tritonclient", "pydicom", "highdicom", "pillow", "rich")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that can change a result (absent ones left out)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


class StageTimer:
    """Accumulates wall-clock seconds per pipeline stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def stage(self, name: str) -> _Stage:
        return _Stage(self, name)


class _Stage:
    def __init__(self, timer: StageTimer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self.start
        self.timer.seconds[self.name] = self.timer.seconds.get(self.name, 0.0) + elapsed


@dataclass
class CaseRecord:
    """One case's line in the report (and in failures.csv when it failed)."""

    case_id: str
    status: str  # "done" | "failed" | "skipped"
    inputs: list[str] = field(default_factory=list)
    mode: str | None = None
    pairing: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    engine: dict[str, str] = field(default_factory=dict)
    stage: str | None = None
    error: str | None = None
    # every assumption the user asked for (--assume-registered, --assume-orientation,
    # --skip-unreadable) -> what it covered in this case; and the inputs' geometry warnings
    assumptions: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    qc: dict[str, Any] | None = None  # CaseQc.to_json(); None with --qc off

    @property
    def flagged(self) -> bool:
        return bool(self.qc and self.qc.get("flagged"))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timings"] = {k: round(v, 4) for k, v in self.timings.items()}
        if self.timings:
            d["timings"]["total"] = round(sum(self.timings.values()), 4)
        return d


class RunReport:
    """Collects case records and the engine actually used; renders report.json."""

    def __init__(self, options: dict[str, Any], model: dict[str, Any]) -> None:
        self.options = options
        self.model = model
        self.engine: dict[str, Any] = {}
        self.cases: list[CaseRecord] = []
        self.finished = False  # True once every case of the run has been handled
        self.started = datetime.now(timezone.utc)
        self._t0 = time.perf_counter()

    def add(self, record: CaseRecord) -> None:
        self.cases.append(record)

    def counts(self) -> dict[str, int]:
        out = {"done": 0, "failed": 0, "skipped": 0}
        for c in self.cases:
            out[c.status] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """report.json of this run (`report_document`)."""
        stage_totals = {s: round(sum(c.timings.get(s, 0.0) for c in self.cases), 4)
                        for s in STAGES}
        head = {
            "started": self.started.isoformat(timespec="seconds"), "finished": self.finished,
            "wall_seconds": round(time.perf_counter() - self._t0, 3),
            "command": sys.argv, "versions": package_versions(),
            "platform": {"machine": platform.machine(), "system": platform.system()},
            "model": self.model, "engine": self.engine, "options": self.options,
        }
        return report_document(head, [c.to_dict() for c in self.cases], stage_totals)


def report_document(head: Mapping[str, Any], cases: list[dict[str, Any]],
                    stage_seconds: Mapping[str, float]) -> dict[str, Any]:
    """report.json: its format, `head` (what ran, where, with which options; in the order
    given), then what every report ends with: the cases counted by status, how many QC
    flagged, the seconds per stage and the case records themselves."""
    counts = {"done": 0, "failed": 0, "skipped": 0}
    for case in cases:
        status = case.get("status", "failed")
        counts[status] = counts.get(status, 0) + 1
    return {
        "format": REPORT_FORMAT, "format_version": REPORT_FORMAT_VERSION, **head,
        "counts": counts, "flagged": sum(1 for c in cases if (c.get("qc") or {}).get("flagged")),
        "stage_seconds": dict(stage_seconds), "cases": cases,
    }


def write_report(folder: Path, document: dict[str, Any]) -> None:
    """Write FOLDER/report.json, then FOLDER/failures.csv with its failed cases (or remove
    the failures.csv of an earlier state when none failed), each atomically."""
    outputs.write_json(folder / outputs.REPORT, document)
    failed = [c for c in document["cases"] if c.get("status") == "failed"]
    if failed:
        outputs.write_text(folder / outputs.FAILURES, failures_csv(failed))
    else:
        (folder / outputs.FAILURES).unlink(missing_ok=True)


def read_report(path: Path) -> dict[str, Any] | None:
    """A report.json's content; None when it is missing, unreadable or not an object (a
    shard that has not written one yet, or is writing it)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


FAILURE_COLUMNS = ("case_id", "stage", "error", "inputs")


def failures_csv(records: list[dict[str, Any]]) -> str:
    """failures.csv content: one row per failed case (its report.json record) with the stage
    and the reason."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FAILURE_COLUMNS)
    for r in records:
        writer.writerow([r["case_id"], r.get("stage") or "", r.get("error") or "",
                         " | ".join(r.get("inputs") or [])])
    return buf.getvalue()
