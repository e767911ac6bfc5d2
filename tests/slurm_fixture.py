"""A real single-node Slurm cluster for the tests (Debian's `slurm-wlm` and `munge`, which
`make test` installs): munged, slurmctld and slurmd with a slurm.conf written for the test.

Everything the cluster writes (configuration, state, spool, logs, munge socket) lives in one
fresh folder; the daemons listen on free loopback ports and use their own munge socket, so a
Slurm or munge already running on the host is left alone. Settings that need no cgroups
(proctrack/linuxproc, task/none, no accounting) make it run in a container as root. munged
runs as user munge with a key of its own (written for the cluster); its folder is created under
/tmp (not pytest's private tmp tree) because munged refuses a socket whose path is not
traversable by everyone. The node gets the host's CPU count (2 on CI), so array tasks run
two at a time there. Every wait is bounded and a daemon that dies fails with its log.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cmc_serve.triton.server import free_ports

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "sinfo")
START_TIMEOUT = 60.0
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def require_slurm() -> None:
    """Skip (with the reason) where the cluster cannot exist: binaries absent, not root."""
    missing = [b for b in (*DAEMONS, *CLIENTS) if shutil.which(b) is None
               and not Path("/usr/sbin", b).exists()]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing; make system-deps "
                    "installs the slurm-wlm and munge packages)")
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster runs slurmd as root (SlurmdUser=root) and munged "
                    "as user munge, which needs root")


def slurm_conf(root: Path, ctld_port: int, node_port: int, host: str) -> str:
    """slurm.conf of a one-node cluster living entirely under `root`."""
    return f"""\
ClusterName=cmctest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={node_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root / "munge" / "munge.socket"}
CredType=cred/munge
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd.pid"}
SlurmctldLogFile={root / "log" / "slurmctld.log"}
SlurmdLogFile={root / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=5
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} State=UNKNOWN
PartitionName=cmc Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """munged + slurmctld + slurmd; `run` calls a client (sbatch, scontrol...) against it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True)
        munge = self.root / "munge"
        munge.mkdir(mode=0o755)
        shutil.chown(munge, "munge", "munge")
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        shutil.chown(key, "munge", "munge")
        ctld_port, node_port = free_ports(2)
        self.conf.write_text(slurm_conf(self.root, ctld_port, node_port,
                                        socket.gethostname().split(".")[0]))
        self._spawn("munged", ["munged", "--foreground", f"--socket={munge / 'munge.socket'}",
                               f"--key-file={key}", f"--pid-file={munge / 'munged.pid'}",
                               f"--log-file={munge / 'munged.log'}",
                               f"--seed-file={munge / 'munged.seed'}"], user="munge")
        self._wait("munge socket", lambda: (munge / "munge.socket").exists())
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait("the node to be idle", lambda: self.node_state() == "IDLE")

    def _spawn(self, name: str, argv: list[str], user: str | None = None) -> None:
        log = (self.root / "log" / f"{name}.out").open("wb")
        self.processes[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.root, env=self.env, user=user, group=user,
            extra_groups=[] if user else None)
        log.close()

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float = START_TIMEOUT
              ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.processes.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited while waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.logs()}")

    def logs(self) -> str:
        """The tail of every daemon's log (for failure messages)."""
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-15:]
                parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def run(self, *argv: str, env: dict[str, str] | None = None) -> str:
        """A Slurm client command against this cluster; its stdout (raises on failure)."""
        done = subprocess.run(argv, env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                               f"{done.stderr.strip()}")
        return done.stdout

    def node_state(self) -> str:
        try:
            out = self.run("sinfo", "--noheader", "--format=%T")
        except (RuntimeError, subprocess.TimeoutExpired):
            return ""
        return out.strip().upper().rstrip("*~#")

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Submit; the job id (without cluster name)."""
        return self.run("sbatch", "--parsable", *args, env=env).strip().split(";")[0]

    def tasks(self, job: str) -> dict[str, dict[str, str]]:
        """Every task of job `job` (an array's tasks by index, else the job under its id) as
        scontrol reports it: JobState, ExitCode, Restarts..."""
        out = self.run("scontrol", "--oneliner", "show", "job", job)
        found = {}
        for line in out.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if fields:
                found[fields.get("ArrayTaskId") or fields["JobId"]] = fields
        return found

    def wait_ended(self, job: str, timeout: float = 180.0) -> dict[str, dict[str, str]]:
        """Wait until every task of `job` is in a final state; their scontrol records."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tasks = self.tasks(job)
            if tasks and all(t["JobState"] in FINAL_STATES for t in tasks.values()):
                return tasks
            time.sleep(0.2)
        raise RuntimeError(f"job {job} did not end within {timeout:.0f} s: {self.tasks(job)}\n"
                           f"{self.logs()}")

    def close(self) -> None:
        """Cancel what still runs, then stop slurmd, slurmctld and munged (in that order)."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env,
                           capture_output=True, timeout=30, check=False)
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.processes.get(name)
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """One cluster for the session, stopped at its end (its folder removed)."""
    require_slurm()
    root = Path(tempfile.mkdtemp(prefix="cmc-slurm-", dir="/tmp"))
    root.chmod(0o755)  # munged checks that every folder above its socket is traversable
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)
