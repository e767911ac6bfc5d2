"""`cmc check-data`: the data checks `cmc train` runs before its first step, on their own.

Heavy imports live inside `command` so `cmc --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .errors import fail


def command(
    datalist: Annotated[Path, typer.Argument(help="Datalist JSON (cmc synth / cmc import / "
                                                  "your own).")],
) -> None:
    """Read every image and label of a datalist and check them as `cmc train` does: labels
    have their image's shape and grid and values within the class list, images are finite,
    and the labelled and validation splits hold labelled volumes of both modalities. Lists
    every problem with its file; exit code 2 if there is any."""
    from rich.console import Console
    from rich.table import Table

    from cmc_train.data.checks import check_data
    from cmc_train.data.datalist import SPLITS, Datalist

    err = Console(stderr=True)
    loaded = Datalist.load(datalist)
    report = check_data(loaded, datalist, SPLITS, need_labelled=loaded.modalities,
                        need_validation=loaded.modalities)
    table = Table(title=f"{datalist}: {len(loaded.classes)} classes "
                        f"({', '.join(loaded.classes)})")
    for column in ("split", "modality", "images", "labels", "label volumes with each class"):
        table.add_column(column)
    for (split, modality), (images, labels) in report.volumes.items():
        counts = report.class_counts[(split, modality)]
        present = ", ".join(f"{name} {counts.get(k, 0)}" for k, name in
                            enumerate(loaded.classes) if k) if labels else ""
        table.add_row(split, modality, str(images), str(labels), present)
    Console(width=max(100, Console().width)).print(table)
    for problem in report.problems:
        err.print(f"cmc check-data: {problem}", highlight=False, markup=False, soft_wrap=True)
    if report.problems:
        raise fail("check-data", f"{len(report.problems)} problem(s) found")
    err.print("cmc check-data: no problem found", highlight=False)
