"""The node's worker: the next complete study -> `cmc segment`'s pipeline -> delivery.

One study at a time, in the order studies arrived, with the Segmenter loaded once at
start-up (`api.segment(..., segmenter=...)`: the same discovery, pairing, checks, outputs
and messages as `cmc segment` on the study's instance folder). A study is complete when no
instance of it arrived for `study_timeout` seconds. A study that cannot be segmented is
`failed` with the one-line reason `cmc segment` gives (stage: message) and the queue goes
on; a study whose destination is down waits in `delivering` for its next try while other
studies are segmented.

Flagged results (the case's quality verdict, `qc.flagged` in its `done` record) follow
`Routing`: with `flagged_to` they go to those destinations instead of the normal ones (a
review worklist, so that an answer a person should check first does not reach the PACS
as a finished result); with `hold` they stay in the spool as `held` until a person
releases them (status page, or `cmc listen --release`), then go to the normal
destinations; otherwise they go where every result goes, saying "needs review" in their
series description. Requests from other threads (the status page's buttons) and from the
command line (`--redeliver`, `--release`) are queued with `request` and carried out by the
worker between studies, so one thread alone changes a study's state.
"""

from __future__ import annotations

import json
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmc_common.progress import Say
from cmc_serve.engine import Segmenter
from cmc_serve.node.delivery import Destination, RetryPolicy, case_results, deliver
from cmc_serve.node.spool import Spool
from cmc_serve.node.study_record import (
    DELIVERING,
    DONE,
    FAILED,
    FLAGGED,
    HELD,
    NORMAL,
    RECEIVED,
    SEGMENTING,
    Study,
)
from cmc_serve.pipeline import outputs
from cmc_serve.pipeline.api import SegmentError, SegmentOptions, segment

REDELIVER, RELEASE = "redeliver", "release"
ALL = "all"


@dataclass(frozen=True)
class Routing:
    """Where results go: `normal` destinations, and for flagged cases `flagged_to`
    (instead) or `hold` (in the spool until released); never both."""

    normal: tuple[Destination, ...] = ()
    flagged_to: tuple[Destination, ...] = ()
    hold: bool = False

    def destinations(self, study: Study) -> tuple[Destination, ...]:
        return self.flagged_to if study.route == FLAGGED else self.normal


class Worker:
    """`step()` does the next due piece of work (one study) and says whether there was any."""

    def __init__(self, spool: Spool, model: Path, options: SegmentOptions,
                 segmenter: Segmenter, routing: Routing, policy: RetryPolicy,
                 study_timeout: float, say: Say) -> None:
        self.spool, self.model, self.options = spool, model, options
        self.segmenter, self.routing, self.policy = segmenter, routing, policy
        self.study_timeout, self.say = study_timeout, say
        self.current: str | None = None  # the study in flight, for /health
        self._requests: queue.Queue[tuple[str, str]] = queue.Queue()

    # ------------------------------------------------------------------ requests
    def request(self, action: str, study_uid: str) -> None:
        """Queue REDELIVER or RELEASE of one study (or ALL); thread-safe."""
        if action not in (REDELIVER, RELEASE):
            raise ValueError(f"unknown action {action!r}")
        self._requests.put((action, study_uid))

    def resume_failed_deliveries(self) -> None:
        """At start-up: every delivery that failed gets fresh attempts with the current
        destinations (nothing lost after an outage, or after --send-to was corrected)."""
        for study in self.spool.failed_deliveries():
            if not self.routing.destinations(study):
                continue  # nowhere to send it now: it stays failed, and /health says so
            self.spool.requeue_delivery(study.study_uid, "node restarted: delivery resumed")
            self.say(f"study {study.study_uid}: failed delivery resumed")

    def _carry_out(self, action: str, study_uid: str) -> None:
        if study_uid == ALL:
            targets = (self.spool.failed_deliveries() if action == REDELIVER
                       else [s for s in self.spool.studies() if s.state == HELD])
            for target in targets:
                self._carry_out(action, target.study_uid)
            if not targets:
                self.say(f"{action} all: no study to {action}")
            return
        study = self.spool.get(study_uid)
        nowhere = not (self.routing.normal if action == RELEASE or study is None
                       else self.routing.destinations(study))
        done = "released" if action == RELEASE else "re-queued for delivery"
        why: str | None
        if nowhere:  # requeued, it would end "done" with nothing sent: keep it as it is
            why = f"study {study_uid}: not {done}: no destination given (--send-to, --stow)"
        elif action == RELEASE:
            why = (f"study {study_uid}: not held" if study is None or study.state != HELD
                   else self.spool.requeue_delivery(study_uid, "released for delivery",
                                                    route=NORMAL))
        elif study is not None and study.state == HELD:
            why = f"study {study_uid}: held for review; release it instead"
        else:
            why = self.spool.requeue_delivery(study_uid, "re-delivery asked for")
        self.say(why or f"study {study_uid}: {done}")

    # ------------------------------------------------------------------ the loop
    def _due(self, study: Study, now: float) -> bool:
        if study.state == RECEIVED:
            return now - self.spool.last_arrival(study.study_uid) >= self.study_timeout
        if study.state == DELIVERING:  # a destination to try now, or none left pending
            entries = [study.deliveries.get(d.name)
                       for d in self.routing.destinations(study)]
            pending = [e for e in entries if e is not None and e.status == "pending"]
            return None in entries or any(e.next_try <= now for e in pending) or not pending
        return False

    def step(self) -> bool:
        try:
            self._carry_out(*self._requests.get_nowait())
            return True
        except queue.Empty:
            pass
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
        study.result_files, study.result_uids, study.notes, study.deliveries = [], [], [], {}
        study.engine, study.segment_seconds, study.qc, study.route = {}, None, None, NORMAL
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
        case = outputs.case_dir(out, record.case_id)
        study.qc = _qc_verdict(case)
        results = case_results(case)
        study.result_files = [p.relative_to(self.spool.study_dir(uid)).as_posix()
                              for p, _ in results]
        study.result_uids = [sop_uid for _, sop_uid in results]
        self._route(study)

    def _route(self, study: Study) -> None:
        flagged = bool(study.qc and study.qc.get("flagged"))
        if not study.result_files:
            self._finish(study, DONE, "no DICOM result to deliver (no foreground, or no "
                                      "DICOM output type)")
        elif flagged and self.routing.hold:
            self._finish(study, HELD, reason=f"held for review: {qc_reasons(study.qc)}")
        elif flagged and self.routing.flagged_to:
            study.route = FLAGGED
            self._finish(study, DELIVERING, f"flagged ({qc_reasons(study.qc)}): results go "
                                            "to --flagged-to")
        elif not self.routing.normal:
            self._finish(study, DONE, "segmented; no destination given, results kept in the "
                                      "spool")
        else:
            self._finish(study, DELIVERING, f"{len(study.result_files)} result(s) written")

    def _failed(self, study: Study, reason: str) -> None:
        self.say(f"study {study.study_uid} failed: {reason}")
        self._finish(study, FAILED, reason=reason)

    def _finish(self, study: Study, state: str, note: str = "", reason: str | None = None) -> None:
        self.spool.finish_round(study, state, note, reason)
        if study.state != state:
            self.say(f"study {study.study_uid}: new instances arrived, segmented again")
        elif state in (DONE, HELD):
            self.say(f"study {study.study_uid} {state}: {note or reason}")

    # ------------------------------------------------------------------ delivering
    def _deliver(self, study: Study) -> None:
        folder = self.spool.study_dir(study.study_uid)
        files = [(folder / rel, uid) for rel, uid in zip(study.result_files, study.result_uids,
                                                        strict=True)]
        destinations = self.routing.destinations(study)
        deliver(study.deliveries, files, destinations, self.policy,
                save=lambda: self.spool.update(study), say=self.say)
        entries = [study.deliveries[d.name] for d in destinations]
        if any(e.status == "pending" for e in entries):
            return
        failed = [(d.name, e) for d, e in zip(destinations, entries, strict=True)
                  if e.status == "failed"]
        if failed:
            name, entry = failed[0]
            self._failed(study, f"delivery to {name} failed after {entry.attempts} attempts: "
                                f"{entry.last_error}")
        elif destinations:
            names = ", ".join(d.name for d in destinations)
            self._finish(study, DONE, f"results delivered to {names}")
        else:
            self._finish(study, DONE, "no destination given; results kept in the spool")


def qc_reasons(qc: dict[str, Any] | None) -> str:
    """The flags' sentences, for a reason line: "a: ...; b: ..."."""
    flags = (qc or {}).get("flags") or []
    return "; ".join(str(f.get("message") or f.get("code")) for f in flags) or "flagged"


def _qc_verdict(case: Path) -> dict[str, Any] | None:
    """The case's quality verdict from its `done` record (score, flagged, flags), without
    the raw signals; None when quality control did not run."""
    try:
        qc = json.loads((case / outputs.DONE).read_text()).get("qc")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(qc, dict):
        return None
    return {"score": qc.get("score"), "flagged": bool(qc.get("flagged")),
            "flags": [{k: f.get(k) for k in ("code", "message", "structure") if k in f}
                      for f in qc.get("flags") or []]}
