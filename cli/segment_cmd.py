"""`cmc segment`: NIfTI files or DICOM series in, label maps (and DICOM SEG) out.

This module only parses the command line: the run itself is
`cmc_serve.pipeline.api.segment` (CLI -> library -> files); its counts map to the exit
codes here, its refusals (a `CmcError`) by the rule of cli/errors.py. Heavy imports live
inside `command` so `cmc --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import segment_options as so
from .errors import EXIT_FAILED, say

HELP_OUT = """Output folder. Must be new, empty, or an earlier cmc output folder (it holds
.cmc-output): any other existing folder is refused so a user's files are never mixed with or
overwritten by results. Per case: OUT/<case>/seg.nii.gz, seg.json (class names), seg.dcm,
rtstruct.dcm, sr.dcm (DICOM input, see --output-type), statistics.json, preview.png, and
`done`, written last: a folder without it is
incomplete. OUT/report.json (versions, engine, timings), OUT/report.html (one self-contained
page: previews, class volumes with outliers flagged) and OUT/failures.csv (failed cases);
with --shard each shard keeps its own in OUT/.cmc-shards/ and merges all shards' into these."""


def command(
    input: Annotated[Path | None, typer.Argument(
        help="A NIfTI file, a DICOM series folder, or a folder tree of many studies (batch); "
             "not with --from-dicomweb.")] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help=HELP_OUT)] = ...,  # type: ignore[assignment]
    model: Annotated[Path, typer.Option("--model", "-m", help="Exported model dir (cmc.json).")
                     ] = ...,  # type: ignore[assignment]
    input_b: Annotated[Path | None, typer.Argument(
        help="Modality b of the same case (NIfTI file or DICOM folder); INPUT is then a.")
    ] = None,
    mode: so.Mode = "auto",
    runtime: so.Runtime = "auto",
    server: so.Server = None,
    device: so.Device = "cpu",
    precision: so.Precision = "auto",
    overlap: so.Overlap = 0.5,
    tta: so.Tta = False,
    output_type: so.OutputType = "auto",
    statistics: so.Statistics = False,
    preview: so.Preview = False,
    resume: Annotated[bool, typer.Option("--continue",
                                         help="Skip cases already done in OUT.")] = False,
    shard: so.Shard = None,
    jobs: Annotated[int, typer.Option(min=1, max=16, help="Reader threads (read + pre-process "
                                                          "the next cases during inference).")
                    ] = 1,
    pairing: so.Pairing = None,
    qc: so.Qc = "on",
    assume_registered: Annotated[bool, typer.Option(
        "--assume-registered", help="Combine a and b although their frames of reference "
                                    "differ (or one's orientation was supplied): you assert "
                                    "they are already aligned in world space. Recorded per "
                                    "case in report.json. Different patients are always "
                                    "refused.")] = False,
    assume_orientation: Annotated[str | None, typer.Option(
        "--assume-orientation", help="Axis codes (e.g. LPS, RAS) for NIfTI files whose header "
                                     "states no orientation (qform_code = sform_code = 0), "
                                     "which are refused otherwise. Recorded per case.")
    ] = None,
    skip_unreadable: Annotated[bool, typer.Option(
        "--skip-unreadable", help="Segment a DICOM series without its unreadable files "
                                  "(which fail the series otherwise); a skipped file inside "
                                  "the stack still fails it as a gap. Recorded per case.")
    ] = False,
    from_dicomweb: Annotated[str | None, typer.Option(
        help="Retrieve the --study UIDs from this DICOMweb root URL (WADO-RS) instead of "
             "INPUT.")] = None,
    study: Annotated[list[str] | None, typer.Option(
        help="StudyInstanceUID to retrieve with --from-dicomweb (repeatable).")] = None,
    stow: Annotated[str | None, typer.Option(
        help="Store each new SEG with STOW-RS at this DICOMweb root URL.")] = None,
) -> None:
    """Segment NIfTI files or DICOM series (single case or whole folders) with an exported model."""
    from dataclasses import replace

    from rich.console import Console

    from cmc_common.interrupts import sigterm_as_interrupt
    from cmc_serve.pipeline.api import segment

    console = Console(stderr=True)
    shared = so.segment_options(mode, runtime, server, device, precision, overlap, tta,
                                output_type, statistics, preview, pairing, qc)
    options = replace(shared, resume=resume, shard=shard,
                      jobs=jobs, assume_registered=assume_registered,
                      assume_orientation=assume_orientation,
                      skip_unreadable=skip_unreadable)
    if (input is None) == (from_dicomweb is None):
        raise typer.BadParameter("give INPUT or --from-dicomweb URL (one of them)",
                                 param_hint="INPUT")
    if study and from_dicomweb is None:
        raise typer.BadParameter("--study is only used with --from-dicomweb URL",
                                 param_hint="--study")
    with sigterm_as_interrupt():  # a killed run cleans up as on Ctrl-C: no temporary files
        if from_dicomweb is not None:
            from cmc_serve.pipeline.dicomweb import segment_from_dicomweb

            result = segment_from_dicomweb(from_dicomweb, study or [], out, model, options,
                                           console)
        else:
            assert input is not None  # checked above: INPUT or --from-dicomweb
            result = segment(input, out, model, input_b, options, console)
    say("segment", f"{result.done} done, {result.failed} failed, {result.skipped} skipped; "
        f"report: {result.report}")
    stow_failed = _stow(result, stow) if stow else False
    if result.failures is not None:
        say("segment", f"failed cases are listed in {result.failures}")
        raise typer.Exit(EXIT_FAILED)
    if stow_failed:
        raise typer.Exit(EXIT_FAILED)


def _stow(result: object, url: str) -> bool:
    """`--stow`: store the new SEGs; say each failure; True when any failed."""
    from cmc_serve.pipeline.dicomweb import stow_results

    stowed = stow_results(result, url)  # type: ignore[arg-type]
    say("segment", f"{len(stowed.stored)} SEG(s) stored at {url}")
    for case_id, error in stowed.failed:
        say("segment", f"STOW-RS of {case_id} failed: {error}")
    return bool(stowed.failed)
