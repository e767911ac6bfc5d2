"""What long work shows while it runs: `cmc train` and `cmc evaluate` take minutes to hours.

On a terminal (and unless switched off) a rich progress bar per stage (training steps,
validation volumes, evaluated cases); always, on standard error, one plain line per
milestone (each validation with its Dice, each evaluated mode), so that `--no-progress`,
a log file or a batch job still shows where the run is and how it is doing.
"""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Reporter:
    """A progress bar (terminal only, `bar=True`) plus milestone lines on stderr."""

    def __init__(self, bar: bool, enabled: bool = True) -> None:
        """`enabled` False (other ranks of a distributed run) shows and prints nothing."""
        self.enabled = enabled
        console = Console(stderr=True)
        self.live = bar and enabled and console.is_terminal
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=console, disable=not self.live, transient=False)

    def __enter__(self) -> Reporter:
        self._progress.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.__exit__(kind, exc, tb)

    def say(self, text: str) -> None:
        """One milestone line (above the bar when one is shown)."""
        if not self.enabled:
            return
        if self.live:
            self._progress.console.print(text, highlight=False, markup=False, soft_wrap=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def stage(self, description: str, total: int, completed: int = 0) -> TaskID:
        """A new bar (shown only on a terminal)."""
        return self._progress.add_task(description, total=total, completed=completed, info="")

    def update(self, task: TaskID, completed: int | None = None, advance: int = 0,
               info: str | None = None) -> None:
        if info is not None:
            self._progress.update(task, info=info)
        if completed is not None:
            self._progress.update(task, completed=completed)
        else:
            self._progress.update(task, advance=advance)

    def finish(self, task: TaskID) -> None:
        """Remove a finished stage's bar (validation passes come and go)."""
        self._progress.remove_task(task)
