"""What a `cmc segment` run did: OUT/report.json and OUT/failures.csv.

The report answers the questions users otherwise open issues about: which package versions
ran, which runtime/device/precision was really used (no silent CPU fallback), and where the
time went per case and stage (read, pre-process, infer, post-process, write): end-to-end
time is dominated by I/O and pre/post-processing far more often than by the network.
Each case record carries quality control's verdict (`qc`, `CaseQc.to_json()`, also in the
case's `done` record) and the report counts the flagged cases (`flagged`): a flagged case
is done, with its outputs written, and only asks for a person's look.
"""

from __future__ import annotations

import csv
import io
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

STAGES = ("read", "preprocess", "infer", "postprocess", "qc", "write")
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

    def failed(self) -> list[CaseRecord]:
        return [c for c in self.cases if c.status == "failed"]

    def counts(self) -> dict[str, int]:
        out = {"done": 0, "failed": 0, "skipped": 0}
        for c in self.cases:
            out[c.status] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        stage_totals = {s: round(sum(c.timings.get(s, 0.0) for c in self.cases), 4)
                        for s in STAGES}
        return {
            "format": "cmc-segment-report", "format_version": 1,
            "started": self.started.isoformat(timespec="seconds"), "finished": self.finished,
            "wall_seconds": round(time.perf_counter() - self._t0, 3),
            "command": sys.argv, "versions": package_versions(),
            "platform": {"machine": platform.machine(), "system": platform.system()},
            "model": self.model, "engine": self.engine, "options": self.options,
            "counts": self.counts(), "flagged": sum(c.flagged for c in self.cases),
            "stage_seconds": stage_totals,
            "cases": [c.to_dict() for c in self.cases],
        }


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
