"""`cmc evaluate`: Dice and HD95 per class and modality of a checkpoint on a datalist split.

Heavy imports live inside `command` so `cmc --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cmc_cli.errors import fail
from cmc_common.contract import MODES

SPLITS = ("labelled", "validation", "test")


def command(
    checkpoint: Annotated[Path, typer.Argument(help="A CMC checkpoint (checkpoint_best.pt).")],
    data: Annotated[Path, typer.Option("--data", help="Datalist JSON.")],
    out: Annotated[Path, typer.Option("--out", help="Metrics JSON to write.")],
    split: Annotated[str, typer.Option(help="labelled | validation | test.")] = "test",
    modes: Annotated[str, typer.Option(
        help="Comma list of fused,a,b. fused runs on cases with both modalities, on "
             "modality a's grid (b resampled by world position, not registered).")
    ] = "fused,a,b",
) -> None:
    """Dice and HD95 per class and modality of a checkpoint on a datalist split."""
    import json

    from rich.console import Console
    from rich.table import Table

    from cmc_train.checkpoint import CheckpointError
    from cmc_train.data.datalist import DatalistError
    from cmc_train.evaluate import EvaluationError, evaluate

    console = Console(stderr=True)
    if split not in SPLITS:
        raise typer.BadParameter(f"{split!r} is not one of {', '.join(SPLITS)}",
                                 param_hint="--split")
    chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    if not chosen or any(m not in MODES for m in chosen):
        raise typer.BadParameter(f"{modes!r}: use a comma list of {', '.join(MODES)}",
                                 param_hint="--modes")
    try:
        result = evaluate(checkpoint, data, split, chosen)
    except (CheckpointError, DatalistError, EvaluationError) as exc:
        raise fail("evaluate", exc) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")

    table = Table(title=f"{checkpoint.name} on {split}")
    for column in ("mode", "cases", "mean Dice", "mean HD95 (mm)", *result["classes"][1:]):
        table.add_column(column)
    for mode, summary in result["modes"].items():
        if not summary["num_cases"]:
            table.add_row(f"{mode} ({summary['modality']})", "0", summary["skipped"])
            continue
        hd = summary["mean_fg_hd95_mm"]
        table.add_row(f"{mode} ({summary['modality']})", str(summary["num_cases"]),
                      f"{summary['mean_fg_dice']:.4f}", "n/a" if hd is None else f"{hd:.2f}",
                      *(f"{d:.3f}" for d in summary["dice"].values()))
    Console().print(table)
    console.print(f"cmc evaluate: metrics written to {out}", highlight=False, markup=False,
                  soft_wrap=True)
