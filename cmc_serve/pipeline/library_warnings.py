"""Warnings of the imaging libraries during a run: to the log, and one line per case.

pydicom (and highdicom, nibabel) report oddities of the files they read as `UserWarning`s,
which Python prints to stderr as two lines naming the library's own source file
(".../site-packages/pydicom/valuerep.py:440: UserWarning: ...  warn_and_log(msg)"), before
and between cmc's own lines. During a `cmc segment` run (`routed`) such a warning instead
goes to the log (logger `cmc_serve.pipeline.library_warnings`, INFO), and, when it was raised
while a case's images were being read (`collected`, in that reader's thread), it becomes one
line of that case's record ("<image>: pydicom: <message> (N times)"), shown under the case and
kept in report.json. Warnings raised while scanning the input tree's headers concern files
that may never be used; they stay in the log. Other warnings are shown as usual.

`routed` replaces the process-wide warning hook for the run's duration (as
`warnings.catch_warnings` does), which is what lets the reader threads' warnings reach it;
two runs in threads of one process therefore share one hook and should not overlap.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LIBRARIES = ("pydicom", "highdicom", "nibabel")
_local = threading.local()


def _library_roots() -> dict[str, str]:
    """Source folder of each installed library -> its name."""
    roots = {}
    for name in LIBRARIES:
        spec = find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots[str(Path(next(iter(spec.submodule_search_locations))).resolve())] = name
    return roots


def _library_of(filename: str, roots: dict[str, str]) -> str | None:
    try:
        path = str(Path(filename).resolve())
    except (OSError, ValueError):
        return None
    return next((name for root, name in roots.items() if path.startswith(root)), None)


@contextmanager
def routed() -> Iterator[None]:
    """While active (a whole run, all its threads), library warnings go to the log and to the
    reading thread's collector instead of stderr; each occurrence counts (no once-only)."""
    roots = _library_roots()
    with warnings.catch_warnings():
        shown = warnings.showwarning
        for name in LIBRARIES:
            warnings.filterwarnings("always", module=rf"{name}(\.|$)")

        def show(message: Any, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
            library = _library_of(filename, roots)
            if library is None:
                shown(message, category, filename, lineno, file, line)
                return
            text = " ".join(str(message).split())
            log.info("%s %s: %s", library, category.__name__, text)
            notes = getattr(_local, "notes", None)
            if notes is not None:
                notes[f"{library}: {text}"] += 1

        warnings.showwarning = show
        yield


@contextmanager
def collected(where: str, into: list[str]) -> Iterator[None]:
    """Append one line per distinct library warning raised in this thread meanwhile to
    `into`, as "<where>: <library>: <message>[ (N times)]"."""
    previous = getattr(_local, "notes", None)
    _local.notes = notes = Counter[str]()
    try:
        yield
    finally:
        _local.notes = previous
        into.extend(f"{where}: {text}" + (f" ({n} times)" if n > 1 else "")
                    for text, n in notes.items())
