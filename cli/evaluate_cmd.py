"""`cmc evaluate`: Dice and HD95 per class and modality of a checkpoint on a datalist split,
and the choice of post-processing on validation data.

Heavy imports live inside `command` so `cmc --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cmc_common.contract import MODES

SPLITS = ("labelled", "validation", "test")

HELP_CHOOSE = ("Choose the post-processing of each class and mode on this split (keep the "
               "largest component, or remove components below a volume, where that raises "
               "the class's Dice, ties going to the lower HD95) and record it in CHECKPOINT, "
               "from where `cmc export` carries it to `cmc segment` and Triton. Use the "
               "validation split; the test split is refused.")


def command(
    checkpoint: Annotated[Path, typer.Argument(help="A CMC checkpoint (checkpoint_best.pt).")],
    data: Annotated[Path, typer.Option("--data", help="Datalist JSON.")],
    out: Annotated[Path, typer.Option("--out", help="Metrics JSON to write.")],
    split: Annotated[str, typer.Option(help="labelled | validation | test.")] = "test",
    modes: Annotated[str, typer.Option(
        help="Comma list of fused,a,b. fused runs on cases with both modalities, on "
             "modality a's grid (b resampled by world position, not registered), and is "
             "scored against modality a's labels.")
    ] = "fused,a,b",
    choose_postprocessing: Annotated[bool, typer.Option(
        "--choose-postprocessing", help=HELP_CHOOSE)] = False,
    postprocessing: Annotated[bool, typer.Option(
        help="Apply the checkpoint's recorded post-processing before scoring (what "
             "`cmc segment` does); --no-postprocessing scores the raw prediction.")] = True,
    threads: Annotated[int | None, typer.Option(
        min=1, help="CPU threads for PyTorch (default: all usable cores but one).")] = None,
    progress: Annotated[bool, typer.Option(help="Progress bars (only on a terminal); one line "
                                           "per mode is printed either way.")] = True,
) -> None:
    """Dice and HD95 per class and modality of a checkpoint on a datalist split."""
    import json

    from rich.console import Console

    from cmc_train.checkpoint import record_postprocessing
    from cmc_train.evaluate import evaluate
    from cmc_train.progress import Reporter
    from cmc_train.threads import set_threads

    console = Console(stderr=True)
    if split not in SPLITS:
        raise typer.BadParameter(f"{split!r} is not one of {', '.join(SPLITS)}",
                                 param_hint="--split")
    chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    if not chosen or any(m not in MODES for m in chosen):
        raise typer.BadParameter(f"{modes!r}: use a comma list of {', '.join(MODES)}",
                                 param_hint="--modes")
    set_threads(threads)
    with Reporter(progress) as reporter:
        result = evaluate(checkpoint, data, split, chosen, reporter=reporter,
                          apply_postprocessing=postprocessing,
                          choose_postprocessing=choose_postprocessing)
    if choose_postprocessing:
        record_postprocessing(checkpoint, result["postprocessing"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    Console(width=max(100, Console().width)).print(_table(result, checkpoint.name))
    if choose_postprocessing:
        console.print(f"cmc evaluate: post-processing recorded in {checkpoint}; `cmc export` "
                      "carries it into the model directory", highlight=False)
    console.print(f"cmc evaluate: metrics written to {out}", highlight=False, markup=False,
                  soft_wrap=True)


def _table(result: dict[str, Any], name: str) -> Any:
    """The per-mode table; its caption says how each mode is scored and what post-processing
    the numbers include."""
    from rich.table import Table

    a_name = result["modalities"][0]
    table = Table(title=f"{name} on {result['split']}", caption=(
        f"fused: both modalities predicted on {a_name}'s grid, scored against {a_name}'s "
        "labels. HD95 undefined: case-class pairs where exactly one of prediction and "
        "reference has the class (left out of the mean HD95)."))
    for column in ("mode", "cases", "mean Dice", "mean HD95 (mm)", "HD95 undefined",
                   *result["classes"][1:], "post-processing"):
        table.add_column(column)
    for mode, summary in result["modes"].items():
        label = f"{mode} ({summary['modality']})"
        if not summary["num_cases"]:
            table.add_row(label, "0", summary["skipped"])
            continue
        hd = summary["mean_fg_hd95_mm"]
        raw = summary.get("without_postprocessing")
        dice = f"{summary['mean_fg_dice']:.4f}"
        hd95 = "n/a" if hd is None else f"{hd:.2f}"
        if raw:  # post-processed: the raw prediction's numbers beside
            dice += f" (raw {raw['mean_fg_dice']:.4f})"
            raw_hd = raw["mean_fg_hd95_mm"]
            hd95 += f" (raw {'n/a' if raw_hd is None else f'{raw_hd:.2f}'})"
        table.add_row(label, str(summary["num_cases"]), dice, hd95,
                      f"{summary['hd95_undefined_total']} of {summary['hd95_pairs']}",
                      *(f"{d:.3f}" for d in summary["dice"].values()),
                      summary["postprocessing"])
    return table
