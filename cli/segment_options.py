"""The segmentation options shared by commands that run `cmc segment`'s pipeline.

`cmc listen` takes the same segmentation options as `cmc segment` (same names, help and
defaults); they are declared here once as typer annotations, `segment_options(...)` turns
the parsed values into `SegmentOptions` (a field it refuses is reported against its flag by
cli/errors.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cmc_common.contract import MAX_OVERLAP

if TYPE_CHECKING:
    from cmc_serve.pipeline.api import SegmentOptions

Mode = Annotated[str, typer.Option(help="auto (fused when both modalities are present, else "
                                        "the one present) | fused | a | b.")]
Runtime = Annotated[str, typer.Option(help="auto | openvino | onnxruntime | tensorrt | triton.")]
Server = Annotated[str | None, typer.Option(
    help="Triton URL for --runtime triton, e.g. grpc://127.0.0.1:8001.")]
Device = Annotated[str, typer.Option(help="cpu | cuda.")]
Precision = Annotated[str, typer.Option(
    help="auto | fp32 | fp16 | bf16 | int8. auto: the fastest precision the model has a gated "
         "graph for and this host runs natively (OpenVINO bf16 on CPUs with AMX / AVX512-BF16, "
         "else fp32; int8 where the model has it and a few timed tiles find it faster); the "
         "report says which ran and why.")]
Overlap = Annotated[float, typer.Option(min=0.0, max=MAX_OVERLAP,
                                        help="Sliding-window tile overlap.")]
Tta = Annotated[bool, typer.Option("--tta", help="Mirror test-time augmentation (4x slower).")]
OutputType = Annotated[str, typer.Option(
    "--output-type", help="auto (NIfTI, plus DICOM SEG for DICOM input) | comma list of "
                          "nifti, dicom-seg (seg), rtstruct, sr (TID 1500 measurement report, "
                          "with the SEG). auto,rtstruct,sr adds RTSTRUCT and report to the "
                          "DICOM cases; a DICOM type without auto fails NIfTI cases.")]
Statistics = Annotated[bool, typer.Option(
    "--statistics/--no-statistics", help="statistics.json: volume (ml), mean/median intensity "
                                         "per class and modality.")]
Preview = Annotated[bool, typer.Option(
    "--preview/--no-preview", help="preview.png: three slices with the label overlay.")]
Shard = Annotated[str | None, typer.Option(
    help="I/N: run only the I-th of N shares of the cases (deterministic); the N shards may "
         "run at once into one OUT (see cmc merge-shards). auto: I and N from the Slurm array "
         "task (SLURM_ARRAY_TASK_ID/MIN/MAX/STEP/COUNT) or Kubernetes Indexed Job pod "
         "(JOB_COMPLETION_INDEX, N from CMC_SHARD_COUNT); auto/N also checks N. Never "
         "implied: without --shard every case runs.")]
Pairing = Annotated[Path | None, typer.Option(
    help="YAML rules mapping DICOM series to modalities a/b (Modality, description regex).")]
Qc = Annotated[str, typer.Option(
    help="Quality control: on (a score and flags per case and structure from the fused "
         "pass's two decoders, the input against the training data and the anatomy; a "
         "flagged case is written and marked 'needs review') | full (also the a-only and "
         "b-only passes: the cross-modal opinion, two more network passes) | off (speed "
         "runs: none of it).")]


def segment_options(mode: str, runtime: str, server: str | None, device: str, precision: str,
                    overlap: float, tta: bool, output_type: str, statistics: bool,
                    preview: bool, pairing: Path | None, qc: str = "on") -> SegmentOptions:
    """SegmentOptions from the parsed flags; SegmentOptionError names a bad field."""
    from cmc_serve.pipeline.api import SegmentOptions, parse_output_types

    return SegmentOptions(mode=mode, runtime=runtime, server=server, device=device,
                          precision=precision, overlap=overlap, tta=tta,
                          output_types=parse_output_types(output_type), statistics=statistics,
                          preview=preview, pairing=pairing, qc=qc)
