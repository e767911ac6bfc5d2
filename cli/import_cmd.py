"""`cmc import amos|mscmr ROOT --out datalist.json`: datalists for public datasets.

Heavy imports live inside `command` so `cmc --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .errors import fail

DATASETS = ("amos", "mscmr")


def command(
    dataset: Annotated[str, typer.Argument(help="amos (AMOS 2022) or mscmr (MS-CMRSeg 2019).")],
    root: Annotated[Path, typer.Argument(help="The dataset's folder, as published.")],
    out: Annotated[Path, typer.Option(help="Datalist JSON to write.")] = Path("datalist.json"),
    labelled_ratio: Annotated[float, typer.Option(
        help="Fraction of training cases kept labelled (per modality group).")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the labelled/validation split.")] = 0,
    val_fraction: Annotated[float, typer.Option(
        help="Share of training cases held out for validation when the dataset has no "
             "official validation split.")] = 0.2,
    modalities: Annotated[str, typer.Option(
        help="mscmr: two of bssfp,lge,t2 (a first). amos is always ct,mr.")] = "bssfp,lge",
) -> None:
    """Write a datalist for DATASET at ROOT (MS-CMRSeg labels are remapped next to it)."""
    if dataset not in DATASETS:
        raise typer.BadParameter(f"{dataset!r} is not one of {', '.join(DATASETS)}",
                                 param_hint="DATASET")
    from cmc_train.data.importers import SplitOptions, import_amos, import_mscmr

    options = SplitOptions(labelled_ratio=labelled_ratio, seed=seed, val_fraction=val_fraction)
    if dataset == "amos":
        datalist = import_amos(root, options)
    else:
        pair = tuple(m.strip().lower() for m in modalities.split(",") if m.strip())
        if len(pair) != 2:
            raise fail("import", f"--modalities needs two names, got {modalities!r}")
        datalist = import_mscmr(root, options, (pair[0], pair[1]), out.parent)
    datalist.save(out)
    counts = ", ".join(f"{len(datalist.split(s))} {s}" for s in
                       ("labelled", "unlabelled", "validation", "test"))
    typer.echo(f"{dataset}: {counts}; modalities {list(datalist.modalities)}, "
               f"{len(datalist.classes)} classes; wrote {out}")
