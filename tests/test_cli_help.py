"""`cmc segment --help` piped to a file keeps every option name whole: refusals name them."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_piped_help_does_not_cut_option_names() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}
    out = subprocess.run([sys.executable, "-m", "cmc_cli.main", "segment", "--help"],
                         capture_output=True, text=True, env=env, timeout=120, check=True).stdout
    assert "…" not in out
    names = set(re.findall(r"--[a-z][a-z-]*", out))
    assert {"--skip-unreadable", "--assume-orientation", "--assume-registered",
            "--output-type", "--from-dicomweb"} <= names, sorted(names)
