"""`cmc synth OUT`: write a synthetic two-modality phantom study and its datalist.

Heavy imports live inside `command` so `cmc --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .errors import fail


def command(
    out: Annotated[Path, typer.Argument(help="Output folder (new or empty).")],
    cases: Annotated[int, typer.Option(help="Training cases (labelled + unlabelled).")] = 20,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same study.")] = 0,
    size: Annotated[int, typer.Option(help="CT grid edge in voxels (1.5 mm).")] = 64,
    labelled_ratio: Annotated[float, typer.Option(
        help="Fraction of training cases that are labelled (at least one).")] = 0.1,
    val_cases: Annotated[int, typer.Option(help="Validation cases (labelled).")] = 4,
    test_cases: Annotated[int, typer.Option(help="Test cases (labelled).")] = 4,
    calibration_cases: Annotated[int, typer.Option(
        help="Held-out labelled cases quality control is calibrated on (the demo: 20).")] = 0,
    dicom: Annotated[bool, typer.Option(
        help="Also write DICOM series to OUT/dicom/<case>/<ct|mr>/.")] = False,
    unpaired: Annotated[bool, typer.Option(
        help="Modality b shows a different subject than modality a.")] = False,
    offset_mm: Annotated[float, typer.Option(
        help="Maximum a/b rigid misalignment translation in mm.")] = 10.0,
    rotation_deg: Annotated[float, typer.Option(
        help="Maximum a/b rigid misalignment rotation in degrees.")] = 5.0,
    elastic_mm: Annotated[float, typer.Option(
        help="Amplitude of the mild a/b elastic misalignment in mm.")] = 2.0,
    difficulty: Annotated[str, typer.Option(
        help="easy: the demo phantom; hard: anatomy, lesions, scanner and contrast vary "
             "between subjects so that a few labelled cases do not cover them.")] = "easy",
) -> None:
    """Write OUT/images, OUT/labels (NIfTI, RAS), optional OUT/dicom and OUT/datalist.json."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise fail("synth", f"{out} exists and is not an empty folder; choose a new one")
    from cmc_train.synth import write_synthetic_study

    path = write_synthetic_study(out, cases, seed, size=size, labelled_ratio=labelled_ratio,
                                 val_cases=val_cases, test_cases=test_cases,
                                 calibration_cases=calibration_cases, dicom=dicom,
                                 unpaired=unpaired, offset_mm=offset_mm,
                                 rotation_deg=rotation_deg, elastic_mm=elastic_mm,
                                 difficulty=difficulty)
    from cmc_train.data.datalist import OPTIONAL_SPLITS, SPLITS, Datalist

    datalist = Datalist.load(path)
    counts = ", ".join(f"{len(datalist.split(s))} {s}" for s in SPLITS
                       if datalist.split(s) or s not in OPTIONAL_SPLITS)
    typer.echo(f"wrote {counts} cases to {out}; datalist {path}")
