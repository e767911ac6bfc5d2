"""`cmc listen --model MODEL_DIR`: a DICOM node that segments studies as they arrive.

Only parses the command line: the node is `cmc_serve.node.service.listen` (CLI -> library).
Exit codes: 0 after a clean stop (SIGTERM / Ctrl-C: the study in flight is finished first),
2 when the node cannot start (the one-line reason is printed), 130 after a second Ctrl-C.
Heavy imports live inside `command` so `cmc --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import segment_options as so
from .errors import EXIT_INTERRUPTED

HELP_SPOOL = """Folder of the node's state: received instances, each study's state and its
cmc segment outputs (new, empty or an earlier spool). Kill the node at any time and start it
again on the same spool: nothing received is lost, unfinished studies resume, nothing is
delivered twice."""


def _split(values: list[str] | None) -> tuple[str, ...]:
    return tuple(v.strip() for text in values or [] for v in text.split(",") if v.strip())


def command(
    model: Annotated[Path, typer.Option("--model", "-m", help="Exported model dir (cmc.json).")],
    ae_title: Annotated[str, typer.Option(help="The node's AE title (called AE, and calling AE "
                                               "when it sends SEGs).")] = "CMC",
    host: Annotated[str, typer.Option(help="Address the DICOM port listens on.")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="DICOM port.")] = 11112,
    allow: Annotated[list[str] | None, typer.Option(
        help="Calling AE titles accepted (AET[,AET...]); default: any on loopback. Required "
             "when --host is not a loopback address.")] = None,
    spool: Annotated[Path, typer.Option(help=HELP_SPOOL)] = Path("cmc-spool"),
    study_timeout: Annotated[float, typer.Option(
        help="A study is complete when no instance of it arrived for this many seconds.")
    ] = 30.0,
    send_to: Annotated[list[str] | None, typer.Option(
        help="C-STORE the SEG to AET@HOST:PORT (repeatable); the destination must know "
             "--ae-title at this host.")] = None,
    stow: Annotated[list[str] | None, typer.Option(
        help="STOW-RS the SEG to this DICOMweb root URL, e.g. http://pacs:8042/dicom-web "
             "(repeatable).")] = None,
    http_port: Annotated[int | None, typer.Option(
        min=1, max=65535, help="Serve the status page (/) and /health (JSON) on this port.")
    ] = None,
    http_host: Annotated[str, typer.Option(
        help="Address of the status page; it shows patient IDs, so it stays on loopback "
             "unless you expose it (behind your authenticating proxy).")] = "127.0.0.1",
    retries: Annotated[int, typer.Option(min=1, help="Delivery attempts per destination before "
                                                     "the study is failed.")] = 10,
    retry_delay: Annotated[float, typer.Option(
        min=0.0, help="Seconds before the first retry; doubles each time, at most 300.")] = 5.0,
    flagged_to: Annotated[list[str] | None, typer.Option(
        help="Send the results of a case quality control flagged to AET@HOST:PORT or a "
             "DICOMweb URL (a review worklist) instead of --send-to/--stow (repeatable).")
    ] = None,
    hold_flagged: Annotated[bool, typer.Option(
        "--hold-flagged", help="Keep flagged results in the spool until a person releases "
                               "them on the status page (or with --release).")] = False,
    redeliver: Annotated[list[str] | None, typer.Option(
        help="At start: deliver again the results of this study (Study Instance UID) to the "
             "destinations given now, skipping those that acknowledged them; 'all': every "
             "failed delivery (failed ones also resume by themselves at every start).")
    ] = None,
    release: Annotated[list[str] | None, typer.Option(
        help="At start: release this held study (UID, or 'all') to --send-to/--stow.")
    ] = None,
    mode: so.Mode = "auto",
    runtime: so.Runtime = "auto",
    server: so.Server = None,
    device: so.Device = "cpu",
    precision: so.Precision = "auto",
    overlap: so.Overlap = 0.5,
    tta: so.Tta = False,
    output_type: so.OutputType = "auto",
    statistics: so.Statistics = True,
    preview: so.Preview = True,
    pairing: so.Pairing = None,
    qc: so.Qc = "on",
) -> None:
    """Receive studies by DICOM C-STORE, segment each complete study, send the SEG back."""
    import logging

    from cmc_serve.node.delivery import RetryPolicy
    from cmc_serve.node.service import ListenOptions, listen

    # the node reports every refusal and failed send in its own one-line messages
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    seg = so.segment_options(mode, runtime, server, device, precision, overlap, tta,
                             output_type, statistics, preview, pairing, qc)
    options = ListenOptions(
        ae_title=ae_title, host=host, port=port, allow=_split(allow), spool=spool,
        study_timeout=study_timeout, send_to=_split(send_to), stow=tuple(stow or ()),
        http_port=http_port, http_host=http_host,
        retry=RetryPolicy(attempts=retries, first_delay=retry_delay),
        flagged_to=_split(flagged_to), hold_flagged=hold_flagged,
        redeliver=_split(redeliver), release=_split(release))
    try:
        listen(model, options, seg)
    except KeyboardInterrupt:  # a second Ctrl-C: stop without finishing the study in flight
        typer.echo("cmc listen: interrupted; unfinished studies resume at the next start",
                   err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
