"""Prepare a local Triton server: `python -m cmc_serve.triton.setup --prefix .triton`.

No Docker here (docs/PLATFORM.md), so the server comes from the `nvidia-pytriton` wheel, which
carries `tritonserver` 2.51 with the python backend and its stubs. It is installed into a
venv of its own, `<prefix>/venv`, because the python backend needs numpy<2 (under numpy 2
it silently receives all-zero tensors) while the rest of cmc runs on numpy 2. The venv also
gets onnxruntime, openvino and cmc itself (`--no-deps`, editable, so the python models
import the same `cmc_serve` code as the checkout). The server tree is copied to
`<prefix>/server` with the stub matching the venv's Python, and `<prefix>/.ready` records
what `TritonInstall.locate` needs. Re-running repairs or refreshes an install.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cmc_serve.triton.server import DEFAULT_PREFIX, READY_FILE, TritonInstall, TritonSetupError

# onnxruntime and openvino releases that still support numpy 1.x are picked by pip.
SERVER_PACKAGES = ("numpy>=1.24,<2", "scipy>=1.10", "nvidia-pytriton>=0.5", "onnxruntime>=1.18",
                   "openvino>=2025.0")

_PROBE = """
import json, site, sys, sysconfig, importlib.util
import numpy
spec = importlib.util.find_spec("pytriton")
print(json.dumps({
    "libdir": sysconfig.get_config_var("LIBDIR"),
    "site_packages": site.getsitepackages()[0],
    "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
    "numpy": numpy.__version__,
    "pytriton": str(spec.submodule_search_locations[0]) if spec else None,
}))
"""


def source_tree() -> Path:
    """The cmc checkout this module runs from (pip installs cmc from it, without deps)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise TritonSetupError(f"{root}: no pyproject.toml; run the setup from a cmc checkout")
    return root


def _run(argv: list[str], what: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-10:])
        raise TritonSetupError(f"{what} failed (exit {result.returncode}): {tail}")
    return result.stdout


def prepare(prefix: str | Path = DEFAULT_PREFIX, *, python: str = sys.executable,
            source: Path | None = None, log: bool = True) -> TritonInstall:
    """Create/refresh the server venv and server tree under `prefix`; return the install."""
    root = Path(prefix).absolute()
    src = source or source_tree()
    venv_python = root / "venv" / "bin" / "python"
    (root / READY_FILE).unlink(missing_ok=True)

    def say(msg: str) -> None:
        if log:
            print(f"[cmc triton setup] {msg}", file=sys.stderr, flush=True)

    started = time.monotonic()
    if not venv_python.exists():
        say(f"creating {root / 'venv'}")
        _run([python, "-m", "venv", str(root / "venv")], "creating the server venv")
    pip = [str(venv_python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    say("installing " + " ".join(SERVER_PACKAGES))
    _run(pip + list(SERVER_PACKAGES), "pip install of the server packages")
    say(f"installing cmc from {src} (--no-deps, editable)")
    _run(pip + ["--no-deps", "-e", str(src)], "pip install of cmc into the server venv")

    info = json.loads(_run([str(venv_python), "-c", _PROBE], "probing the server venv"))
    if not str(info["numpy"]).startswith("1."):
        raise TritonSetupError(f"{venv_python}: numpy {info['numpy']} in the server venv; the "
                               "python backend needs numpy<2")
    if not info["pytriton"]:
        raise TritonSetupError(f"{venv_python}: nvidia-pytriton is not importable")
    wheel_server = Path(info["pytriton"]) / "tritonserver"
    stub = wheel_server / "python_backend_stubs" / info["python"] / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonSetupError(f"{stub}: no python backend stub for Python {info['python']}")

    server = root / "server"
    shutil.rmtree(server, ignore_errors=True)
    shutil.copytree(wheel_server, server, ignore=shutil.ignore_patterns("python_backend_stubs",
                                                                        "__pycache__"))
    shutil.copy2(stub, server / "backends" / "python" / stub.name)

    ready = root / READY_FILE
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(json.dumps({**info, "source": str(src)}, indent=1) + "\n")
    tmp.replace(ready)
    install = TritonInstall.locate(root)
    say(f"ready in {time.monotonic() - started:.0f} s: {install.binary}")
    return install


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cmc_serve.triton.setup",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--prefix", default=str(DEFAULT_PREFIX),
                        help="where to put venv/, server/ and .ready (default: .triton)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter the server venv is created from (default: this one)")
    args = parser.parse_args(argv)
    try:
        prepare(args.prefix, python=args.python)
    except TritonSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
