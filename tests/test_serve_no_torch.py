"""cmc_serve must run on hosts without PyTorch/MONAI (DESIGN.md import direction).

Every cmc_serve module is imported in a fresh interpreter in which `torch`, `monai`,
`cmc_train` and `cmc_export` cannot be imported at all, so a stray import anywhere in the
serving package (even an indirect one) fails this test.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import cmc_serve

FORBIDDEN = ("torch", "monai", "cmc_train", "cmc_export")

PROBE = r"""
import importlib, sys

FORBIDDEN = {forbidden!r}

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError(f"{{name}} is blocked: cmc_serve must not import it")
        return None

sys.meta_path.insert(0, Block())
for name in {modules!r}:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
assert not leaked, leaked
print("imported", len({modules!r}))
"""


def serve_modules() -> list[str]:
    return ["cmc_serve"] + sorted(
        m.name for m in pkgutil.walk_packages(cmc_serve.__path__, prefix="cmc_serve."))


def test_every_serve_module_imports_without_torch() -> None:
    modules = serve_modules()
    assert {"cmc_serve.engine", "cmc_serve.runtimes.select",
            "cmc_serve.runtimes.tensorrt_rt"} <= set(modules)
    probe = PROBE.format(forbidden=FORBIDDEN, modules=modules)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"imported {len(modules)}" in done.stdout


def test_the_blocker_really_blocks() -> None:
    probe = PROBE.format(forbidden=FORBIDDEN, modules=["torch"])
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "torch is blocked" in done.stderr
