"""The node's status page (`/`) and health check (`/health`), served on `--http-port`.

`/` is the same self-contained page as `cmc segment`'s report.html (html_report): one row
per study with its state, timings, the SEG's preview, deliveries and, for failures, the
reason; it refreshes itself every few seconds. `/health` is JSON for a load balancer or a
monitoring probe: HTTP 200 with `"status": "ok"`, or `"degraded"` while a delivery is
failing (the node still receives and queues studies, so it stays in rotation), and 503 with
`"down"` when the DICOM listener or the worker stopped; `problems` says what, `studies`
counts studies per state. Bound to `--http-host` (loopback by default: the page shows
patient IDs and has no login; expose it only behind an authenticating proxy).
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cmc_serve.node.spool import Spool, Study
from cmc_serve.pipeline import outputs
from cmc_serve.pipeline.html_report import (
    badge,
    engine_text,
    esc,
    page,
    thumb_cell,
)

REFRESH_SECONDS = 5
PAGE_STUDIES = 200  # the newest; every study's state stays in SPOOL/studies/*/study.json


def _when(epoch: float | None) -> str:
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S") if epoch else "-"


def _study_row(spool: Spool, s: Study) -> list[str]:
    folder = spool.study_dir(s.study_uid)
    preview = (outputs.case_dir(spool.out_dir(s.study_uid), s.case_id) / outputs.PREVIEW
               if s.case_id else folder / "-")
    deliveries = "<br>".join(
        f"{esc(name)}: {esc(d.status)}"
        + (f' <span class="reason">{esc(d.last_error)}</span>' if d.last_error else "")
        for name, d in s.deliveries.items()) or '<span class="muted">-</span>'
    detail = f'<div class="reason">{esc(s.reason)}</div>' if s.reason else ""
    if s.state == "done" and s.history and s.history[-1][2]:
        detail += f'<div class="muted">{esc(s.history[-1][2])}</div>'  # e.g. "no SEG ..."
    if s.refused:
        detail += (f'<div class="reason">{len(s.refused)} instance(s) refused: '
                   f"{esc(s.refused[-1][1])}</div>")
    timing = f'<span class="nowrap">received {_when(s.first_received)}</span>'
    if s.segment_seconds is not None:
        timing += f"<br>segmented in {s.segment_seconds:.1f} s"
    if s.finished:
        timing += f'<br><span class="nowrap">finished {_when(s.finished)}</span>'
    return [f'<b class="uid">{esc(s.study_uid)}</b><br>patient {esc(s.patient_id or "-")}'
            f"<br>{spool.instance_count(s.study_uid)} instance(s), round {s.round}",
            badge(s.state) + detail, timing,
            thumb_cell(preview, f"preview of {s.study_uid}"),
            deliveries, engine_text(s.engine)]


def status_page(spool: Spool, health: dict[str, Any]) -> str:
    rows = [_study_row(spool, s) for s in reversed(spool.studies(newest=PAGE_STUDIES))]
    counts = ", ".join(f"{n} {state}" for state, n in health["studies"].items() if n)
    subtitle = (f"{esc(health['ae_title'])} &middot; {esc(health['status'])} &middot; "
                f"{esc(counts or 'no studies yet')} &middot; updated {_when(time.time())}")
    return page("cmc listen", subtitle, ["study", "state", "timings", "SEG preview",
                                         "deliveries", "runtime / device / precision"],
                rows, refresh_seconds=REFRESH_SECONDS)


class StatusServer:
    """A threaded HTTP server for `/` and `/health`; `start()` / `stop()`."""

    def __init__(self, spool: Spool, worker: Any, scp: Any, host: str, port: int) -> None:
        self.spool, self.worker, self.scp = spool, worker, scp
        self.started = time.time()
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
        failing = sorted({name for s in self.spool.studies(unfinished_only=True)
                          if s.state == "delivering"
                          for name, d in s.deliveries.items() if d.attempts})
        problems = down + [f"delivery to {name} failing (retrying)" for name in failing]
        status = "down" if down else "degraded" if problems else "ok"
        return {"status": status, "problems": problems,
                "ae_title": self.scp.ae_title, "dicom": f"{self.scp.host}:{self.scp.port}",
                "uptime_seconds": round(time.time() - self.started, 1),
                "in_flight": self.worker.current, "instances_received": self.scp.received,
                "instances_refused": self.scp.refused, "studies": counts}

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
            body = status_page(self.status.spool, health).encode()
            self._send(200, "text/html; charset=utf-8", body)
        else:
            self._send(404, "text/plain", b"not found\n")

    def _send(self, code: int, kind: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return  # the node's log is its study events, not every page view
