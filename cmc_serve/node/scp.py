"""The node's DICOM side: a pynetdicom Storage SCP that writes what it accepts to the spool.

What is accepted, and what a sender hears otherwise:
- associations: the called AE title must be ours (`--ae-title`); the calling AE title must
  be on `allow` when one is given (rejected with "calling AE title not recognised" otherwise).
  On a non-loopback interface an allow-list is required (`check_listen_address`);
- C-ECHO: always;
- C-STORE: CT and MR Image Storage in an uncompressed transfer syntax (what the pipeline
  reads; a PACS converts when it sends). Every other storage SOP class is accepted at
  negotiation, so that a PACS that sends a whole study in one association gets a clear
  per-instance status, and refused with 0x0122 "SOP Class not supported" (also what keeps
  the node's own SEGs from looping back);
- an instance that cannot be decoded (truncated, corrupt pixel data) gets 0xC000 "cannot
  understand", one without the UIDs or image attributes 0xA900 "does not match SOP class",
  a spool that cannot be written 0xA700 "out of resources". A refused instance is never
  written and never affects the rest of its study.
"Success" (0x0000) is sent only after the instance is fsync'd in the spool.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

from cmc_common.errors import CmcError
from cmc_serve.node.spool import Spool, valid_uid

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ACCEPTED_SOP_CLASSES = {CT_IMAGE_STORAGE: "CT Image Storage", MR_IMAGE_STORAGE: "MR Image Storage"}

SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

# DIMSE/ACSE/network timeouts (s): a silent peer must not hold an association thread forever.
TIMEOUTS = {"acse_timeout": 30.0, "dimse_timeout": 60.0, "network_timeout": 120.0}


class ListenError(CmcError, ValueError):
    """The node cannot listen as asked (address, port, allow-list)."""


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_listen_address(host: str, allow: Sequence[str]) -> None:
    """A node reachable from the network must say which calling AE titles it serves."""
    if not is_loopback(host) and not allow:
        raise ListenError(f"--host {host} listens beyond this machine: give --allow AET[,AET...] "
                          "with the calling AE titles of the PACS that may send studies")


def check_instance(ds: Any) -> tuple[int, str] | None:
    """(status, reason) when the received dataset must be refused, None when it is usable."""
    sop_class = str(getattr(ds, "SOPClassUID", ""))
    if sop_class not in ACCEPTED_SOP_CLASSES:
        return SOP_CLASS_NOT_SUPPORTED, (f"SOP class {sop_class or 'missing'} is not CT or MR "
                                         "Image Storage")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not valid_uid(str(ds.get(keyword, ""))):
            return DOES_NOT_MATCH_SOP_CLASS, f"{keyword} missing or not a valid UID"
    for keyword in ("Rows", "Columns", "BitsAllocated", "PixelData"):
        if keyword not in ds:
            return DOES_NOT_MATCH_SOP_CLASS, f"{keyword} missing"
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # truncated or corrupt pixel data: pydicom raises many types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return CANNOT_UNDERSTAND, f"pixel data cannot be decoded ({first})"
    if pixels.shape[-2:] != (int(ds.Rows), int(ds.Columns)):
        return CANNOT_UNDERSTAND, (f"pixel data {pixels.shape} does not match Rows x Columns "
                                   f"{int(ds.Rows)} x {int(ds.Columns)}")
    return None


class StorageSCP:
    """The SCP bound to `host:port`; `start()` serves in background threads, `stop()` ends."""

    def __init__(self, spool: Spool, ae_title: str, host: str, port: int,
                 allow: Sequence[str] = (), on_event: Any = None) -> None:
        check_listen_address(host, allow)
        self.spool, self.ae_title, self.host, self.port = spool, ae_title, host, port
        self.allow = tuple(allow)
        self.on_event = on_event or (lambda text: None)
        self.received = 0
        self.refused = 0
        self._server: Any = None

    def _make_ae(self) -> Any:
        from pydicom.uid import (
            ExplicitVRBigEndian,
            ExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
        )
        from pynetdicom import AE, AllStoragePresentationContexts, build_context
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.ae_title)
        syntaxes: list[str] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                               ExplicitVRBigEndian]
        ae.supported_contexts = [build_context(Verification)] + [
            build_context(str(c.abstract_syntax), list(syntaxes))
            for c in AllStoragePresentationContexts]
        ae.require_called_aet = True
        if self.allow:
            ae.require_calling_aet = list(self.allow)
        for name, value in TIMEOUTS.items():
            setattr(ae, name, value)
        return ae

    def _on_store(self, event: Any) -> int:
        calling = event.assoc.requestor.ae_title
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            refusal = check_instance(ds)
        except Exception as exc:  # a dataset that does not even parse
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            refusal, ds = (CANNOT_UNDERSTAND, f"dataset cannot be decoded ({first})"), None
        study_uid = str(ds.get("StudyInstanceUID", "")) if ds is not None else ""
        sop_uid = str(ds.get("SOPInstanceUID", "")) if ds is not None else ""
        if refusal is not None:
            status, reason = refusal
            self.refused += 1
            self.on_event(f"refused instance {sop_uid or '?'} from {calling}: {reason} "
                          f"(status 0x{status:04X})")
            self.spool.record_refusal(study_uid, sop_uid or "?", reason)
            return status
        try:
            self.spool.add_instance(study_uid, sop_uid, str(ds.get("PatientID", "")),
                                    event.encoded_dataset())
        except OSError as exc:
            self.on_event(f"cannot write instance {sop_uid} to the spool: "
                          f"{exc.strerror or exc}")
            return OUT_OF_RESOURCES
        self.received += 1
        return SUCCESS

    def _on_echo(self, event: Any) -> int:
        return SUCCESS

    def _on_rejected(self, event: Any) -> None:
        self.on_event(f"association from {event.assoc.requestor.ae_title} at "
                      f"{event.assoc.requestor.address} rejected (calling or called AE title "
                      "not accepted)")

    def start(self) -> None:
        from pynetdicom import evt

        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_REJECTED, self._on_rejected)]
        try:
            self._server = self._make_ae().start_server((self.host, self.port), block=False,
                                                        evt_handlers=handlers)
        except OSError as exc:
            raise ListenError(f"cannot listen on {self.host}:{self.port} "
                              f"({exc.strerror or exc})") from exc

    @property
    def running(self) -> bool:
        return self._server is not None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
