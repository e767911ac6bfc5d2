"""`cmc segment`: NIfTI files or DICOM series in, label maps (and DICOM SEG) out.

Heavy imports live inside `command` so `cmc --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

HELP_OUT = """Output folder. Must be new, empty, or an earlier cmc output folder (it holds
.cmc-output): any other existing folder is refused so a user's files are never mixed with or
overwritten by results. Per case: OUT/<case>/seg.nii.gz, seg.json (class names), seg.dcm
(DICOM input), statistics.json, preview.png, and `done`, written last: a folder without it is
incomplete. OUT/report.json (versions, engine, timings) and OUT/failures.csv (failed cases)."""

MODES = ("auto", "fused", "a", "b")
RUNTIMES = ("auto", "openvino", "onnxruntime", "tensorrt", "triton")
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "fp16", "bf16")
OUTPUT_TYPES = ("nifti", "dicom-seg")

EXIT_CASE_FAILED = 1
EXIT_USAGE = 2


def _choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}",
                                 param_hint=option)
    return value


def _output_types(text: str) -> tuple[str, ...]:
    """'auto' -> () (NIfTI, plus DICOM SEG for DICOM input); else a validated list."""
    if text.strip() == "auto":
        return ()
    types = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in types if t not in OUTPUT_TYPES]
    if bad or not types:
        raise typer.BadParameter(f"{text!r}: use auto or a comma list of "
                                 f"{', '.join(OUTPUT_TYPES)}", param_hint="--output-type")
    return types


def command(
    input: Annotated[Path, typer.Argument(help="A NIfTI file, a DICOM series folder, or a "
                                               "folder tree of many studies (batch).")],
    out: Annotated[Path, typer.Option("-o", "--out", help=HELP_OUT)],
    model: Annotated[Path, typer.Option("--model", "-m", help="Exported model dir (cmc.json).")],
    input_b: Annotated[Path | None, typer.Argument(
        help="Modality b of the same case (NIfTI file or DICOM folder); INPUT is then a.")
    ] = None,
    mode: Annotated[str, typer.Option(help="auto (fused when both modalities are present, else "
                                           "the one present) | fused | a | b.")] = "auto",
    runtime: Annotated[str, typer.Option(
        help="auto | openvino | onnxruntime | tensorrt | triton.")] = "auto",
    server: Annotated[str | None, typer.Option(
        help="Triton URL for --runtime triton, e.g. grpc://127.0.0.1:8001.")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
    precision: Annotated[str, typer.Option(help="fp32 | fp16 | bf16.")] = "fp32",
    overlap: Annotated[float, typer.Option(min=0.0, max=0.95,
                                           help="Sliding-window tile overlap.")] = 0.5,
    tta: Annotated[bool, typer.Option("--tta", help="Mirror test-time augmentation "
                                                    "(4x slower).")] = False,
    output_type: Annotated[str, typer.Option(
        "--output-type", help="auto (NIfTI, plus DICOM SEG for DICOM input) | comma list of "
                              "nifti,dicom-seg.")] = "auto",
    statistics: Annotated[bool, typer.Option(
        "--statistics", help="statistics.json: volume (ml), mean/median intensity per class "
                             "and modality.")] = False,
    preview: Annotated[bool, typer.Option(
        "--preview", help="preview.png: three slices with the label overlay.")] = False,
    resume: Annotated[bool, typer.Option("--continue",
                                         help="Skip cases already done in OUT.")] = False,
    shard: Annotated[str | None, typer.Option(
        help="I/N: run only the I-th of N shares of the cases (deterministic).")] = None,
    jobs: Annotated[int, typer.Option(min=1, max=16, help="Reader threads (read + pre-process "
                                                          "the next cases during inference).")
                    ] = 1,
    pairing: Annotated[Path | None, typer.Option(
        help="YAML rules mapping DICOM series to modalities a/b (Modality, description "
             "regex).")] = None,
) -> None:
    """Segment NIfTI files or DICOM series (single case or whole folders) with an exported model."""
    from rich.console import Console

    from cmc_serve import __version__
    from cmc_serve.model_dir import ModelDirError, ModelInfo
    from cmc_serve.pipeline import cases as case_mod
    from cmc_serve.pipeline import outputs
    from cmc_serve.pipeline.batch import BatchOptions, BatchRunner
    from cmc_serve.pipeline.engine_factory import make_segmenter
    from cmc_serve.pipeline.pairing import PairingError, PairingRules
    from cmc_serve.pipeline.report import RunReport
    from cmc_serve.runtimes import RuntimeUnavailable

    _choice(mode, MODES, "--mode")
    _choice(runtime, RUNTIMES, "--runtime")
    _choice(device, DEVICES, "--device")
    _choice(precision, PRECISIONS, "--precision")
    types = _output_types(output_type)
    console = Console(stderr=True)

    def fail(message: str) -> typer.Exit:
        console.print(f"cmc segment: error: {message}", highlight=False, markup=False,
                      soft_wrap=True)
        return typer.Exit(EXIT_USAGE)

    try:
        info = ModelInfo.load(model)
        rules = (PairingRules.from_yaml(pairing, info.modalities) if pairing
                 else PairingRules.default(info.modalities))
        if input.is_dir() and out.resolve().is_relative_to(input.resolve()):
            raise outputs.OutputError(f"{out}: the output folder must not be inside the input "
                                      f"folder {input} (results would become inputs)")
        found = case_mod.discover_cases(input, input_b, single_role="b" if mode == "b" else "a")
        if shard:
            index, count = case_mod.parse_shard(shard)
            found = case_mod.select_shard(found, index, count)
        if "dicom-seg" in types and not any(c.is_dicom for c in found):
            raise case_mod.CaseDiscoveryError(f"{input}: --output-type dicom-seg needs DICOM "
                                              "input")
        segmenter = make_segmenter(model, runtime, device, precision, overlap, tta, server)
        outputs.prepare_output_root(out, __version__)  # last: a refused run creates nothing
    except (ModelDirError, case_mod.CaseDiscoveryError, PairingError, RuntimeUnavailable,
            outputs.OutputError) as exc:
        raise fail(str(exc)) from None

    options = BatchOptions(mode=mode, output_types=types, statistics=statistics,
                           preview=preview, resume=resume, jobs=jobs)
    report = RunReport(
        options={"input": str(input), "input_b": str(input_b) if input_b else None,
                 "mode": mode, "runtime": runtime, "server": server, "device": device,
                 "precision": precision, "overlap": overlap, "tta": tta,
                 "output_types": list(types) or "auto", "statistics": statistics,
                 "preview": preview, "continue": resume, "shard": shard, "jobs": jobs,
                 "pairing": str(pairing) if pairing else None},
        model={"dir": str(model.resolve()), "name": info.name, "cmc_version": info.cmc_version,
               "modalities": list(info.modalities), "classes": list(info.classes),
               "checkpoint_sha256": info.checkpoint_sha256})
    console.print(f"cmc segment: {len(found)} case(s) -> {out}", highlight=False, markup=False)
    try:
        with segmenter:
            BatchRunner(out, info, segmenter, rules, options, report, console).run(found)
    except RuntimeUnavailable as exc:
        raise fail(str(exc)) from None
    counts = report.counts()
    console.print(f"cmc segment: {counts['done']} done, {counts['failed']} failed, "
                  f"{counts['skipped']} skipped; report: {out / outputs.REPORT}", highlight=False,
                  markup=False)
    if counts["failed"]:
        console.print(f"cmc segment: failed cases are listed in {out / outputs.FAILURES}",
                      highlight=False, markup=False)
        raise typer.Exit(EXIT_CASE_FAILED)
