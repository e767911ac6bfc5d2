"""`cmc export CKPT --out MODEL_DIR`: gated ONNX / OpenVINO / TensorRT graphs and a Triton repository.

Heavy imports (torch, onnx, openvino) live inside `command` so `cmc --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def command(
    ckpt: Annotated[Path, typer.Argument(help="CMC checkpoint (.pt) written by `cmc train`.")],
    out: Annotated[Path, typer.Option("--out", help="Model directory to create (MODEL_DIR).")],
    name: Annotated[str, typer.Option(
        "--name", help="Triton volume model name; patch models are NAME_patch, NAME_patch_a, "
                       "NAME_patch_b.")] = "cmc",
    formats: Annotated[str, typer.Option(
        "--format", help="Comma-separated: onnx, openvino, tensorrt.")] = "onnx,openvino",
    precisions: Annotated[str, typer.Option(
        "--precision", help="auto, or comma-separated fp32, fp16, bf16, int8. auto: fp32 "
                            "(must pass its gate), every half precision this host can "
                            "produce and an int8 OpenVINO graph where calibration data exist, "
                            "each written if it passes its gate, else left out with a line "
                            "and listed under `refused` in cmc.json. Named precisions must "
                            "all pass, or nothing is written. Combinations this host cannot "
                            "run are skipped with a message.")] = "auto",
    calibration: Annotated[Path | None, typer.Option(
        "--calibration", help="Datalist whose training images calibrate the int8 graphs "
                              "(held-out cases gate them). Default: the datalist recorded in "
                              "the checkpoint, when its files are on this host.")] = None,
    modes: Annotated[str, typer.Option(
        "--modes", help="Comma-separated inference modes: fused, a, b.")] = "fused,a,b",
    max_batch: Annotated[int, typer.Option(
        "--max-batch", min=1, help="Largest patch batch of the graphs and Triton models.")] = 8,
    triton_backend: Annotated[str, typer.Option(
        "--triton-backend", help="Backend of the Triton patch models: python (runs ONNX "
                                 "Runtime / OpenVINO inside), onnxruntime, openvino, "
                                 "tensorrt.")] = "python",
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing MODEL_DIR (atomically).")] = False,
    codes: Annotated[Path | None, typer.Option(
        "--codes", help="CSV of SNOMED CT codes per class for the DICOM outputs (columns "
                        "name,category,type,modifier,color; a code is SCHEME:VALUE:MEANING, "
                        "e.g. SCT:64033007:Kidney), over the shipped table; recorded in "
                        "cmc.json.")] = None,
) -> None:
    """Export a checkpoint; every graph must pass its parity gate or nothing is written."""
    from cmc_export.exporter import export

    report = export(ckpt, out, name=name, formats=_split(formats),
                    precisions=_split(precisions), modes=_split(modes), max_batch=max_batch,
                    triton_backend=triton_backend, force=force, log=typer.echo,
                    codes=codes, calibration=calibration)
    typer.echo(f"{report.out_dir / 'cmc.json'}: {len(report.graphs)} graphs; Triton models "
               f"{', '.join(sorted(report.triton_models.values()))} and {name}")
    for refused in report.refused:
        typer.echo(f"refused {refused['mode']}/{refused['runtime']}/{refused['precision']}: "
                   f"{refused['reason']}")
