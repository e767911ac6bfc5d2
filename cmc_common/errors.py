"""`CmcError`: the one base of every error cmc raises for a user.

A script or service that calls cmc's Python API catches `CmcError` to tell "cmc refused this
input, model or run, and says why in one line" from a bug; every command line prints such
an error as `cmc <command>: error: <message>` (cli/errors.py). Subclasses name what was
wrong (a model directory, a DICOM series, a checkpoint, ...). Where callers already rely on
a built-in base (`ValueError` for bad values, `RuntimeError` for a runtime or server that
cannot run), the subclass keeps it as its second base. `OptionError` is the one whose
`option` names the setting at fault, so a command line reports it against its own flag.

Each error is raised once, where the problem is found, with the message the user reads:
nothing catches a CmcError to raise another with the same text (the command line catches
`CmcError` once, cli/errors.py), and `one_line` is the one way another library's exception
becomes part of such a message.
"""

from __future__ import annotations


class CmcError(Exception):
    """An error meant for the user; str() is one line naming the file or option and the
    problem."""


class OptionError(CmcError, ValueError):
    """A value of an options object is not accepted: `option` names the field, `problem` says
    why; str() is "<option>: <problem>"."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option}: {problem}")
        self.option, self.problem = option, problem


def one_line(exc: object, *, first_line: bool = False) -> str:
    """Another library's exception (or its message) as one line of a CmcError message: its
    whole text with the line breaks folded (pydicom's decoder errors list each plugin's
    failure on a line of its own, and the first line alone names none of them), or its type
    when it says nothing. `first_line`: only the first line, for errors whose next lines are
    a listing a one-line message cannot hold (torch's missing and unexpected state_dict
    keys, a DICOM parser's dump)."""
    text = str(exc).strip()
    if first_line:
        text = text.splitlines()[0] if text else ""
    return " ".join(text.split()) or type(exc).__name__
