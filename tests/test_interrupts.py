"""A stopped `cmc segment` (SIGTERM from kill, systemd or Slurm) leaves no temporary file.

Python's default SIGTERM action ends the process without any cleanup, so a file being
written under its hidden temporary name stayed in the case folder. The signal now raises
KeyboardInterrupt (`cmc_common.interrupts`) and `atomic_write` removes its temporary file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import segment_fixtures as fx

from cmc_common.files import atomic_write
from cmc_common.interrupts import sigterm_as_interrupt


def test_sigterm_during_a_write_removes_the_temporary_file(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half a segmentation")
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, mid-write
        time.sleep(5)  # the handler raises before this ends

    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        atomic_write(tmp_path / "seg.nii.gz", write)
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the block


def test_sigterm_mid_batch_leaves_no_temporary_file(tmp_path: Path, model_dir: Path) -> None:
    for i in range(12):
        uid = f"1.2.826.0.1.3680043.8.498.27{i:02d}"
        fx.write_phantom_series(tmp_path / "in" / f"s{i}" / "ct", fx.ct_spec(uid))
    out = tmp_path / "out"
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        run = subprocess.Popen([sys.executable, "-m", "cmc_cli.main", "segment",
                                str(tmp_path / "in"), "-o", str(out), "--model", str(model_dir),
                                "--runtime", "onnxruntime"], stderr=stderr,
                               stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while "done" not in log.read_text() and run.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        run.send_signal(signal.SIGTERM)
        code = run.wait(timeout=60)
    assert code != 0, "the batch finished before the signal: make it longer"
    hidden = [p for p in out.rglob(".*") if p.is_file() and p.name != ".cmc-output"]
    assert hidden == [], hidden
    done = [p.parent.name for p in out.glob("*/done")]
    assert 0 < len(done) < 12
