"""`cmc merge-shards OUT`: one report.json / failures.csv over the shards of a sharded run.

Every `cmc segment --shard I/N` run merges the shards' records into OUT/report.json when it
ends, so this command is for checking a whole array job afterwards (its exit code says
whether every shard finished and every case succeeded) or for re-merging by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

EXIT_CASE_FAILED = 1
EXIT_INCOMPLETE = 2


def command(
    out: Annotated[Path, typer.Argument(help="The output folder the shards wrote into.")],
    shards: Annotated[int | None, typer.Option(
        "--shards", min=1, help="N of the --shard I/N runs to merge (needed only when OUT "
                                "holds records of several shardings).")] = None,
) -> None:
    """Merge the records of `cmc segment --shard I/N` runs in OUT into OUT/report.json."""
    from rich.console import Console

    from cmc_serve.pipeline.shards import ShardMergeError, merge_shards

    console = Console(stderr=True)

    def say(line: str) -> None:
        console.print(line, highlight=False, markup=False, soft_wrap=True)

    try:
        merged = merge_shards(out, shards)
    except ShardMergeError as exc:
        say(f"cmc merge-shards: error: {exc}")
        raise typer.Exit(EXIT_INCOMPLETE) from None
    counts = merged.counts
    say(f"cmc merge-shards: {merged.count} shard(s), {counts['done']} done, "
        f"{counts['failed']} failed, {counts['skipped']} skipped; report: {merged.report}")
    if not merged.complete:
        say(f"cmc merge-shards: not every shard has finished; see 'shards' in {merged.report}")
        raise typer.Exit(EXIT_INCOMPLETE)
    if merged.failures is not None:
        say(f"cmc merge-shards: failed cases are listed in {merged.failures}")
        raise typer.Exit(EXIT_CASE_FAILED)
