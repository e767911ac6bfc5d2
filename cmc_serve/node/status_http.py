"""The node's status page (`/`), health check (`/health`) and its two actions, on `--http-port`.

`/` is the same self-contained page as `cmc segment`'s report.html (html_page): one row
per study with its state, timings, the preview, its quality verdict (score and the flags'
sentences), deliveries and, for failures, the reason; it refreshes itself every few
seconds. Above the table, what needs a person: failed deliveries with their error and a
Redeliver button, held studies (`--hold-flagged`) with their reasons and a Release button,
and the transfer syntaxes senders offered that this install cannot decode.

Actions are form POSTs to `/redeliver` and `/release` (field `study`: a Study Instance UID
or "all"); they are queued for the worker (`Worker.request`) and answered with a redirect
to `/`. Each form carries a token drawn when the node starts: another web page open in the
same browser cannot read it, so it cannot make the node release or re-send anything.

`/health` is JSON for a load balancer or a monitoring probe: HTTP 200 with `"status": "ok"`,
or `"degraded"` while a delivery is being retried or has failed (the node still receives
and queues studies, so it stays in rotation; monitor the status field), and 503 with
`"down"` when the DICOM listener or the worker stopped; `problems` says what (which study,
which destination, the last error), `studies` counts studies per state. Bound to
`--http-host` (loopback by default: the page shows patient IDs and has no login; expose it
only behind an authenticating proxy).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from cmc_serve.html_page import badge, engine_text, esc, page, thumb_cell
from cmc_serve.node.spool import Spool, valid_uid
from cmc_serve.node.study_record import HELD, Study
from cmc_serve.node.worker import ALL, REDELIVER, RELEASE, qc_reasons
from cmc_serve.pipeline import outputs
from cmc_serve.qc.flags import score_text

if TYPE_CHECKING:
    from cmc_serve.node.scp import RefusedSyntax, StorageSCP
    from cmc_serve.node.worker import Worker

REFRESH_SECONDS = 5
PAGE_STUDIES = 200  # the newest; every study's state stays in SPOOL/studies/*/study.json
HEALTH_PROBLEMS = 10  # failed deliveries named in /health; the rest are counted
MAX_FORM_BYTES = 4096


def _when(epoch: float | None) -> str:
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S") if epoch else "-"


def _score(qc: dict[str, Any] | None) -> str:
    score = (qc or {}).get("score")
    return score_text(score) if isinstance(score, (int, float)) else "-"


def _qc_cell(s: Study) -> str:
    if not s.qc:
        return '<span class="muted">-</span>'
    text = f"score {_score(s.qc)}"
    if not s.qc.get("flagged"):
        return esc(text)
    return (f'<b class="flag">{esc(text)}: needs review</b>'
            + "".join(f'<div class="reason">{esc(f.get("message") or f.get("code"))}</div>'
                      for f in s.qc.get("flags", [])))


def _study_row(spool: Spool, s: Study) -> list[str]:
    folder = spool.study_dir(s.study_uid)
    preview = (outputs.case_dir(spool.out_dir(s.study_uid), s.case_id) / outputs.PREVIEW
               if s.case_id else folder / "-")
    deliveries = "<br>".join(
        f"{esc(name)}: {esc(d.status)}"
        + (f' <span class="reason">{esc(d.last_error)}</span>' if d.last_error else "")
        for name, d in s.deliveries.items()) or '<span class="muted">-</span>'
    # a failed delivery's error is in the deliveries column, a held study's reasons in the
    # quality column (and both above the table)
    reason = ("delivery failed (see deliveries)" if s.delivery_failed
              else "held for review (see quality)" if s.state == HELD else s.reason)
    detail = f'<div class="reason">{esc(reason)}</div>' if reason else ""
    if s.state == "done" and s.history and s.history[-1][2]:
        detail += f'<div class="muted">{esc(s.history[-1][2])}</div>'  # e.g. "no SEG ..."
    if s.refused:
        detail += (f'<div class="reason">{len(s.refused)} instance(s) refused: '
                   f"{esc(s.refused[-1][1])}</div>")
    if s.ignored:
        kinds = ", ".join(f"{n} {name}" for name, n in s.ignored.items())
        detail += f'<div class="muted">ignored (not segmented): {esc(kinds)}</div>'
    timing = f'<span class="nowrap">received {_when(s.first_received)}</span>'
    if s.segment_seconds is not None:
        timing += f"<br>segmented in {s.segment_seconds:.1f} s"
    if s.finished:
        timing += f'<br><span class="nowrap">finished {_when(s.finished)}</span>'
    return [f'<b class="uid">{esc(s.study_uid)}</b><br>patient {esc(s.patient_id or "-")}'
            f"<br>{spool.instance_count(s.study_uid)} instance(s), round {s.round}",
            badge(s.state) + detail, timing,
            thumb_cell(preview, f"preview of {s.study_uid}"), _qc_cell(s),
            deliveries, engine_text(s.engine)]


def _button(action: str, study: str, label: str, token: str) -> str:
    return (f'<form class="act" method="post" action="/{action}">'
            f'<input type="hidden" name="token" value="{esc(token)}">'
            f'<input type="hidden" name="study" value="{esc(study)}">'
            f"<button>{esc(label)}</button></form>")


def attention(spool: Spool, refused_syntaxes: Sequence[RefusedSyntax], token: str) -> str:
    """The part above the table: what a person has to act on."""
    parts = []
    failed = spool.failed_deliveries()
    if failed:
        items = "".join(
            f'<li><b>{esc(s.study_uid)}</b> (patient {esc(s.patient_id)}): '
            f'<span class="reason">{esc(s.reason)}</span> '
            f'{_button(REDELIVER, s.study_uid, "Redeliver", token)}</li>' for s in failed)
        parts.append(f'<section class="attention"><h2>Failed deliveries ({len(failed)}) '
                     f'{_button(REDELIVER, ALL, "Redeliver all", token)}</h2>'
                     f"<ul>{items}</ul></section>")
    held = [s for s in spool.studies() if s.state == HELD]
    if held:
        items = "".join(
            f'<li><b>{esc(s.study_uid)}</b> (patient {esc(s.patient_id)}, '
            f"QC score {_score(s.qc)}): "
            f'<span class="reason">{esc(qc_reasons(s.qc))}</span> '
            f'{_button(RELEASE, s.study_uid, "Release", token)}</li>' for s in held)
        parts.append(f'<section class="attention"><h2>Held for review ({len(held)}) '
                     f'{_button(RELEASE, ALL, "Release all", token)}</h2>'
                     f"<ul>{items}</ul></section>")
    if refused_syntaxes:
        items = "".join(f'<li><span class="reason">{esc(r.message)}</span> '
                        f'<span class="muted">({r.count} association(s), last '
                        f"{_when(r.last)})</span></li>" for r in refused_syntaxes)
        parts.append('<section class="attention"><h2>Transfer syntaxes refused</h2>'
                     f"<ul>{items}</ul></section>")
    return "".join(parts)


def status_page(spool: Spool, health: dict[str, Any],
                refused_syntaxes: Sequence[RefusedSyntax] | None = None, token: str = "") -> str:
    rows = [_study_row(spool, s) for s in reversed(spool.studies(newest=PAGE_STUDIES))]
    counts = ", ".join(f"{n} {state}" for state, n in health["studies"].items() if n)
    subtitle = (f"{esc(health['ae_title'])} &middot; {esc(health['status'])} &middot; "
                f"{esc(counts or 'no studies yet')} &middot; updated {_when(time.time())}")
    return page("cmc listen", subtitle, ["study", "state", "timings", "preview", "quality",
                                         "deliveries", "runtime / device / precision"],
                rows, refresh_seconds=REFRESH_SECONDS,
                preamble=attention(spool, refused_syntaxes or [], token))


class StatusServer:
    """A threaded HTTP server for `/`, `/health` and the actions; `start()` / `stop()`."""

    def __init__(self, spool: Spool, worker: Worker, scp: StorageSCP, host: str,
                 port: int) -> None:
        self.spool, self.worker, self.scp = spool, worker, scp
        self.started = time.time()
        self.token = secrets.token_urlsafe(24)
        self.worker_thread = threading.current_thread()  # the worker runs in the caller
        handler = type("Handler", (_Handler,), {"status": self})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            from cmc_serve.node.scp import ListenError

            raise ListenError(f"--http-port: cannot listen on {host}:{port} "
                              f"({exc.strerror or exc})") from exc
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="cmc-status",
                                        daemon=True)

    def health(self) -> dict[str, Any]:
        counts = self.spool.counts()
        down = [text for text, ok in (("DICOM listener not running", self.scp.running),
                                      ("worker stopped", self.worker_thread.is_alive()))
                if not ok]
        retrying = sorted({name for s in self.spool.studies(unfinished_only=True)
                           if s.state == "delivering"
                           for name, d in s.deliveries.items() if d.attempts})
        failed = self.spool.failed_deliveries()
        problems = down + [f"delivery to {name} failing (retrying)" for name in retrying]
        problems += [f"delivery of study {s.study_uid} failed: {s.reason}"
                     for s in failed[:HEALTH_PROBLEMS]]
        if len(failed) > HEALTH_PROBLEMS:
            problems.append(f"and {len(failed) - HEALTH_PROBLEMS} more failed deliveries")
        status = "down" if down else "degraded" if problems else "ok"
        return {"status": status, "problems": problems,
                "ae_title": self.scp.ae_title, "dicom": f"{self.scp.host}:{self.scp.port}",
                "uptime_seconds": round(time.time() - self.started, 1),
                "in_flight": self.worker.current, "instances_received": self.scp.received,
                "instances_refused": self.scp.refused, "instances_ignored": self.scp.ignored,
                "failed_deliveries": len(failed), "studies": counts}

    def act(self, action: str, form: dict[str, list[str]]) -> str | None:
        """Queue a posted action; None when queued, else why it was refused."""
        if not secrets.compare_digest(form.get("token", [""])[0], self.token):
            return "the page that sent this is out of date or not ours: reload the status page"
        study = form.get("study", [""])[0].strip()
        if study != ALL and not valid_uid(study):
            return f"study {study!r}: not a Study Instance UID"
        self.worker.request(action, study)
        return None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    status: StatusServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        health = self.status.health()
        if path == "/health":
            code = 503 if health["status"] == "down" else 200
            self._send(code, "application/json", json.dumps(health, indent=1).encode())
        elif path in ("/", "/index.html"):
            body = status_page(self.status.spool, health, self.status.scp.refused_syntaxes(),
                               self.status.token).encode()
            self._send(200, "text/html; charset=utf-8", body)
        else:
            self._send(404, "text/plain", b"not found\n")

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        action = self.path.split("?", 1)[0].strip("/")
        length = int(self.headers.get("Content-Length") or 0)
        if action not in (REDELIVER, RELEASE):
            self._send(404, "text/plain", b"not found\n")
            return
        if not 0 < length <= MAX_FORM_BYTES:
            self._send(400, "text/plain", b"expected a form (study, token)\n")
            return
        form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
        refused = self.status.act(action, form)
        if refused is not None:
            self._send(403, "text/plain; charset=utf-8", f"{refused}\n".encode())
            return
        self.send_response(303)
        self.send_header("Location", "/")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, code: int, kind: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return  # the node's log is its study events, not every page view
