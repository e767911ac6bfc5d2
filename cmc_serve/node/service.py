"""`cmc listen` as one call: `listen(model, ListenOptions(...), SegmentOptions(...))`.

Start-up refuses, with one `CmcError` line and before anything listens, what would make
the node useless later: an unreadable model, bad pairing rules, an unusable runtime (the
`ModelDirError`, `PairingError` or `RuntimeUnavailable` of that check, as `cmc segment`
raises them), a spool that is not a spool or is held by another node (`SpoolError`), a
malformed destination, a non-loopback address without an allow-list, a port in use
(`ListenError`). Then: the Storage SCP and (optionally) the status page serve in
background threads and the worker runs in the calling thread until `stop` is set or
SIGTERM/SIGINT arrives; the study in flight is finished (segmented and its delivery
attempted) before the node exits, and whatever is left resumes at the next start, failed
deliveries included (with the destinations given now). `redeliver` / `release` (study UIDs
or "all") are carried out once the node is up, like the status page's buttons.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmc_common.contract import Mode, QcLevel
from cmc_common.progress import Say
from cmc_serve.node.delivery import (
    Destination,
    RetryPolicy,
    parse_destination,
    parse_send_to,
    parse_stow,
)
from cmc_serve.node.scp import ListenError, StorageSCP, check_listen_address
from cmc_serve.node.spool import Spool, valid_uid
from cmc_serve.node.worker import ALL, REDELIVER, RELEASE, Routing, Worker
from cmc_serve.pipeline.api import SegmentOptions

if TYPE_CHECKING:
    from cmc_serve.engine import Segmenter

POLL_SECONDS = 0.25


@dataclass(frozen=True)
class ListenOptions:
    """The node's own options (the segmentation options are `SegmentOptions`)."""

    ae_title: str = "CMC"
    host: str = "127.0.0.1"
    port: int = 11112
    allow: tuple[str, ...] = ()  # calling AE titles; empty: any (loopback only)
    spool: Path = Path("cmc-spool")
    study_timeout: float = 30.0
    send_to: tuple[str, ...] = ()  # AET@HOST:PORT
    stow: tuple[str, ...] = ()  # DICOMweb root URLs
    http_port: int | None = None  # status page and /health
    http_host: str = "127.0.0.1"  # the page shows patient IDs: loopback unless asked
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    flagged_to: tuple[str, ...] = ()  # flagged results go here instead (AET@HOST:PORT, URL)
    hold_flagged: bool = False  # flagged results wait in the spool for a person
    redeliver: tuple[str, ...] = ()  # study UIDs or "all", re-queued once the node is up
    release: tuple[str, ...] = ()  # held study UIDs or "all"

    def __post_init__(self) -> None:
        if not 1 <= len(self.ae_title) <= 16 or "\\" in self.ae_title:
            raise ListenError(f"--ae-title {self.ae_title!r}: 1 to 16 characters, no backslash")
        if self.study_timeout <= 0:
            raise ListenError(f"--study-timeout {self.study_timeout}: must be above 0 seconds")
        if self.retry.attempts < 1 or self.retry.first_delay < 0:
            raise ListenError("--retries must be at least 1 and --retry-delay not negative")
        if self.flagged_to and self.hold_flagged:
            raise ListenError("--flagged-to and --hold-flagged: choose one (send flagged "
                              "results to a review destination, or hold them in the spool)")
        for flag, values in (("--redeliver", self.redeliver), ("--release", self.release)):
            for value in values:
                if value != ALL and not valid_uid(value):
                    raise ListenError(f"{flag} {value!r}: give a Study Instance UID or 'all'")

    def routing(self) -> Routing:
        try:
            normal: list[Destination] = [parse_send_to(t, self.ae_title) for t in self.send_to]
            normal += [parse_stow(t) for t in self.stow]
            flagged = [parse_destination(t, self.ae_title) for t in self.flagged_to]
        except ValueError as exc:
            raise ListenError(str(exc)) from None
        return Routing(tuple(normal), tuple(flagged), self.hold_flagged)


def _say_to_stderr(text: str) -> None:
    stamp = datetime.now().isoformat(timespec="seconds")
    print(f"{stamp} cmc listen: {text}", file=sys.stderr, flush=True)


def _open_segmenter(model: Path, options: SegmentOptions) -> Segmenter:
    """The one Segmenter of the node, after the checks `cmc segment` makes before a run."""
    from cmc_common.contract import MODES
    from cmc_serve.model_dir import ModelInfo
    from cmc_serve.pipeline.pairing import PairingRules

    info = ModelInfo.load(model)
    if options.pairing:
        PairingRules.from_yaml(options.pairing, info.modalities)
    segmenter = options.make_segmenter(info)
    # Load the graph complete studies use now: a runtime that cannot run here stops the
    # node at start-up, not at its first study; other modes load on first use.
    mode = options.mode if options.mode != "auto" else next(
        (m for m in MODES if m in info.modes), Mode.FUSED)
    try:
        segmenter.runtime_for(mode)
    except BaseException:
        segmenter.close()
        raise
    return segmenter


class _Signals:
    """SIGTERM/SIGINT set `stop` (the study in flight finishes); restored on exit."""

    def __init__(self, stop: threading.Event, say: Say) -> None:
        self.stop, self.say = stop, say
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.say(f"{signal.Signals(signum).name}: finishing the study in flight, then exiting")
        self.stop.set()

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def listen(model: Path | str, options: ListenOptions | None = None,
           segment_options: SegmentOptions | None = None,
           say: Say = _say_to_stderr,
           stop: threading.Event | None = None) -> None:
    """Run the node until `stop` is set or a stop signal arrives (see module docstring).

    Raises a CmcError (one line, see the module docstring) when the node cannot start.
    """
    model = Path(model)
    options = options or ListenOptions()
    seg_options = segment_options or SegmentOptions()
    # the node segments each study completely: no shard, no --continue
    seg_options = replace(seg_options, resume=False, shard=None)
    stop = stop or threading.Event()
    routing = options.routing()
    if ((routing.normal or routing.flagged_to) and seg_options.output_types
            and all(t == "nifti" for t in seg_options.output_types)):
        raise ListenError("--send-to/--stow/--flagged-to deliver DICOM results: --output-type "
                          "must include dicom-seg (or be auto)")
    if (routing.flagged_to or routing.hold) and seg_options.qc == QcLevel.OFF:
        raise ListenError("--flagged-to/--hold-flagged act on quality control's verdict: "
                          "--qc off would never flag a case")
    check_listen_address(options.host, options.allow)
    with _open_segmenter(model, seg_options) as segmenter:
        # last check (a refused start creates nothing); held until the node stops
        spool = Spool.open(options.spool, exclusive=True, in_use_hint=(
            "a running node takes --redeliver / --release from its status page's buttons "
            "(--http-port)" if options.redeliver or options.release else ""))
        scp = StorageSCP(spool, options.ae_title, options.host, options.port, options.allow,
                         say)
        worker = Worker(spool, model, seg_options, segmenter, routing, options.retry,
                        options.study_timeout, say)
        worker.resume_failed_deliveries()
        for action, uids in ((REDELIVER, options.redeliver), (RELEASE, options.release)):
            for uid in uids:
                worker.request(action, uid)
        status = None
        scp.start()
        try:
            if options.http_port is not None:
                from cmc_serve.node.status_http import StatusServer

                status = StatusServer(spool, worker, scp, options.http_host,
                                      options.http_port)
                status.start()
            _announce(options, routing, spool, say)
            with _Signals(stop, say):
                while not stop.is_set():
                    if not worker.step():
                        stop.wait(POLL_SECONDS)
        finally:
            scp.stop()
            if status is not None:
                status.stop()
            spool.close()
    say("stopped")


def _announce(options: ListenOptions, routing: Routing, spool: Spool,
              say: Say) -> None:
    allow = ",".join(options.allow) or "any calling AE title (loopback)"
    say(f"{options.ae_title} listening on {options.host}:{options.port}, accepting {allow}; "
        f"spool {spool.root}; study complete after {options.study_timeout:g} s without "
        "instances")
    say("deliver to: " + (", ".join(d.name for d in routing.normal)
                          or "nowhere (results stay in the spool)"))
    if routing.flagged_to:
        say("flagged results to: " + ", ".join(d.name for d in routing.flagged_to)
            + " (instead)")
    elif routing.hold:
        say("flagged results: held in the spool until released on the status page")
    if options.http_port is not None:
        say(f"status page http://{options.http_host}:{options.http_port}/  health "
            f"http://{options.http_host}:{options.http_port}/health")
    waiting = len(spool.studies(unfinished_only=True))
    if waiting:
        say(f"resuming {waiting} unfinished stud{'y' if waiting == 1 else 'ies'} from the spool")
