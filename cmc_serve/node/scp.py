"""The node's DICOM side: a pynetdicom Storage SCP that writes what it accepts to the spool.

What is accepted, and what a sender hears otherwise:
- associations: the called AE title must be ours (`--ae-title`); the calling AE title must
  be on `allow` when one is given (rejected with "calling AE title not recognised" otherwise).
  On a non-loopback interface an allow-list is required (`check_listen_address`);
- C-ECHO: always;
- C-STORE of the images the node segments (`SEGMENTED_SOP_CLASSES`: CT and MR, single- and
  multi-frame): in every transfer syntax this install can decode
  (`cmc_serve.dicom.decoders.decodable_syntaxes`: the uncompressed ones, Deflated, and with
  the serve extra's decoders JPEG Baseline / Lossless (SV1 included), JPEG-LS, JPEG 2000,
  HTJ2K, RLE), uncompressed first in our order of preference so that a sender offering both
  in one context sends uncompressed. The instance is stored byte for byte as received (no
  transcoding: what the sender sent is what `cmc segment` reads). A presentation context
  whose syntaxes cannot be decoded here is rejected at negotiation (a sender that offered
  another syntax for the same SOP class uses that one); when no syntax of a segmented SOP
  class is acceptable, one line names the SOP class and each syntax (name + UID) in the log
  and on the status page (`RefusedSyntax`), since the sender itself usually says only
  "no presentation context";
- C-STORE of every other storage SOP class (the node's own SEG coming back, RTSTRUCT, SR,
  presentation states, key objects, other modalities' images): accepted in any syntax,
  not stored, logged and counted on the study's row ("ignored"), so that a PACS re-sending
  a whole study after the results arrived finishes its job instead of aborting it on the
  first SEG, and nothing it re-sends starts a second segmentation;
- an instance that cannot be decoded (truncated, corrupt pixel data) gets 0xC000 "cannot
  understand", one without the UIDs or image attributes 0xA900 "does not match SOP class",
  a spool that cannot be written 0xA700 "out of resources". A refused instance is never
  written and never affects the rest of its study.
"Success" (0x0000) is sent only after the instance is fsync'd in the spool.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cmc_common.errors import CmcError, one_line
from cmc_common.progress import Say
from cmc_serve.dicom.decoders import decodable_syntaxes, syntax_label, undecodable_reason
from cmc_serve.node.spool import Spool, valid_uid

if TYPE_CHECKING:
    from pynetdicom.transport import ThreadedAssociationServer

SEGMENTED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
}
# what the node asks for first when a sender offers several syntaxes in one context
PREFERRED_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

# DIMSE/ACSE/network timeouts (s): a silent peer must not hold an association thread forever.
TIMEOUTS = {"acse_timeout": 30.0, "dimse_timeout": 60.0, "network_timeout": 120.0}


class ListenError(CmcError, ValueError):
    """The node cannot listen as asked (address, port, allow-list)."""


@dataclass
class RefusedSyntax:
    """A SOP class a sender could not send because every syntax it offered is undecodable
    here; one entry per (calling AE, SOP class, offered syntaxes), counted."""

    calling_ae: str
    sop_class: str
    syntaxes: tuple[str, ...]
    count: int = 0
    last: float = 0.0

    @property
    def message(self) -> str:
        """One line: the SOP class, the sender, and per syntax why it cannot be decoded
        (no decoder exists, or which package would decode it)."""
        why = "; ".join(undecodable_reason(uid) or syntax_label(uid) for uid in self.syntaxes)
        name = SEGMENTED_SOP_CLASSES.get(self.sop_class, self.sop_class)
        return f"refused {name} from {self.calling_ae}: {why}"


def negotiable_syntaxes() -> list[str]:
    """The transfer syntaxes offered for segmented SOP classes, uncompressed first."""
    decodable = decodable_syntaxes()
    rest = sorted(decodable - set(PREFERRED_SYNTAXES))
    return [uid for uid in PREFERRED_SYNTAXES if uid in decodable] + rest


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
    """(status, reason) when a received image the node segments must be refused, None when
    it is usable."""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not valid_uid(str(ds.get(keyword, ""))):
            return DOES_NOT_MATCH_SOP_CLASS, f"{keyword} missing or not a valid UID"
    for keyword in ("Rows", "Columns", "BitsAllocated", "PixelData"):
        if keyword not in ds:
            return DOES_NOT_MATCH_SOP_CLASS, f"{keyword} missing"
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # truncated or corrupt pixel data: pydicom raises many types
        return CANNOT_UNDERSTAND, ("pixel data cannot be decoded "
                                   f"({one_line(exc, first_line=True)})")
    if pixels.shape[-2:] != (int(ds.Rows), int(ds.Columns)):
        return CANNOT_UNDERSTAND, (f"pixel data {pixels.shape} does not match Rows x Columns "
                                   f"{int(ds.Rows)} x {int(ds.Columns)}")
    return None


class StorageSCP:
    """The SCP bound to `host:port`; `start()` serves in background threads, `stop()` ends."""

    def __init__(self, spool: Spool, ae_title: str, host: str, port: int,
                 allow: Sequence[str] = (), say: Say | None = None) -> None:
        check_listen_address(host, allow)
        self.spool, self.ae_title, self.host, self.port = spool, ae_title, host, port
        self.allow = tuple(allow)
        self.say: Say = say or (lambda text: None)
        self.received = 0
        self.refused = 0
        self.ignored = 0
        self._refused_syntaxes: dict[tuple[str, str, tuple[str, ...]], RefusedSyntax] = {}
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None

    def refused_syntaxes(self) -> list[RefusedSyntax]:
        """What senders could not send for want of a decoder, most recent first."""
        with self._lock:
            return sorted(self._refused_syntaxes.values(), key=lambda r: -r.last)

    def _make_ae(self) -> Any:
        from pydicom.uid import AllTransferSyntaxes
        from pynetdicom import AE, AllStoragePresentationContexts, build_context
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.ae_title)
        segmented = negotiable_syntaxes()
        anything = [str(uid) for uid in AllTransferSyntaxes]
        ae.supported_contexts = [build_context(Verification)] + [
            build_context(str(c.abstract_syntax),
                          segmented if c.abstract_syntax in SEGMENTED_SOP_CLASSES else anything)
            for c in AllStoragePresentationContexts]
        ae.require_called_aet = True
        if self.allow:
            ae.require_calling_aet = list(self.allow)
        for name, value in TIMEOUTS.items():
            setattr(ae, name, value)
        return ae

    def _on_store(self, event: Any) -> int:
        calling = event.assoc.requestor.ae_title
        sop_class = str(event.request.AffectedSOPClassUID)
        if sop_class not in SEGMENTED_SOP_CLASSES:
            return self._ignore(event, sop_class, calling)
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            refusal = check_instance(ds)
        except Exception as exc:  # a dataset that does not even parse
            refusal = (CANNOT_UNDERSTAND,
                       f"dataset cannot be decoded ({one_line(exc, first_line=True)})")
            ds = None
        study_uid = str(ds.get("StudyInstanceUID", "")) if ds is not None else ""
        sop_uid = str(ds.get("SOPInstanceUID", "")) if ds is not None else ""
        if refusal is not None:
            status, reason = refusal
            self.refused += 1
            self.say(f"refused instance {sop_uid or '?'} from {calling}: {reason} "
                     f"(status 0x{status:04X})")
            self.spool.record_refusal(study_uid, sop_uid or "?", reason)
            return status
        try:
            self.spool.add_instance(study_uid, sop_uid, str(ds.get("PatientID", "")),
                                    event.encoded_dataset())
        except OSError as exc:
            self.say(f"cannot write instance {sop_uid} to the spool: "
                     f"{exc.strerror or exc}")
            return OUT_OF_RESOURCES
        self.received += 1
        return SUCCESS

    def _ignore(self, event: Any, sop_class: str, calling: str) -> int:
        """An object the node does not segment: stored nowhere, "stored" for the sender."""
        from pydicom.uid import UID

        try:
            study_uid = str(event.dataset.get("StudyInstanceUID", ""))
        except Exception:  # an object we do not keep need not even parse
            study_uid = ""
        name = UID(sop_class).name
        self.ignored += 1
        self.say(f"ignored {name} instance {event.request.AffectedSOPInstanceUID} of "
                 f"study {study_uid or '?'} from {calling} (not segmented)")
        self.spool.record_ignored(study_uid, name)
        return SUCCESS

    def _on_established(self, event: Any) -> None:
        """Name the segmented SOP classes the sender offered only in undecodable syntaxes."""
        assoc = event.assoc
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        offered: dict[str, list[str]] = {}
        for cx in assoc.requestor.primitive.presentation_context_definition_list:
            sop_class = str(cx.abstract_syntax)
            if sop_class in SEGMENTED_SOP_CLASSES and sop_class not in accepted:
                offered.setdefault(sop_class, []).extend(str(ts) for ts in cx.transfer_syntax)
        for sop_class, syntaxes in offered.items():
            key = (assoc.requestor.ae_title, sop_class, tuple(dict.fromkeys(syntaxes)))
            with self._lock:
                entry = self._refused_syntaxes.setdefault(key, RefusedSyntax(*key))
                entry.count += 1
                entry.last = time.time()
            self.say(entry.message)

    def _on_echo(self, event: Any) -> int:
        return SUCCESS

    def _on_rejected(self, event: Any) -> None:
        self.say(f"association from {event.assoc.requestor.ae_title} at "
                 f"{event.assoc.requestor.address} rejected (calling or called AE title "
                 "not accepted)")

    def start(self) -> None:
        from pynetdicom import evt

        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_ESTABLISHED, self._on_established)]
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
