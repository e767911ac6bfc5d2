"""The node's worker: the next complete study -> `cmc segment`'s pipeline -> delivery.

One study at a time, in the order studies arrived, with the Segmenter loaded once at
start-up (`api.segment(..., segmenter=...)`: the same discovery, pairing, checks, outputs
and messages as `cmc segment` on the study's instance folder). A study is complete when no
instance of it arrived for `study_timeout` seconds. A study that cannot be segmented is
`failed` with the one-line reason `cmc segment` gives (stage: message) and the queue goes
on; a study whose destination is down waits in `delivering` for its next try while other
studies are segmented.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cmc_serve.node.delivery import Destination, RetryPolicy, deliver
from cmc_serve.node.spool import (
    DELIVERING,
    DONE,
    FAILED,
    RECEIVED,
    SEGMENTING,
    Spool,
    Study,
)
from cmc_serve.pipeline import outputs
from cmc_serve.pipeline.api import SegmentError, SegmentOptions, segment


class Worker:
    """`step()` does the next due piece of work (one study) and says whether there was any."""

    def __init__(self, spool: Spool, model: Path, options: SegmentOptions, segmenter: Any,
                 destinations: Sequence[Destination], policy: RetryPolicy,
                 study_timeout: float, say: Callable[[str], Any]) -> None:
        self.spool, self.model, self.options = spool, model, options
        self.segmenter, self.destinations, self.policy = segmenter, destinations, policy
        self.study_timeout, self.say = study_timeout, say
        self.current: str | None = None  # the study in flight, for /health

    def _due(self, study: Study, now: float) -> bool:
        if study.state == RECEIVED:
            return now - self.spool.last_arrival(study.study_uid) >= self.study_timeout
        if study.state == DELIVERING:
            return any(study.deliveries.get(d.name) is None
                       or (study.deliveries[d.name].status == "pending"
                           and study.deliveries[d.name].next_try <= now)
                       for d in self.destinations)
        return False

    def step(self) -> bool:
        now = time.time()
        study = next((s for s in self.spool.studies(unfinished_only=True)
                      if self._due(s, now)), None)
        if study is None:
            return False
        self.current = study.study_uid
        try:
            if study.state == RECEIVED:
                self._segment(study)
            if study.state == DELIVERING:
                self._deliver(study)
        finally:
            self.current = None
        return True

    # ------------------------------------------------------------------ segmenting
    def _segment(self, study: Study) -> None:
        uid = study.study_uid
        count = self.spool.instance_count(uid)
        study.segment_started = time.time()
        study.seg_files, study.seg_uids, study.notes, study.deliveries = [], [], [], {}
        study.engine, study.segment_seconds = {}, None
        study.set_state(SEGMENTING, f"{count} instance(s), round {study.round}")
        self.spool.update(study)
        self.say(f"segmenting study {uid} ({count} instances)")
        out = self.spool.reset_output(uid)
        try:
            result = segment(self.spool.instances_dir(uid), out, self.model, options=self.options,
                             segmenter=self.segmenter)
        except SegmentError as exc:
            self._failed(study, str(exc))
            return
        study.segment_seconds = round(time.time() - study.segment_started, 3)
        record = result.cases[0] if result.cases else None
        if record is None or result.failed:
            reason = (f"{record.stage}: {record.error}" if record is not None
                      else "no case found in the received instances")
            self._failed(study, reason)
            return
        study.case_id, study.engine = record.case_id, dict(record.engine)
        study.notes = list(record.pairing)
        seg = outputs.case_dir(out, record.case_id) / outputs.SEG_DICOM
        if seg.is_file():
            study.seg_files = [seg.relative_to(self.spool.study_dir(uid)).as_posix()]
            study.seg_uids = [_sop_instance_uid(seg)]
        if not study.seg_files:
            self._finish(study, DONE, "no SEG to deliver (no foreground, or no dicom-seg "
                                      "output)")
        elif not self.destinations:
            self._finish(study, DONE, "segmented; no destination given, SEG kept in the spool")
        else:
            self._finish(study, DELIVERING, f"SEG {study.seg_uids[0]} written")

    def _failed(self, study: Study, reason: str) -> None:
        self.say(f"study {study.study_uid} failed: {reason}")
        self._finish(study, FAILED, reason=reason)

    def _finish(self, study: Study, state: str, note: str = "", reason: str | None = None) -> None:
        self.spool.finish_round(study, state, note, reason)
        if study.state != state:
            self.say(f"study {study.study_uid}: new instances arrived, segmented again")
        elif state == DONE:
            self.say(f"study {study.study_uid} done: {note}")

    # ------------------------------------------------------------------ delivering
    def _deliver(self, study: Study) -> None:
        folder = self.spool.study_dir(study.study_uid)
        files = [(folder / rel, uid) for rel, uid in zip(study.seg_files, study.seg_uids,
                                                        strict=True)]
        deliver(study.deliveries, files, self.destinations, self.policy,
                save=lambda: self.spool.update(study), say=self.say)
        entries = [study.deliveries[d.name] for d in self.destinations]
        if any(e.status == "pending" for e in entries):
            return
        failed = [(d.name, e) for d, e in zip(self.destinations, entries, strict=True)
                  if e.status == "failed"]
        if failed:
            name, entry = failed[0]
            self._failed(study, f"delivery to {name} failed after {entry.attempts} attempts: "
                                f"{entry.last_error}")
        else:
            names = ", ".join(d.name for d in self.destinations)
            self._finish(study, DONE, f"SEG delivered to {names}")


def _sop_instance_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
