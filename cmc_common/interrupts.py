"""SIGTERM handled like Ctrl-C, so that a stopped command cleans up after itself.

Python's default SIGTERM action ends the process on the spot: no `finally`, no `except`, so a
file being written under its temporary name (`cmc_common.files.atomic_write`) stays behind
in the output folder. systemd, Slurm (`scancel`, a time limit) and `kill` all send SIGTERM.
Within `sigterm_as_interrupt` the signal raises KeyboardInterrupt instead, and every cleanup
on the way out runs, exactly as for Ctrl-C.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt as Ctrl-C does, so one
    `except KeyboardInterrupt` (or a `finally`) handles whichever signal arrives. Main thread
    only (Python's signal rule)."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
