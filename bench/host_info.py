"""What every benchmark row says about the host it ran on, and where the rows are kept.

Hosts of one kind differ in the CPU features that decide speed (AMX, AVX512-BF16 / -FP16,
VNNI), so each benchmark names them in its rows; the rows of the benchmarks that keep them
per host go to docs/benchmarks/perf_<cpu>.json beside BENCHMARKS.md, one document a CPU
model, each benchmark replacing only its own keys.
"""

from __future__ import annotations

import json
import platform
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def cpu_info(features: Sequence[str]) -> tuple[str, list[str]]:
    """The CPU's model name and which of `features` its flags list (Linux; elsewhere the
    machine name and none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine(), []
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("model name")), platform.machine())
    flags = set(text.split())
    return name, [f for f in features if f in flags]


def update_perf_rows(cpu: str, update: Callable[[dict[str, Any]], None]) -> Path:
    """docs/benchmarks/perf_<cpu>.json with `update` applied to its document (created empty
    when new); other benchmarks' keys stay as they are."""
    slug = re.sub(r"[^a-z0-9]+", "_", cpu.lower()).strip("_")
    path = ROOT / "docs" / "benchmarks" / f"perf_{slug}.json"
    document = json.loads(path.read_text()) if path.is_file() else {}
    update(document)
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path
