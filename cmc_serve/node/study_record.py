"""study.json: one study's record in the node's spool, its states and its delivery ledger.

This module owns the file's format: the states a study moves through, the `Study` record
with each destination's `Delivery` ledger, and the one reader and the one writer of
study.json (`read_study`, `write_study`; durable, so the record on disk is always one
complete state). Where the file lives and when it changes is `cmc_serve.node.spool`'s job.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cmc_common.files import atomic_write

RECEIVED, SEGMENTING, DELIVERING, DONE, FAILED, HELD = (
    "received", "segmenting", "delivering", "done", "failed", "held")
STATES = (RECEIVED, SEGMENTING, DELIVERING, DONE, FAILED, HELD)
FINISHED = (DONE, FAILED, HELD)  # the worker has nothing more to do (held: a person has)
NORMAL, FLAGGED = "normal", "flagged"  # which destinations a study's results go to


def store(path: Path, data: bytes) -> None:
    """Write a spool file durably: after return it survives a crash or power loss, and no
    partial file ever has the final name (temporaries end in '.tmp', removed at start-up)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), durable=True, temp_suffix=".tmp")


@dataclass
class Delivery:
    """One destination's ledger for a study: which SEG SOP Instance UIDs it acknowledged."""

    delivered: list[str] = field(default_factory=list)
    attempts: int = 0  # failed attempts in a row
    next_try: float = 0.0  # epoch seconds
    last_error: str | None = None
    status: str = "pending"  # pending | done | failed


@dataclass
class Study:
    """study.json: everything the node knows about one study (epoch-second times)."""

    study_uid: str
    state: str = RECEIVED
    reason: str | None = None
    patient_id: str = ""
    first_received: float = 0.0
    round: int = 1
    history: list[list[Any]] = field(default_factory=list)  # [state, time, note]
    segment_started: float | None = None
    segment_seconds: float | None = None
    case_id: str | None = None
    engine: dict[str, str] = field(default_factory=dict)
    # the DICOM results to deliver, SEG first (relative to the study folder), and their
    # SOP Instance UIDs; empty until a round's segmentation succeeded
    result_files: list[str] = field(default_factory=list)
    result_uids: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    qc: dict[str, Any] | None = None  # the case's quality verdict: score, flagged, flags
    route: str = NORMAL  # FLAGGED: the results go to --flagged-to instead
    deliveries: dict[str, Delivery] = field(default_factory=dict)
    refused: list[list[str]] = field(default_factory=list)  # [SOP Instance UID, reason]
    ignored: dict[str, int] = field(default_factory=dict)  # SOP class name -> count
    finished: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Study:
        data = dict(data)
        # spools written before RTSTRUCT / SR outputs named the results after the SEG
        for old, new in (("seg_files", "result_files"), ("seg_uids", "result_uids")):
            if old in data:
                data[new] = data.pop(old)
        data["deliveries"] = {k: Delivery(**v) for k, v in data.get("deliveries", {}).items()}
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def delivery_failed(self) -> bool:
        """Failed because a destination gave up (its results wait to be delivered)."""
        return self.state == FAILED and bool(self.result_files) and any(
            d.status == "failed" for d in self.deliveries.values())

    def set_state(self, state: str, note: str = "", reason: str | None = None) -> None:
        self.state, self.reason = state, reason
        self.history.append([state, round(time.time(), 3), note or reason or ""])
        self.finished = time.time() if state in FINISHED else None


def read_study(path: Path) -> Study | None:
    """The study a study.json records; None when it is missing or not a study record."""
    try:
        return Study.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_study(path: Path, study: Study) -> None:
    """Replace study.json durably with `study`'s state."""
    store(path, json.dumps(study.to_dict(), indent=1).encode())
