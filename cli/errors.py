"""How every `cmc` command reports an error: one line, one exit-code rule.

An error is printed to stderr as `cmc <command>: error: <message>` (the message names the
file or option and the problem, `cmc_common.errors.CmcError`), never wrapped, so scripts
can grep it and paths stay copyable. Exit codes, the same for every command:

- 0: everything asked for was done;
- 1 (`EXIT_FAILED`): the run went ahead but part of it failed: some cases failed (listed in
  failures.csv by `cmc segment` and `cmc merge-shards`), or the server `cmc serve` started
  stopped by itself;
- 2 (`EXIT_REFUSED`): nothing was done as asked: a usage error (typer reports those with 2
  too), bad input, an unusable model, runtime or checkpoint, a failed export gate, shards
  not all finished. What a refused run leaves is only what its command documents.
"""

from __future__ import annotations

import typer

EXIT_FAILED = 1
EXIT_REFUSED = 2


def say(command: str, message: str) -> None:
    """A progress or summary line `cmc <command>: <message>` on stderr, never wrapped."""
    typer.echo(f"cmc {command}: {message}", err=True)


def fail(command: str, message: object, code: int = EXIT_REFUSED) -> typer.Exit:
    """Print `cmc <command>: error: <message>` on stderr; return the Exit to raise
    (`raise fail(...) from None`)."""
    typer.echo(f"cmc {command}: error: {message}", err=True)
    return typer.Exit(code)
