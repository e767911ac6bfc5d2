"""Sending a study's DICOM results back: C-STORE (`--send-to AET@HOST:PORT`) and STOW-RS (`--stow URL`).

The results are every DICOM file `cmc segment` wrote in the case folder (`result_files`:
the SEG first, then RTSTRUCT, then SR, which references the SEG), each sent with its own SOP
class and its written transfer syntax.

Rules, from what goes wrong in deployments:
- C-STORE uses the node's own AE title as calling AE: that is the title the PACS was told
  about (Orthanc: `DicomModalities`). A PACS that does not know it rejects the association,
  or (Orthanc 1.10) accepts it and aborts at the C-STORE; either way the error says so and
  what to configure, instead of a bare "association rejected" or "no response".
- A result is only ever sent with the SOP Instance UID it was written with (it is kept in
  the spool), and the ledger (`study_record.Delivery`) records every UID a destination
  acknowledged, persisted right after the acknowledgement: a resumed or retried delivery
  skips those, so a destination never gets a SEG twice. (If the node dies between the
  acknowledgement and the ledger write, the same instance is sent again with the same UID,
  which a PACS stores as the same object, not a second SEG.)
- A failed send is retried with exponential backoff (`RetryPolicy`); the study waits in
  `delivering` meanwhile without holding up other studies, and after the last attempt it is
  `failed` with the destination's last error; it stays re-deliverable (`spool.requeue_delivery`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cmc_common.errors import CmcError
from cmc_common.progress import Say
from cmc_serve.node.study_record import Delivery

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
NETWORK_TIMEOUT = 30.0  # seconds for connects, DIMSE responses and HTTP requests

_SEND_TO = re.compile(r"^(?P<aet>[^@\s\\]{1,16})@(?P<host>[^:\s]+):(?P<port>\d{1,5})$")


class DeliveryError(CmcError):
    """One failed send; str() is the one-line reason (destination and what to do)."""


class Destination(Protocol):
    @property
    def name(self) -> str:
        """The destination as the user gave it (the ledger's key)."""

    def send(self, path: Path) -> None:
        """Send one result file; raise DeliveryError when the destination did not store it."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: first_delay, 2x, 4x ... capped at max_delay; `attempts` in all."""

    attempts: int = 10
    first_delay: float = 5.0
    max_delay: float = 300.0

    def delay(self, failures: int) -> float:
        return min(self.max_delay, self.first_delay * 2 ** max(0, failures - 1))


@dataclass(frozen=True)
class CStoreDestination:
    """A DICOM Storage SCP (a PACS) reached by C-STORE."""

    ae_title: str
    host: str
    port: int
    calling_ae: str

    @property
    def name(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    def send(self, path: Path) -> None:
        import pydicom
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE

        ds = pydicom.dcmread(path)
        written = str(ds.file_meta.TransferSyntaxUID)
        ae = AE(ae_title=self.calling_ae)
        ae.add_requested_context(str(ds.SOPClassUID), list(dict.fromkeys(
            [written, ExplicitVRLittleEndian, ImplicitVRLittleEndian])))
        for name in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(ae, name, NETWORK_TIMEOUT)
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            if assoc.is_rejected:
                raise DeliveryError(
                    f"C-STORE to {self.name}: association rejected; the destination must know "
                    f"calling AE title {self.calling_ae} at this host (in Orthanc: an entry in "
                    f"DicomModalities)")
            raise DeliveryError(f"C-STORE to {self.name}: no association (destination down, "
                                "unreachable or aborted)")
        try:
            status = assoc.send_c_store(ds)
        except (ValueError, RuntimeError) as exc:
            raise DeliveryError(f"C-STORE to {self.name}: {exc}") from exc
        finally:
            assoc.release()
        code = getattr(status, "Status", None)
        if code is None and assoc.is_aborted:
            raise DeliveryError(
                f"C-STORE to {self.name}: the destination aborted the association instead of "
                f"storing; a PACS does this when it does not know calling AE title "
                f"{self.calling_ae} at this host (in Orthanc: add it to DicomModalities)")
        if code is None:
            raise DeliveryError(f"C-STORE to {self.name}: no response within "
                                f"{NETWORK_TIMEOUT:g} s")
        if code not in (0x0000, 0xB000, 0xB007, 0xB006):  # success and warnings: stored
            raise DeliveryError(f"C-STORE to {self.name}: refused with status 0x{code:04X}")


@dataclass(frozen=True)
class StowDestination:
    """A DICOMweb service (`URL` is its root, e.g. http://pacs:8042/dicom-web) via STOW-RS."""

    url: str

    @property
    def name(self) -> str:
        return self.url

    def send(self, path: Path) -> None:
        import pydicom
        import requests
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(self.url.rstrip("/"), timeout=NETWORK_TIMEOUT)
        try:
            response = client.store_instances([pydicom.dcmread(path)])
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            raise DeliveryError(f"STOW-RS to {self.url}: HTTP {code}") from exc
        except requests.RequestException as exc:
            raise DeliveryError(f"STOW-RS to {self.url}: {type(exc).__name__} "
                                "(service down or unreachable)") from exc
        failed = getattr(response, "FailedSOPSequence", None) if response is not None else None
        if failed:
            reason = failed[0].get("FailureReason", "?")
            raise DeliveryError(f"STOW-RS to {self.url}: the service refused {path.name} "
                                f"(FailureReason {reason})")


def parse_send_to(text: str, calling_ae: str, flag: str = "--send-to") -> CStoreDestination:
    m = _SEND_TO.match(text.strip())
    if not m or not 1 <= int(m["port"]) <= 65535:
        raise ValueError(f"{flag} {text!r}: expected AET@HOST:PORT, e.g. ORTHANC@pacs:4242")
    return CStoreDestination(m["aet"], m["host"], int(m["port"]), calling_ae)


def parse_stow(text: str, flag: str = "--stow") -> StowDestination:
    if not re.match(r"^https?://[^\s/]+", text.strip()):
        raise ValueError(f"{flag} {text!r}: expected the DICOMweb root URL, e.g. "
                         "http://pacs:8042/dicom-web")
    return StowDestination(text.strip())


def result_order(sop_class: str) -> int:
    """Where a result goes in the sending order: SEG, RTSTRUCT, others, SR (which
    references the others, so a PACS has them when it reads the report)."""
    if sop_class == SEGMENTATION_STORAGE:
        return 0
    if sop_class == RTSTRUCT_STORAGE:
        return 1
    return 3 if sop_class.startswith(SR_PREFIX) else 2


def case_results(case: Path) -> list[tuple[Path, str]]:
    """Every DICOM file a case folder holds (SEG, RTSTRUCT, SR...), in sending order, with
    its SOP Instance UID."""
    import pydicom

    found = []
    for path in sorted(case.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found.append((result_order(str(ds.SOPClassUID)), path, str(ds.SOPInstanceUID)))
    return [(path, uid) for _, path, uid in sorted(found)]


def parse_destination(text: str, calling_ae: str) -> Destination:
    """`--flagged-to`: a DICOMweb root URL or AET@HOST:PORT."""
    if re.match(r"^https?://", text.strip()):
        return parse_stow(text, "--flagged-to")
    return parse_send_to(text, calling_ae, "--flagged-to")


def deliver(ledger: dict[str, Delivery], results: Sequence[tuple[Path, str]],
            destinations: Sequence[Destination], policy: RetryPolicy,
            save: Callable[[], None], say: Say) -> None:
    """One delivery pass: every due destination gets the results (path, SOP Instance UID)
    it has not acknowledged; the ledger is updated and `save`d after every acknowledgement and
    every failure. Destinations waiting for their next try are left alone."""
    now = time.time()
    for dest in destinations:
        entry = ledger.setdefault(dest.name, Delivery())
        if entry.status != "pending" or entry.next_try > now:
            continue
        try:
            for path, uid in results:
                if uid in entry.delivered:
                    continue
                dest.send(path)
                entry.delivered.append(uid)
                save()
                say(f"delivered {path.name} {uid} to {dest.name}")
        except DeliveryError as exc:
            entry.attempts += 1
            entry.last_error = str(exc)
            if entry.attempts >= policy.attempts:
                entry.status = "failed"
                say(f"giving up on {dest.name} after {entry.attempts} attempts: {exc}")
            else:
                entry.next_try = time.time() + policy.delay(entry.attempts)
                say(f"{exc}; attempt {entry.attempts} of {policy.attempts}, next in "
                    f"{policy.delay(entry.attempts):.0f} s")
            save()
            continue
        entry.status, entry.attempts, entry.last_error = "done", 0, None
        save()
