"""The node's spool: received instances and each study's state, on disk, surviving any kill.

Layout (SPOOL is `--spool`, default ./cmc-spool):
```
SPOOL/.cmc-spool                                  marks the folder as a cmc spool
SPOOL/studies/<StudyInstanceUID>/study.json       the study's state (below)
SPOOL/studies/<StudyInstanceUID>/instances/<SOPInstanceUID>.dcm
SPOOL/studies/<StudyInstanceUID>/out/             the `cmc segment` output of the study
```
study.json's format (the states, the delivery ledger) and its one reader and writer are
`cmc_serve.node.study_record`; every spool file is written by `cmc_common.files.atomic_write`
(durable), with the mode a plain `open` gives.
Why it is safe to kill the node at any moment (SIGKILL included):
- an instance is written to a temporary name, fsync'd, renamed and its folder fsync'd
  *before* the C-STORE response says "stored": what the sender was told is on disk;
- study.json is replaced the same way at every state change, so it is always a complete
  record of one state: received -> segmenting -> delivering -> done | failed (with the
  one-line reason), or held (a flagged result waiting for a person, `--hold-flagged`);
- on start-up (`Spool.open`) a study left in `segmenting` goes back to `received` (it is
  segmented again; nothing of it was sent yet), a study in `delivering` is retried at once
  (its result files and the delivery ledger are on disk, see `delivery`), and temporaries of
  interrupted writes are removed.
Nothing is lost after an outage: a study whose delivery failed after the retries keeps its
results and ledger (state `failed`, `delivery_failed`); `requeue_delivery` puts it back in
`delivering` with fresh attempts for the destinations that did not acknowledge it (the
node does this at every start, and on `--redeliver` or the status page's button), and a
destination that acknowledged a result is never sent it again.
Instances that arrive for a study that is already segmented reopen it once the current
round is finished: the study is segmented again with every instance received (a PACS that
sends a study in several associations, spread over minutes, is common). An instance re-sent
byte for byte unchanged is not new and reopens nothing, so a PACS routing rule that fires
again when the SEG arrives cannot start a loop (a re-send of a study whose delivery failed
does requeue that delivery: the PACS is evidently back). Objects the node does not segment
are never stored here; the SCP only counts them on their study (`record_ignored`).
UIDs are used as file names only when they are valid UIDs (digits and dots, <= 64
characters), so a crafted UID cannot escape the spool.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from cmc_common.errors import CmcError
from cmc_serve.node.study_record import (
    DELIVERING,
    FINISHED,
    RECEIVED,
    SEGMENTING,
    STATES,
    Study,
    read_study,
    store,
    write_study,
)

MARKER = ".cmc-spool"
LOCK = ".lock"
STUDY_FILE = "study.json"
INSTANCES = "instances"
OUT = "out"

_UID = re.compile(r"^[0-9](?:[0-9.]{0,63})$")


class SpoolError(CmcError, ValueError):
    """The spool folder cannot be used (not a spool, not writable)."""


def valid_uid(uid: str) -> bool:
    """A DICOM UID we accept as a file name: digits and dots, at most 64 characters."""
    return bool(_UID.match(uid)) and ".." not in uid and not uid.endswith(".")


def _same_content(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


class Spool:
    """The spool folder; thread-safe (the SCP's association threads and the worker share it).

    Every state change goes through `update`, which holds one lock and rewrites study.json
    durably; readers get copies.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.RLock()
        self._last_arrival: dict[str, float] = {}
        # study UID -> (state, first_received, delivery_failed), kept in step with every
        # study.json written, so the worker's poll and /health never read thousands of
        # finished studies' files
        self._index: dict[str, tuple[str, float, bool]] = {}
        self._held: Any = None  # the open lock file of an exclusive spool

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, root: Path | str, exclusive: bool = False, in_use_hint: str = "") -> Spool:
        """Create or adopt SPOOL and recover from an interrupted run (see module docstring).

        `exclusive` (the node): hold the spool's lock until `close()`, taken before the
        recovery so that a second node cannot reset the first one's studies; `in_use_hint`
        ends the refusal when another node holds it (what the caller can do instead)."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise SpoolError(f"{root}: exists and is not a folder")
        if root.is_dir() and not (root / MARKER).is_file() and any(root.iterdir()):
            raise SpoolError(f"{root}: folder exists, is not empty and is not a cmc spool (no "
                             f"{MARKER}); choose a new or empty --spool folder")
        try:
            (root / "studies").mkdir(parents=True, exist_ok=True)
            if not (root / MARKER).is_file():
                store(root / MARKER, b'{"format": "cmc-spool", "format_version": 1}\n')
        except OSError as exc:
            raise SpoolError(f"{root}: cannot write the spool ({exc.strerror or exc})") from exc
        spool = cls(root)
        if exclusive:
            spool._held = spool._lock_file(in_use_hint)
        spool._recover()
        return spool

    def close(self) -> None:
        """Release the lock of an exclusive spool."""
        if self._held is not None:
            self._held.close()
            self._held = None

    def _recover(self) -> None:
        for folder in (self.root / "studies").iterdir():
            for leftover in folder.glob(f"{INSTANCES}/.*.tmp"):
                leftover.unlink(missing_ok=True)
            study = self.get(folder.name)
            if study is not None:
                self._index_study(study)
            if study is None:  # killed between its first instance and its study.json
                if valid_uid(folder.name) and any(folder.glob(f"{INSTANCES}/*.dcm")):
                    study = Study(folder.name, first_received=time.time())
                    study.set_state(RECEIVED, "instances found at start-up")
                    self._save(study)
                continue
            if study.state == SEGMENTING:
                study.set_state(RECEIVED, "node restarted while segmenting: segmented again")
                self._save(study)
            elif study.state == DELIVERING:
                for d in study.deliveries.values():
                    d.next_try = 0.0
                study.history.append([DELIVERING, round(time.time(), 3),
                                      "node restarted: delivery resumed"])
                self._save(study)

    def _lock_file(self, in_use_hint: str) -> Any:
        """Take the spool for this process (an open file holding an exclusive flock; the
        kernel releases it when the process dies, SIGKILL included). Two nodes on one spool
        would segment and deliver the same studies twice."""
        import fcntl

        handle = open(self.root / LOCK, "a+")  # noqa: SIM115 (held for the node's lifetime)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            handle.close()
            raise SpoolError(f"{self.root}: in use by another cmc listen (pid {owner})"
                             + (f"; {in_use_hint}" if in_use_hint else "")) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return handle

    # ------------------------------------------------------------------ paths
    def study_dir(self, study_uid: str) -> Path:
        return self.root / "studies" / study_uid

    def instances_dir(self, study_uid: str) -> Path:
        return self.study_dir(study_uid) / INSTANCES

    def out_dir(self, study_uid: str) -> Path:
        return self.study_dir(study_uid) / OUT

    def instance_count(self, study_uid: str) -> int:
        folder = self.instances_dir(study_uid)
        return sum(1 for p in folder.glob("*.dcm")) if folder.is_dir() else 0

    # ------------------------------------------------------------------ state
    def get(self, study_uid: str) -> Study | None:
        return read_study(self.study_dir(study_uid) / STUDY_FILE)

    def studies(self, unfinished_only: bool = False, newest: int | None = None
                ) -> list[Study]:
        """The studies (all, or those not done/failed), oldest first; `newest` keeps only
        that many of the most recent."""
        with self._lock:
            index = sorted(self._index.items(), key=lambda item: item[1][1])
        uids = [uid for uid, (state, _, _) in index
                if not unfinished_only or state not in FINISHED]
        if newest is not None:
            uids = uids[-newest:] if newest else []
        found = (self.get(uid) for uid in uids)
        return [s for s in found if s is not None]

    def counts(self) -> dict[str, int]:
        """How many studies are in each state."""
        with self._lock:
            states = [state for state, _, _ in self._index.values()]
        return {state: states.count(state) for state in STATES}

    def failed_deliveries(self) -> list[Study]:
        """The studies whose delivery failed after the retries, oldest first."""
        with self._lock:
            uids = [uid for uid, (_, _, failed) in sorted(
                self._index.items(), key=lambda item: item[1][1]) if failed]
        found = (self.get(uid) for uid in uids)
        return [s for s in found if s is not None and s.delivery_failed]

    def _index_study(self, study: Study) -> None:
        with self._lock:
            self._index[study.study_uid] = (study.state, study.first_received,
                                            study.delivery_failed)

    def _save(self, study: Study) -> None:
        write_study(self.study_dir(study.study_uid) / STUDY_FILE, study)
        self._index_study(study)

    def update(self, study: Study) -> None:
        """Persist `study` (a copy obtained from `get`, changed by the caller); the refusals
        and ignored objects the SCP recorded meanwhile are kept."""
        with self._lock:
            self._keep_receipts(study)
            self._save(study)

    def _keep_receipts(self, study: Study) -> None:
        current = self.get(study.study_uid)
        if current is not None:
            study.refused, study.ignored = current.refused, current.ignored

    def finish_round(self, study: Study, state: str, note: str = "",
                     reason: str | None = None) -> None:
        """Move a study on from `segmenting` or `delivering` to `state`, unless instances
        arrived since its segmentation started: then it goes back to `received` for a new
        round (under the lock the SCP takes, so a late instance reopens a study once)."""
        with self._lock:
            self._keep_receipts(study)
            if self.arrived_since(study):
                study.round += 1
                study.set_state(RECEIVED, f"instances arrived during round {study.round - 1}: "
                                          f"segmented again (round {study.round})")
            else:
                study.set_state(state, note, reason)
            self._save(study)

    def last_arrival(self, study_uid: str) -> float:
        """When the study's newest instance arrived (from the files after a restart)."""
        with self._lock:
            if study_uid not in self._last_arrival:
                times = [p.stat().st_mtime for p in self.instances_dir(study_uid).glob("*.dcm")]
                self._last_arrival[study_uid] = max(times, default=0.0)
            return self._last_arrival[study_uid]

    # ------------------------------------------------------------------ receiving
    def add_instance(self, study_uid: str, sop_uid: str, patient_id: str, data: bytes) -> None:
        """Store one received instance durably (the caller checked both UIDs with
        `valid_uid`) and mark its study received, reopening a finished one.

        The file is written outside the lock (associations store in parallel); a study the
        worker finishes in between is reopened here, so no instance is left unsegmented."""
        path = self.instances_dir(study_uid) / f"{sop_uid}.dcm"
        if _same_content(path, data):
            # re-sent unchanged (a PACS rule fired again): nothing new to segment; but a
            # PACS that sends again is up again, so a failed delivery is tried again
            self.requeue_delivery(study_uid, "instances re-sent: delivery tried again",
                                  only_failed=True)
            return
        store(path, data)
        with self._lock:
            self._last_arrival[study_uid] = time.time()
            study = self.get(study_uid)
            if study is None:
                study = Study(study_uid, patient_id=patient_id, first_received=time.time())
                study.set_state(RECEIVED, "first instance")
                self._save(study)
            elif study.state in FINISHED:
                study.round += 1
                study.set_state(RECEIVED, f"new instances after {study.state}: round "
                                          f"{study.round}")
                self._save(study)

    def record_refusal(self, study_uid: str, sop_uid: str, reason: str) -> None:
        """Remember an instance the SCP refused, for the status page (known studies only)."""
        with self._lock:
            study = self.get(study_uid) if valid_uid(study_uid) else None
            if study is not None:
                study.refused.append([sop_uid, reason])
                self._save(study)

    def record_ignored(self, study_uid: str, sop_class_name: str) -> None:
        """Count an object the SCP accepted without storing it (known studies only)."""
        with self._lock:
            study = self.get(study_uid) if valid_uid(study_uid) else None
            if study is not None:
                study.ignored[sop_class_name] = study.ignored.get(sop_class_name, 0) + 1
                self._save(study)

    # ------------------------------------------------------------------ after a failure
    def requeue_delivery(self, study_uid: str, note: str, only_failed: bool = False,
                         route: str | None = None) -> str | None:
        """Put a study's results back in `delivering`; None when done, else why not.

        A study that failed delivery, or one that is done or held (`only_failed` False),
        qualifies when it has results; every destination that gave up gets fresh attempts,
        the ledger of what each acknowledged is kept (so nothing is sent twice), and a
        destination given now that is not in the ledger yet is tried too. `route` changes
        which destinations the results go to (releasing a held study: NORMAL)."""
        with self._lock:
            if only_failed and not self._index.get(study_uid, (RECEIVED, 0.0, False))[2]:
                return f"study {study_uid}: no failed delivery"  # the index says so: no read
            study = self.get(study_uid) if valid_uid(study_uid) else None
            if study is None:
                return f"study {study_uid}: not in the spool"
            if only_failed and not study.delivery_failed:
                return f"study {study_uid}: no failed delivery"
            if study.state not in FINISHED or not study.result_files:
                return (f"study {study_uid}: nothing to deliver (state {study.state}"
                        f"{'' if study.result_files else ', no results'})")
            for entry in study.deliveries.values():
                if entry.status == "failed":
                    entry.status, entry.attempts, entry.next_try = "pending", 0, 0.0
            study.route = route or study.route
            study.set_state(DELIVERING, note)
            self._save(study)
            return None

    # ------------------------------------------------------------------ the worker's view
    def reset_output(self, study_uid: str) -> Path:
        """An empty `out/` for a new segmentation round (the node's own folder)."""
        out = self.out_dir(study_uid)
        if out.exists():
            shutil.rmtree(out)
        return out

    def arrived_since(self, study: Study) -> bool:
        """Did an instance arrive after this round's segmentation started?"""
        started = study.segment_started or 0.0
        return self.last_arrival(study.study_uid) > started
