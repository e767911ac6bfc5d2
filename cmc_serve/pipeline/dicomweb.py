"""`cmc segment --from-dicomweb URL --study UID ... [--stow URL]`: WADO-RS in, STOW-RS out.

The studies are retrieved with WADO-RS (dicomweb-client) into a temporary folder that is
removed afterwards, and that folder goes through `api.segment` like any folder of studies:
same case ids (PatientID + a hash of the StudyInstanceUID), pairing, checks, outputs,
report.json and failures.csv. Batch options keep their meaning:
- `--shard I/N` takes every N-th of the sorted study UIDs *before* retrieval, so N machines
  given the same list each download and segment only their share;
- `--continue` asks QIDO-RS for each study's PatientID, and studies whose case is already
  done in OUT are neither retrieved nor segmented again.
`--stow URL` (also for folder input) stores the DICOM results (SEG, RTSTRUCT, SR) of every
case finished in this run with STOW-RS; a refused or failed store is reported per case and
makes the run exit 1.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmc_common.progress import Say
from cmc_serve.node.delivery import NETWORK_TIMEOUT, DeliveryError, case_results, parse_stow
from cmc_serve.node.spool import valid_uid
from cmc_serve.pipeline import outputs
from cmc_serve.pipeline.api import SegmentError, SegmentOptions, SegmentRunResult, segment
from cmc_serve.pipeline.cases import shard_of, study_case_id

if TYPE_CHECKING:
    from rich.console import Console

DICOM_MEDIA_TYPE = "application/dicom"


@dataclass(frozen=True)
class StowResult:
    """What `--stow` did: case ids stored, and (case id, one-line error) for the others."""

    stored: tuple[str, ...]
    failed: tuple[tuple[str, str], ...]


def _client(url: str) -> Any:
    from dicomweb_client.api import DICOMwebClient

    if not url.startswith(("http://", "https://")):
        raise SegmentError(f"--from-dicomweb {url!r}: expected the DICOMweb root URL, e.g. "
                           "http://pacs:8042/dicom-web")
    return DICOMwebClient(url.rstrip("/"), timeout=NETWORK_TIMEOUT)


def _http_error(url: str, action: str, exc: Exception) -> SegmentError:
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        hint = " (no such study there)" if code == 404 else ""
        return SegmentError(f"{url}: {action}: HTTP {code}{hint}")
    return SegmentError(f"{url}: {action}: {type(exc).__name__} (DICOMweb service down or "
                        "unreachable)")


def _patient_id(client: Any, url: str, study_uid: str) -> str:
    import requests

    try:
        found = client.search_for_studies(search_filters={"StudyInstanceUID": study_uid})
    except requests.RequestException as exc:
        raise _http_error(url, f"QIDO-RS search for study {study_uid}", exc) from exc
    if not found:
        raise SegmentError(f"{url}: study {study_uid} not found (QIDO-RS)")
    return str(found[0].get("00100020", {}).get("Value", [""])[0])


def retrieve_study(client: Any, url: str, study_uid: str, folder: Path) -> int:
    """Write every instance of the study (WADO-RS) to `folder`; returns how many.

    Asked for as stored (`transfer-syntax=*`), like the node keeps what it is sent: without
    it a server transcodes to Explicit VR Little Endian, which Orthanc cannot do for JPEG
    2000 (HTTP 500); the pipeline decodes every syntax `decoders.decodable_syntaxes()`
    lists and names any other in one line."""
    import requests

    try:
        datasets = client.retrieve_study(study_uid, media_types=((DICOM_MEDIA_TYPE, "*"),))
    except requests.RequestException as exc:
        raise _http_error(url, f"WADO-RS retrieve of study {study_uid}", exc) from exc
    if not datasets:
        raise SegmentError(f"{url}: study {study_uid} has no instances")
    folder.mkdir(parents=True, exist_ok=True)
    for k, ds in enumerate(datasets):
        uid = str(getattr(ds, "SOPInstanceUID", ""))
        name = f"{uid}.dcm" if valid_uid(uid) else f"instance{k:05d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
    return len(datasets)


def select_studies(url: str, study_uids: Sequence[str], out: Path,
                   options: SegmentOptions) -> tuple[list[str], list[str]]:
    """(studies to retrieve, studies skipped as done) after --shard and --continue."""
    bad = [u for u in study_uids if not valid_uid(u)]
    if bad:
        raise SegmentError(f"--study {bad[0]!r}: not a DICOM UID (digits and dots)")
    uids = sorted(set(study_uids))
    if options.share:  # the folders' rule, on study UIDs
        uids = shard_of(uids, *options.share)
    if not options.resume:
        return uids, []
    client = _client(url)
    done = [u for u in uids if outputs.is_done(out, study_case_id(_patient_id(client, url, u), u))]
    return [u for u in uids if u not in done], done


def segment_from_dicomweb(url: str, study_uids: Sequence[str], out: Path | str,
                          model: Path | str, options: SegmentOptions | None = None,
                          console: Console | None = None) -> SegmentRunResult:
    """Retrieve the studies with WADO-RS and segment them into OUT (module docstring).

    Raises SegmentError (one line) for an unreachable service or an unknown study, before
    anything is written to OUT.
    """
    out, options = Path(out), options or SegmentOptions()
    if not study_uids:
        raise SegmentError("--from-dicomweb needs at least one --study UID")
    todo, done = select_studies(url, study_uids, out, options)
    say: Say = (lambda text: console.print(text, highlight=False, markup=False)
                ) if console is not None else (lambda text: None)
    if done:
        say(f"--continue: {len(done)} finished stud{'y' if len(done) == 1 else 'ies'} not "
            "retrieved")
    if not todo:  # as for a folder whose cases are all done: nothing run, all skipped
        return SegmentRunResult(out=out, report=out / outputs.REPORT, failures=None, done=0,
                                failed=0, skipped=len(done), cases=())
    client = _client(url)
    with tempfile.TemporaryDirectory(prefix="cmc-dicomweb-") as tmp:
        for uid in todo:
            n = retrieve_study(client, url, uid, Path(tmp) / uid)
            say(f"retrieved study {uid}: {n} instance(s)")
        return segment(Path(tmp), out, model, options=replace(options, shard=None),
                       console=console)


def stow_results(result: SegmentRunResult, url: str) -> StowResult:
    """STOW-RS the DICOM results of every case done in this run, SEG first (skipped cases
    were stored by the run that made them); a case counts as stored when all of them are."""
    try:
        destination = parse_stow(url)
    except ValueError as exc:
        raise SegmentError(str(exc)) from None
    stored, failed = [], []
    for record in result.cases:
        results = case_results(outputs.case_dir(result.out, record.case_id))
        if record.status != "done" or not results:
            continue
        try:
            for path, _ in results:
                destination.send(path)
            stored.append(record.case_id)
        except DeliveryError as exc:
            failed.append((record.case_id, str(exc)))
    return StowResult(tuple(stored), tuple(failed))
