"""`cmc merge-shards OUT`: one report.json / failures.csv over the shards of a sharded run.

Every `cmc segment --shard I/N` run merges the shards' records into OUT/report.json when it
ends, so this command is for checking a whole array job afterwards (its exit code says
whether every shard finished and every case succeeded) or for re-merging by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .errors import EXIT_FAILED, fail, say


def command(
    out: Annotated[Path, typer.Argument(help="The output folder the shards wrote into.")],
    shards: Annotated[int | None, typer.Option(
        "--shards", min=1, help="N of the --shard I/N runs to merge (needed only when OUT "
                                "holds records of several shardings).")] = None,
) -> None:
    """Merge the records of `cmc segment --shard I/N` runs in OUT into OUT/report.json,
    failures.csv and report.html."""

    from cmc_serve.pipeline.shards import merge_shards

    merged = merge_shards(out, shards)
    counts = merged.counts
    say("merge-shards", f"{merged.count} shard(s), {counts['done']} done, "
        f"{counts['failed']} failed, {counts['skipped']} skipped; report: {merged.report}")
    if not merged.complete:
        raise fail("merge-shards", f"not every shard has finished; see 'shards' in "
                                   f"{merged.report}")
    if merged.failures is not None:
        say("merge-shards", f"failed cases are listed in {merged.failures}")
        raise typer.Exit(EXIT_FAILED)
