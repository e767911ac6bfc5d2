"""Semi-supervised quality benchmark: does CMC beat plain supervised training?

    .venv/bin/python bench/quality.py [--quick] [--datalist RATIO=PATH ...] [--help]

The benchmark itself is the package `bench/quality_bench` (its docstring gives every option
and what is measured); this script only runs its command line.
"""

from __future__ import annotations

import sys

from quality_bench.cli import main
from quality_bench.plan import BenchmarkError

if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as exc:
        sys.exit(f"error: {exc}")
