"""All or nothing: an export is built in a hidden folder beside MODEL_DIR and renamed into place.

A failed gate, a crash or Ctrl-C therefore never leaves a half-written model directory, and
`force` replaces an existing one without ever mixing old and new files: the old folder is
swapped out by rename and deleted only once the new one is in place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cmc_common.files import current_umask
from cmc_export.errors import ExportError


def check_output(out_dir: Path, force: bool) -> None:
    """Refuse an existing MODEL_DIR unless forced; make sure its parent is writable."""
    if out_dir.exists() and not force:
        raise ExportError(f"{out_dir}: already exists; pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a directory")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"{out_dir}: cannot create the output folder ({exc.strerror or exc})") from exc
    if not os.access(out_dir.parent, os.W_OK | os.X_OK):
        raise ExportError(f"{out_dir}: the folder {out_dir.parent} is not writable")


@contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """Yield the hidden folder to build the export in; on a normal exit it becomes
    `out_dir` (replacing an existing one), on any exception it is deleted."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; MODEL_DIR is a normal folder
    except OSError as exc:
        raise ExportError(f"{out_dir}: cannot write the output ({exc.strerror or exc})") from exc
    try:
        yield tmp
        _replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, out_dir: Path) -> None:
    """Move the finished export into place; an existing MODEL_DIR is swapped out, then deleted."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
