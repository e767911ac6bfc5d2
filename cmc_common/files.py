"""Atomic file writes that leave the file with the mode a plain `open` would have given it.

Every file cmc writes for a user (checkpoints, segmentations, reports) goes through
`atomic_write`: the content is written under a hidden temporary name in the target folder
and renamed over the final name when complete, so a killed run never leaves a partial file
under a final name. `tempfile.mkstemp` creates that temporary file with mode 0600 (private,
whatever the umask); the rename would carry 0600 onto the result, so a colleague or a PACS
export job of the same group could not read it. The temporary file is therefore given
0666 minus the process umask before the rename, exactly what `open(path, "w")` gives.
The node's spool stores received instances and study records through it too, `durable`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc);
    elsewhere set and restored under a lock (the umask is process-wide)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def plain_file_mode() -> int:
    """The permission bits `open(path, "w")` gives a new file: 0666 minus the umask."""
    return 0o666 & ~current_umask()


def atomic_write(path: Path, write: Callable[[Path], object], durable: bool = False,
                 temp_suffix: str | None = None) -> None:
    """Call `write(tmp_path)` on a hidden temporary name ('.<name>.XXXX<suffixes>') in the
    target folder, give it the plain-`open` mode, then rename it over `path`.

    The temporary keeps the final name's suffixes (writers such as nibabel read the format
    from them) unless `temp_suffix` is given (the spool's '.tmp': its readers glob '*.dcm').

    `durable` flushes the content to disk before the rename and the folder's entry after it,
    so that once this returns the file survives a power cut (checkpoints: never a renamed but
    empty file; the node's spool: an instance it told the sender it stored). On any failure
    the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = temp_suffix or "".join(path.suffixes) or ".tmp"
    tmp: Path | None = None
    try:  # created inside: an interrupt just after mkstemp still removes it
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        tmp = Path(name)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, plain_file_mode())
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too (Ctrl-C, SIGTERM: cmc_common.interrupts)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent)  # the rename itself is only durable once the folder is


def _fsync(path: Path) -> None:
    """Flush a file's content, or a folder's entries, to disk (a read-only descriptor does)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path) -> dict[str, Any]:
    """{"size", "sha256"} of a file, as cmc.json records each file of an exported model."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}
