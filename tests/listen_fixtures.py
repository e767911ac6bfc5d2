"""Test helpers for `cmc listen`: the node as a real process, studies, and a DICOM sender.

The node runs as `python -m cmc_cli.main listen ...` in a subprocess, so tests can stop it with
SIGTERM or kill it with SIGKILL like an operator (or the OOM killer) would. Studies are the
two-ball CT + MR phantom of segment_fixtures (real DICOM files, known answer). Every wait is
bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
import segment_fixtures as fx
from dicom_factory import ROOT_UID
from pydicom.uid import generate_uid

from cmc_serve.triton.server import free_ports

if TYPE_CHECKING:
    from orthanc_fixture import OrthancServer

REPO = Path(__file__).resolve().parents[1]
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
NODE_START_TIMEOUT = 60.0


@dataclass
class Study:
    """A synthetic CT + MR study on disk."""

    study_uid: str
    ct: list[Path]
    mr: list[Path]
    ct_series_uid: str

    @property
    def files(self) -> list[Path]:
        return self.ct + self.mr


# (CT, MR) geometry overrides of segment_fixtures' specs per kind of study:
# "small": the default grids; the MR's field of view cuts ball B (quality control flags it,
#   fov_cut); "square": 32 x 32 slices (JPEG 2000's six resolution levels need 32 pixels);
#   "whole": both balls well inside both fields of view (quality control finds nothing)
GRIDS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "small": ({}, {}),
    "square": ({"rows": 32, "cols": 32, "origin": (-32.0, -32.0, -11.0)},
               {"rows": 32, "cols": 32}),
    "whole": ({"rows": 40, "cols": 40, "n_slices": 24, "origin": (-40.0, -40.0, -24.0)},
              {"rows": 40, "cols": 44, "n_slices": 30, "origin": (-33.0, -37.0, 35.0)}),
}


def write_study(folder: Path, patient_id: str = "PAT1", grid: str = "small") -> Study:
    """A CT + MR study of the phantom on one of `GRIDS`."""
    study_uid = generate_uid(ROOT_UID)[:60]  # dicom_factory appends ".9" for the frame UID
    ct_grid, mr_grid = GRIDS[grid]
    ct = fx.ct_spec(study_uid, **ct_grid)
    mr = fx.mr_spec(study_uid, **mr_grid)
    ct_files = fx.write_phantom_series(folder / "ct", ct)
    mr_files = fx.write_phantom_series(folder / "mr", mr)
    for path in ct_files + mr_files:
        ds = pydicom.dcmread(path)
        ds.PatientID = patient_id
        ds.save_as(path, enforce_file_format=True)
    return Study(study_uid, ct_files, mr_files, ct.series_uid)


def stored_seg(pacs: OrthancServer, instance: str) -> pydicom.Dataset:
    """The SEG instance `instance` as the PACS stored it."""
    return pydicom.dcmread(BytesIO(pacs.seg_file(instance)))


def assert_seg_of(seg: pydicom.Dataset, study: Study) -> None:
    """The SEG belongs to the study, references its CT series and holds both classes."""
    assert seg.SOPClassUID == SEG_STORAGE
    assert seg.StudyInstanceUID == study.study_uid
    assert seg.SeriesDate == seg.ContentDate  # listed under its date in PACS browsers
    (ref,) = seg.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == study.ct_series_uid  # labels on the CT (modality a) grid
    assert {s.SegmentLabel for s in seg.SegmentSequence} == {"bright_a", "bright_b"}


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Node:
    """`cmc listen` in a subprocess on free loopback ports."""

    def __init__(self, model: Path, spool: Path, *extra: str, ae_title: str = "CMC",
                 http: bool = False, study_timeout: float = 1.0) -> None:
        self.model, self.spool, self.extra, self.ae_title = model, spool, extra, ae_title
        self.port, http_port = free_ports(2)
        self.http_port = http_port if http else None
        self.study_timeout = study_timeout
        self.log = spool.parent / f"{spool.name}-node.log"
        self.process: subprocess.Popen[bytes] | None = None

    def args(self) -> list[str]:
        args = [sys.executable, "-m", "cmc_cli.main", "listen", "--model", str(self.model),
                "--port", str(self.port), "--spool", str(self.spool), "--ae-title",
                self.ae_title, "--study-timeout", str(self.study_timeout),
                "--runtime", "onnxruntime", "--retry-delay", "0.5", *self.extra]
        if self.http_port:
            args += ["--http-port", str(self.http_port)]
        return args

    def start(self) -> Node:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.log = self.log.with_name(f"{self.spool.name}-node-{self.port}.log")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.args(), stdout=log, stderr=log, cwd=REPO,
                                            env=env)
        wait_until(lambda: self.process.poll() is not None or "listening on" in self.output(),
                   NODE_START_TIMEOUT, "cmc listen to start")
        assert self.process.poll() is None, self.output()
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)

    def health(self) -> dict[str, Any]:
        """GET /health (the node was started with http=True)."""
        return dict(json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{self.http_port}/health", timeout=10).read()))

    def page(self) -> str:
        """GET / : the status page's HTML."""
        return str(urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/",
                                          timeout=30).read().decode())

    def press(self, action: str, study: str) -> int:
        """Press a status page button: POST the form (with the page's token) like a browser;
        returns the HTTP status after redirects."""
        token = re.search(r'name="token" value="([^"]+)"', self.page())
        assert token, "no action form on the status page"
        body = urllib.parse.urlencode({"token": token[1], "study": study}).encode()
        with urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{self.http_port}/{action}", data=body), timeout=30) as r:
            return int(r.status)

    def state(self, study_uid: str) -> dict[str, Any] | None:
        path = self.spool / "studies" / study_uid / "study.json"
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return None

    def wait_state(self, study_uid: str, states: Sequence[str], timeout: float = 60.0
                   ) -> dict[str, Any]:
        return dict(wait_until(lambda: (s := self.state(study_uid)) and s["state"] in states
                               and s, timeout, f"study state in {states}\n{self.output()}"))


def send(files: Sequence[Path | pydicom.Dataset], port: int, calling_ae: str = "SENDER",
         called_ae: str = "CMC", contexts: Sequence[str] | None = None,
         syntaxes: Sequence[str] = ("1.2.840.10008.1.2.1",)) -> list[int]:
    """C-STORE `files` to the node (pynetdicom SCU) offering only `syntaxes` (default
    Explicit VR Little Endian; a dataset is sent in the syntax it is stored in, so offer
    that one for compressed files); returns each status (-1: no response).

    Raises AssertionError when the association is not established.
    """
    from pynetdicom import AE

    datasets = [f if isinstance(f, pydicom.Dataset) else pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling_ae)
    for name in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, name, 20)
    for uid in contexts or sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(uid, list(syntaxes))
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established, f"association {'rejected' if assoc.is_rejected else 'failed'}"
    try:
        return [int(getattr(assoc.send_c_store(ds), "Status", -1)) for ds in datasets]
    finally:
        assoc.release()


def association_rejected(port: int, calling_ae: str, called_ae: str = "CMC") -> bool:
    """True when the node rejects an association (C-ECHO) from `calling_ae`."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    for name in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, name, 20)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if assoc.is_established:
        status = assoc.send_c_echo()
        assoc.release()
        assert int(status.Status) == 0
        return False
    return bool(assoc.is_rejected)
