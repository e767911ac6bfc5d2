"""Run a local `tritonserver` (prepared by `cmc_serve.triton.setup`) on loopback.

The server binary comes from the `nvidia-pytriton` wheel and only has the python backend;
its python models run in the server venv (numpy<2, see docs/PLATFORM.md), so the server must be
started with that venv's `bin` first on PATH and with LD_LIBRARY_PATH set to the venv
interpreter's own libdir followed by the wheel's bundled libraries. `TritonServer` does
that, waits (bounded) until the requested models are ready, forwards the server log and
stops the server, its python stubs included, on exit.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ipaddress
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cmc_common.errors import CmcError
from cmc_common.progress import Say

READY_FILE = ".ready"
DEFAULT_PREFIX = Path(".triton")
PREFIX_ENV = "CMC_TRITON_PREFIX"
# Triton 2.51 is the server of the NGC 24.10 release.
CONTAINER_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Logged as errors by every start on a host without a GPU; never the cause of a failure.
BENIGN_ERRORS = ("CudaDriverHelper has not been initialized",)
GLOG_ERROR = re.compile(r"^E\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] ")  # Triton's error-line prefix
# Readiness probes go straight to loopback, never through an http_proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class TritonSetupError(CmcError, RuntimeError):
    """The local Triton server is not prepared (or was prepared incompletely)."""


class TritonServerError(CmcError, RuntimeError):
    """The server failed to start, exited early or did not become ready in time."""


@dataclass(frozen=True)
class TritonInstall:
    """A prepared server: `<prefix>/server` (binary, backends) and `<prefix>/venv`."""

    prefix: Path
    libdir: str
    site_packages: str

    @property
    def server_dir(self) -> Path:
        return self.prefix / "server"

    @property
    def binary(self) -> Path:
        return self.server_dir / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.server_dir / "backends"

    @property
    def venv(self) -> Path:
        return self.prefix / "venv"

    @classmethod
    def locate(cls, prefix: str | Path | None = None) -> TritonInstall:
        """The install at `prefix`, else $CMC_TRITON_PREFIX, else ./.triton.

        Raises TritonSetupError naming the missing piece and the command that prepares it.
        """
        root = Path(prefix or os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX).absolute()
        ready = root / READY_FILE
        hint = f"prepare it with `python -m cmc_serve.triton.setup --prefix {root}`"
        try:
            info = json.loads(ready.read_text())
        except FileNotFoundError:
            raise TritonSetupError(f"{ready}: missing, no local Triton server there; {hint}") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise TritonSetupError(f"{ready}: unreadable ({exc}); {hint}") from exc
        install = cls(prefix=root, libdir=str(info.get("libdir", "")),
                      site_packages=str(info.get("site_packages", "")))
        for needed in (install.binary, install.backends / "python" / "libtriton_python.so",
                       install.backends / "python" / "triton_python_backend_stub",
                       install.venv / "bin" / "python"):
            if not needed.exists():
                raise TritonSetupError(f"{needed}: missing, the Triton install is incomplete; {hint}")
        return install

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Process environment for the server (docs/PLATFORM.md): venv first, its libpython
        first."""
        env = dict(os.environ if base is None else base)
        libs = [self.libdir, str(Path(self.site_packages) / "nvidia_pytriton.libs")]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        env["PATH"] = os.pathsep.join([str(self.venv / "bin"), env.get("PATH", "")])
        env["VIRTUAL_ENV"] = str(self.venv)
        env.pop("PYTHONPATH", None)  # the stubs must see the server venv, not the caller's
        env.pop("PYTHONHOME", None)
        return env


def check_loopback(host: str) -> str:
    """Return `host` if it is a loopback address; the local server never listens elsewhere."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise TritonServerError(
            f"host {host!r} is not a loopback IP address: the local server only listens on "
            "127.0.0.1; use the official container (docker command) to serve on a network")
    return host


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports that are free on `host` right now.

    The sockets stay bound until all are drawn: ports drawn one at a time can repeat (the
    kernel may hand out a just-closed port again), and a server told to listen twice on one
    port refuses to start.
    """
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(
            socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET))
            for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    return free_ports(1, host)[0]


def docker_command(repository: str | Path, *, http_port: int = 8000, grpc_port: int = 8001,
                   source: str | Path | None = None, image: str = CONTAINER_IMAGE) -> list[str]:
    """The equivalent official-container command line for `repository`.

    The repository's parent (the model directory) is mounted, since patch models may name
    graphs outside the repository (`../../onnx/...`). The python models need cmc
    (`--no-deps`), numpy<2, scipy (post-processing), onnxruntime and openvino inside the
    container, so the cmc source tree is mounted read-only and installed before the server
    starts. Ports are published on the host's loopback only, like the local server.
    """
    repo = Path(repository).absolute()
    src = Path(source).absolute() if source else Path(__file__).resolve().parents[2]
    script = ('pip install -q "numpy<2" scipy onnxruntime openvino && '
              "pip install -q --no-deps /opt/cmc && "
              f"exec tritonserver --model-repository=/model/{repo.name} --allow-metrics=false")
    return ["docker", "run", "--rm", "--gpus=all", "--shm-size=1g",
            "-p", f"127.0.0.1:{http_port}:8000", "-p", f"127.0.0.1:{grpc_port}:8001",
            "-v", f"{repo.parent}:/model:ro", "-v", f"{src}:/opt/cmc:ro",
            image, "bash", "-c", script]


class TritonServer:
    """Context manager around one `tritonserver` process serving `repository` on loopback.

    Ports default to free ones. `models`: load only these (and wait for them); default:
    every folder of the repository that holds a config.pbtxt. `log`: where server log lines
    go (default stderr); the last lines are also kept for error messages.
    """

    def __init__(self, repository: str | Path, *, install: TritonInstall | None = None,
                 host: str = "127.0.0.1", http_port: int | None = None,
                 grpc_port: int | None = None, models: Sequence[str] | None = None,
                 ready_timeout_s: float = 120.0, log: Say | None = None,
                 exit_timeout_s: int = 5) -> None:
        self.repository = Path(repository).absolute()
        if not self.repository.is_dir():
            raise TritonServerError(f"{self.repository}: model repository does not exist")
        self.install = install or TritonInstall.locate()
        self.host = check_loopback(host)
        spare = iter(free_ports(2, host))
        self.http_port = http_port or next(spare)
        self.grpc_port = grpc_port or next(spare)
        self.explicit = models is not None
        self.models = list(models) if models is not None else sorted(
            p.parent.name for p in self.repository.glob("*/config.pbtxt"))
        self.ready_timeout_s = ready_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._tail: collections.deque[str] = collections.deque(maxlen=200)
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise TritonServerError("server not started")
        return self._process.pid

    def command(self) -> list[str]:
        return [str(self.install.binary), f"--model-repository={self.repository}",
                f"--backend-directory={self.install.backends}",
                f"--http-address={self.host}", f"--grpc-address={self.host}",
                f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
                "--allow-metrics=false", f"--exit-timeout-secs={self.exit_timeout_s}",
                *(["--model-control-mode=explicit"] if self.explicit else []),
                *(f"--load-model={m}" for m in self.models if self.explicit)]

    def start(self) -> TritonServer:
        """Start the server and block until every model in `models` is ready."""
        if self._process is not None:
            raise TritonServerError("server already started")
        # A session of its own: stop() can then end the server's python stubs with it.
        self._process = subprocess.Popen(
            self.command(), env=self.install.environment(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
            preexec_fn=_parent_death_signal())
        self._reader = threading.Thread(target=self._forward_log, name="tritonserver-log",
                                        daemon=True)
        self._reader.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _forward_log(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            line = line.rstrip("\n")
            self._tail.append(line)
            self._log(line)

    def first_error(self) -> str:
        """The cause, in one line: the server's first error log line (glog `E...`; later
        ones are consequences), else its last line. Tracebacks after `\\n` are cut."""
        lines = [line for line in self._tail if line.strip()]
        errors = [line for line in lines
                  if GLOG_ERROR.match(line) and not any(b in line for b in BENIGN_ERRORS)]
        line = errors[0] if errors else (lines or ["(no log output)"])[-1]
        return GLOG_ERROR.sub("", line).split("\\n")[0].strip().strip('"').strip()

    def _ready(self, path: str) -> bool:
        try:
            with _DIRECT.open(f"http://{self.http_url}{path}", timeout=2) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        paths = ["/v2/health/ready"] + [f"/v2/models/{m}/ready" for m in self.models]
        while paths:
            code = self._process.poll()
            if code is not None:
                if self._reader is not None:
                    self._reader.join(timeout=2)
                raise TritonServerError(
                    f"tritonserver exited with code {code} while loading {self.repository}: "
                    f"{self.first_error()}")
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver not ready after {self.ready_timeout_s:.0f} s (waiting for "
                    f"{paths[0]}): {self.first_error()}")
            if self._ready(paths[0]):
                paths.pop(0)
            else:
                time.sleep(0.1)

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the server exits (or `timeout` passes); its exit code or None."""
        if self._process is None:
            raise TritonServerError("server not started")
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> int | None:
        """SIGTERM (graceful: in-flight requests finish), then SIGKILL the server's session."""
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        try:  # python backend stubs left behind by a killed server
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._reader is not None:
            self._reader.join(timeout=5)
        return process.returncode

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def ignore_stop_signals() -> None:
    """While shutting down, a second Ctrl-C/SIGTERM must not abandon a half-stopped server."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn giving the server SIGTERM when the thread that started it dies (Linux
    prctl), so a killed `cmc serve` or test run leaves no orphaned server behind. prctl is
    resolved here, in the parent: the forked child must not dlopen while other threads
    (gRPC's) may hold the loader lock."""
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))

    return set_death_signal


def format_command(argv: Sequence[str]) -> str:
    return shlex.join(argv)
