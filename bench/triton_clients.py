"""The client side of bench/triton_throughput.py: N client processes segmenting at once.

Each client runs in its own interpreter (spawned: no forked gRPC state), connects and
checks the served model, then waits at a barrier, so only segmentation is timed; the
parent reads the wall time from the barrier to the last client's end, the labels, and the
whole machine's CPU busy share meanwhile (/proc/stat).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Callable
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import numpy as np

# bench/engine.py's synthetic pre-processed volume (this folder is sys.path[0], and spawned
# clients inherit sys.path).
from engine import synthetic_case

MODE = "fused"
CONNECT_TIMEOUT_S = 300.0  # client processes import, connect and reach the barrier
CASE_TIMEOUT_S = 900.0  # one case on a heavily shared 2-core machine


class BenchError(RuntimeError):
    """A configuration could not be measured (a client failed; the message says why)."""


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, from /proc/stat's `cpu` line.

    System-wide on purpose: the server, its python-backend stubs and the clients are
    separate processes, and the question is whether any core was left idle."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_since(start: tuple[int, int]) -> float:
    busy, total = cpu_jiffies()
    return (busy - start[0]) / max(1, total - start[1])


def open_client(kind: str, url: str, model_dir: str
                ) -> tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], Callable[[], None]]:
    """(segment(image_a, image_b) -> labels, close) of a connected, checked client."""
    if kind == "volume":
        from cmc_serve.model_dir import ModelInfo
        from cmc_serve.triton.client import TritonVolumeClient

        volume = TritonVolumeClient(url, ModelInfo.load(Path(model_dir)).name)

        def on_server(image_a: np.ndarray, image_b: np.ndarray) -> np.ndarray:
            return volume.segment(image_a, image_b).labels

        return on_server, volume.close
    from cmc_serve.engine import Segmenter

    segmenter = Segmenter(model_dir, runtime="triton", server=url)
    segmenter.runtime_for(MODE)  # connect and check the served model before timing

    def client_side(image_a: np.ndarray, image_b: np.ndarray) -> np.ndarray:
        return segmenter.segment(image_a, image_b, mode=MODE).labels

    return client_side, segmenter.close


def client_process(kind: str, url: str, model_dir: str, size: int, cases: int,
                   barrier: Barrier, results: Any) -> None:
    """One client (own interpreter): connect, wait at the barrier, segment `cases` times."""
    close: Callable[[], None] | None = None
    try:
        image_a, image_b = synthetic_case((size,) * 3)
        segment, close = open_client(kind, url, model_dir)
        barrier.wait(CONNECT_TIMEOUT_S)
        start = time.monotonic()
        labels = [segment(image_a, image_b) for _ in range(cases)][-1]
        results.put((start, time.monotonic(), labels))
    except BaseException as exc:  # reported to the parent, which names the configuration
        barrier.abort()
        results.put(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    finally:
        if close is not None:
            close()


def run_clients(kind: str, url: str, model_dir: Path, size: int, clients: int,
                cases: int) -> tuple[float, list[np.ndarray], float]:
    """Wall time of `clients` processes segmenting `cases` cases in all, their labels and the
    machine's CPU busy fraction meanwhile."""
    context = mp.get_context("spawn")  # fresh interpreters: no forked gRPC state
    barrier = context.Barrier(clients + 1)
    results = context.Queue()
    processes = [context.Process(target=client_process, daemon=True, args=(
        kind, url, str(model_dir), size, cases // clients, barrier, results))
        for _ in range(clients)]
    where = f"{kind} tiling, {clients} client(s)"
    try:
        for process in processes:
            process.start()
        watcher = threading.Thread(target=abort_on_death, args=(processes, barrier), daemon=True)
        watcher.start()
        try:
            barrier.wait(CONNECT_TIMEOUT_S)
        except threading.BrokenBarrierError:
            raise BenchError(f"{where}: {first_error(results, clients)}") from None
        cpu_start = cpu_jiffies()
        outcomes = []
        for _ in processes:
            try:
                outcomes.append(results.get(timeout=CASE_TIMEOUT_S * cases))
            except queue.Empty:
                raise BenchError(f"{where}: no result within {CASE_TIMEOUT_S * cases:.0f} s")\
                    from None
        cpu_busy = busy_since(cpu_start)
        errors = [o for o in outcomes if isinstance(o, str)]
        if errors:
            raise BenchError(f"{where}: {errors[0]}")
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()
    wall = max(o[1] for o in outcomes) - min(o[0] for o in outcomes)
    return wall, [o[2] for o in outcomes], cpu_busy


def abort_on_death(processes: list[Any], barrier: Barrier) -> None:
    """Break the barrier as soon as a client dies without a word (e.g. at import), instead
    of letting the others wait out CONNECT_TIMEOUT_S."""
    while any(p.exitcode is None for p in processes):
        if any(p.exitcode not in (None, 0) for p in processes):
            barrier.abort()
            return
        time.sleep(0.2)


def first_error(results: Any, clients: int) -> str:
    """The message of the client that broke the barrier (or a timeout if none did)."""
    for _ in range(clients):
        try:
            outcome = results.get(timeout=10)
        except queue.Empty:
            break
        if isinstance(outcome, str):
            return outcome
    return f"clients not connected within {CONNECT_TIMEOUT_S:.0f} s"
