"""How every `cmc` command reports an error: one line, one exit-code rule, in one place.

An error is printed to stderr as `cmc <command>: error: <message>` (the message names the
file or option and the problem, `cmc_common.errors.CmcError`), never wrapped, so scripts
can grep it and paths stay copyable. Exit codes, the same for every command:

- 0: everything asked for was done;
- 1 (`EXIT_FAILED`): the run went ahead but part of it failed: some cases failed (listed in
  failures.csv by `cmc segment` and `cmc merge-shards`), or the server `cmc serve` started
  stopped by itself (`went_ahead`);
- 2 (`EXIT_REFUSED`): nothing was done as asked: a usage error (typer reports those with 2
  too), bad input, an unusable model, runtime or checkpoint, a failed export gate, shards
  not all finished. What a refused run leaves is only what its command documents;
- 130 (`EXIT_INTERRUPTED`): stopped by a second Ctrl-C (`cmc listen`), as a shell reports
  a process ended by SIGINT.

`reporting(command, function)` wraps every command once (cli/main.py): a `CmcError` from
any library the command calls is reported by the rule above, so a command lists no error
classes of its own and a new command needs nothing to get the same behaviour. An
`OptionError` is a usage error against the flag of the field it names; a `--shard`
refusal is one line instead, as it names the scheduler variables it read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import typer

from cmc_common.errors import CmcError, OptionError

EXIT_FAILED = 1
EXIT_REFUSED = 2
EXIT_INTERRUPTED = 130

# OptionErrors reported as one `error:` line, not a usage box: the problem names the
# environment read (Slurm / Kubernetes variables), not only the value typed.
_ONE_LINE_OPTIONS = frozenset({"shard"})

Command = TypeVar("Command", bound=Callable[..., None])


class _WentAhead(Exception):
    """A CmcError raised after the run went ahead: exits EXIT_FAILED (`went_ahead`)."""

    def __init__(self, error: CmcError) -> None:
        super().__init__(str(error))
        self.error = error


def say(command: str, message: str) -> None:
    """A progress or summary line `cmc <command>: <message>` on stderr, never wrapped."""
    typer.echo(f"cmc {command}: {message}", err=True)


def fail(command: str, message: object, code: int = EXIT_REFUSED) -> typer.Exit:
    """Print `cmc <command>: error: <message>` on stderr; return the Exit to raise
    (`raise fail(...) from None`)."""
    typer.echo(f"cmc {command}: error: {message}", err=True)
    return typer.Exit(code)


def flag(option: str) -> str:
    """The command-line flag of an options field (`output_types` is `--output-type`)."""
    return "--output-type" if option == "output_types" else f"--{option.replace('_', '-')}"


@contextmanager
def went_ahead() -> Iterator[None]:
    """A CmcError raised inside exits EXIT_FAILED, not EXIT_REFUSED: the run had started
    (`cmc serve`'s server was launched) when it failed."""
    try:
        yield
    except CmcError as exc:
        raise _WentAhead(exc) from exc


def reporting(command: str, function: Command) -> Command:
    """`function` (a command) with every CmcError it lets through reported by the rule of
    this module; typer reads the options from `function`'s own signature."""

    @functools.wraps(function)
    def run(*args: object, **kwargs: object) -> None:
        try:
            function(*args, **kwargs)
        except _WentAhead as exc:
            raise fail(command, exc.error, EXIT_FAILED) from None
        except OptionError as exc:
            if exc.option in _ONE_LINE_OPTIONS:
                raise fail(command, exc.problem) from None
            raise typer.BadParameter(exc.problem, param_hint=flag(exc.option)) from None
        except CmcError as exc:
            raise fail(command, exc) from None

    return run  # type: ignore[return-value]
