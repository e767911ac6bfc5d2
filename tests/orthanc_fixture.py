"""A real Orthanc (the distribution's `orthanc` + `orthanc-dicomweb` packages) for the tests.

Each `OrthancServer` gets its own generated configuration, storage folder and free loopback
ports (never Orthanc's default 4242/8042, so a running Orthanc is left alone), and is
terminated (then killed) on teardown. It is configured like a cautious hospital PACS:
C-STORE only from known modalities at their registered host (`DicomAlwaysAllowStore`
false, `DicomCheckModalityHost` true), which is what makes a node with the wrong AE title
fail the way it fails in production. Every wait is bounded.

Orthanc 1.10 has no option to bind its sockets to one address; `RemoteAccessAllowed: false`
makes its HTTP server refuse other hosts, unknown modalities cannot store, and the tests
only ever connect to 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cmc_serve.triton.server import free_ports

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_TIMEOUT = 30.0
HTTP_TIMEOUT = 30.0


def require_orthanc() -> None:
    if not Path(ORTHANC).is_file() or not DICOMWEB_PLUGIN.is_file():
        pytest.skip("Orthanc and its DICOMweb plugin are not installed (make system-deps "
                    "installs the orthanc and orthanc-dicomweb packages)")


class OrthancServer:
    """One Orthanc process; `modalities` maps a name to (AET, host, port)."""

    def __init__(self, root: Path, aet: str = "ORTHANC",
                 modalities: dict[str, tuple[str, str, int]] | None = None,
                 lua_scripts: tuple[Path, ...] = ()) -> None:
        self.root = root
        self.aet = aet
        self.lua_scripts = lua_scripts
        self.http_port, self.dicom_port = free_ports(2)
        self.modalities = dict(modalities or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.log = root / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def send_to(self) -> str:
        """The node's --send-to value for this Orthanc."""
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    def config(self) -> dict[str, Any]:
        storage = self.root / "storage"
        return {
            "Name": "cmc-test", "StorageDirectory": str(storage),
            "IndexDirectory": str(storage), "HttpPort": self.http_port,
            "DicomPort": self.dicom_port, "DicomAet": self.aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "DicomAlwaysAllowStore": False, "DicomCheckModalityHost": True,
            "DicomScuTimeout": 10, "HttpTimeout": 20, "SaveJobs": False,
            "DicomAssociationCloseDelay": 0, "StableAge": 1, "ConcurrentJobs": 1,
            "LuaScripts": [str(p) for p in self.lua_scripts],
        }

    def start(self) -> OrthancServer:
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=1))
        log = self.log.open("ab")
        self.process = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=log,
                                        cwd=self.root)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        tail = self.log.read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"Orthanc did not start on port {self.http_port}: {tail}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self.process = None

    # ------------------------------------------------------------------ REST
    def _request(self, method: str, path: str, body: bytes | None = None,
                 kind: str = "application/json") -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": kind} if body else {})
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as r:
            return bytes(r.read())

    def get(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def get_bytes(self, path: str) -> bytes:
        return self._request("GET", path)

    def post(self, path: str, data: Any) -> Any:
        body = data if isinstance(data, bytes) else json.dumps(data).encode()
        kind = "application/dicom" if isinstance(data, bytes) else "application/json"
        return json.loads(self._request("POST", path, body, kind) or b"null")

    def put(self, path: str, data: Any) -> Any:
        return self._request("PUT", path, json.dumps(data).encode())

    def upload(self, files: list[Path]) -> str:
        """POST every file to /instances; returns the Orthanc id of their (one) study."""
        studies = {self.post("/instances", f.read_bytes())["ParentStudy"] for f in files}
        assert len(studies) == 1, studies
        return studies.pop()

    def add_modality(self, name: str, aet: str, port: int, host: str = "127.0.0.1") -> None:
        self.put(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def seg_instances(self, study_uid: str | None = None) -> list[str]:
        """Orthanc ids of every SEG instance stored (of one study when given)."""
        series = self.post("/tools/find", {"Level": "Series", "Query": {"Modality": "SEG"}})
        found = []
        for s in series:
            info = self.get(f"/series/{s}")
            study = self.get(f"/studies/{info['ParentStudy']}")["MainDicomTags"]
            if study_uid is None or study["StudyInstanceUID"] == study_uid:
                found += info["Instances"]
        return found

    def seg_file(self, instance: str) -> bytes:
        return self.get_bytes(f"/instances/{instance}/file")

    def wait_for_seg(self, study_uid: str, timeout: float = 60.0) -> list[str]:
        """The SEG instances of a study once at least one arrived (bounded wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            segs = self.seg_instances(study_uid)
            if segs:
                return segs
            time.sleep(0.25)
        raise AssertionError(f"no SEG of {study_uid} arrived in Orthanc within {timeout:.0f} s")


def orthanc_server(root: Path, **kwargs: Any) -> Iterator[OrthancServer]:
    """Start an OrthancServer for a fixture and tear it down afterwards."""
    require_orthanc()
    server = OrthancServer(root, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()
