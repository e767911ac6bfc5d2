"""Benchmark: Triton serving throughput against the local engine, on one two-modality volume.

    .venv/bin/python bench/triton_throughput.py [--network cmc-tiny|test-conv] [--size 96]
        [--cases 4] [--clients 1,2,4] [--server-runtime openvino|onnxruntime]

The model is a real export: `cmc-tiny` saves a randomly initialised tiny CMC network as a
checkpoint (speed does not depend on the weights) and runs `cmc_export.exporter.export`
(fused ONNX fp32, python Triton backend, max batch 4); `test-conv` is the one-conv ONNX
graph of the Triton tests (tests/triton_fixture.py), where server overhead dominates. Then,
in this one run and on the same synthetic pre-processed volume:

1. the local `Segmenter` on ONNX Runtime and on OpenVINO (no server running);
2. client-side tiling (`Segmenter(runtime="triton")`: tiles go to the `<name>_patch` model
   over gRPC) with 1, 2, 4 concurrent client processes, with the patch model's dynamic batcher on
   (the exported repository) and off (a copy whose config lacks `dynamic_batching`);
3. server-side tiling (`TritonVolumeClient`: the python BLS volume model) with 1 and 4
   client processes.

Every configuration segments the same number of cases (`--cases`, split evenly over its
clients), each client process in its own interpreter, started and connected before a
barrier so only segmentation is timed (bench/triton_clients.py). Throughput is cases / wall time from the barrier to
the last client's end. Every client's labels are compared with the local ONNX Runtime
labels. CPU busy is the fraction of all cores' time spent busy (by any process, from
/proc/stat) while a configuration ran: near 100 % with one client means more clients have
no cores left to fill. Prints the CPU, thread counts, load average, a markdown table with
the ratios (N clients vs 1, Triton vs local ONNX Runtime), the verdicts (Triton vs the
local engine on the same runtime, target within 5 %; most clients vs 1) and the command;
progress goes to stderr as it runs, and the rows, with the host's CPU model and features,
to docs/benchmarks/perf_<cpu>.json (`triton_throughput`). The server listens on 127.0.0.1
only and is stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

# Sibling modules (this script's folder is sys.path[0]): bench/engine.py's synthetic
# pre-processed volume, the host's CPU and the perf_<cpu>.json rows, the client processes.
from engine import synthetic_case
from host_info import cpu_info, update_perf_rows
from triton_clients import MODE, BenchError, busy_since, cpu_jiffies, run_clients

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 5
MAX_BATCH = 4
FEATURES = ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16",
            "amx_int8")
CLIENT_SIDE = "Triton, client-side tiling"
REMOTE_TARGET = 0.05  # issue 29: Triton client-side tiling within 5 % of the local engine


@dataclass(frozen=True)
class Measurement:
    """One row of the table: what ran, how much and how fast, and whether it was right."""

    path: str
    runtime: str
    batching: str
    clients: int
    cases: int
    wall_s: float
    tiles_per_case: int
    agreement: float | None  # fraction of voxels equal to the local ONNX Runtime labels
    cpu_busy: float  # fraction of all cores' time spent busy (any process) while timed

    @property
    def cases_per_min(self) -> float:
        return 60.0 * self.cases / self.wall_s

    @property
    def tiles_per_s(self) -> float:
        return self.cases * self.tiles_per_case / self.wall_s


# --- the model ---------------------------------------------------------------------------

def export_tiny_cmc(root: Path) -> Path:
    """Checkpoint of a random tiny CMC network -> `cmc export` (fused ONNX fp32, python)."""
    import torch

    from cmc_export.exporter import export
    from cmc_train.checkpoint import build_metadata, save_checkpoint
    from cmc_train.config import PreprocessConfig, model_config
    from cmc_train.network import build_cmc

    config = model_config("tiny", CLASSES)
    torch.manual_seed(0)
    net = build_cmc(config).eval()
    metadata = build_metadata(config, PreprocessConfig(), [f"class{i}" for i in range(CLASSES)],
                              {"steps": 0, "seed": 0})
    checkpoint = root / "tiny.pt"
    save_checkpoint(checkpoint, net.state_dict(), metadata)
    out = root / "model"
    export(checkpoint, out, formats=("onnx",), precisions=("fp32",), modes=(MODE,),
           max_batch=MAX_BATCH, triton_backend="python", log=lambda line: None)
    return out


def test_conv_model(root: Path) -> Path:
    """The Triton tests' exported-like model directory (one 3x3x3 conv, 16^3 patches)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from triton_fixture import write_model_dir

    return write_model_dir(root / "model")


NETWORKS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "cmc-tiny": ("tiny CMC network (random init), exported by cmc_export.exporter.export",
                 export_tiny_cmc),
    "test-conv": ("the Triton tests' one-conv ONNX graph (tests/triton_fixture.py)",
                  test_conv_model),
}


def edit_patch_config(repository: Path, model: str, batching: bool, runtime: str) -> None:
    """Switch the patch model's dynamic batcher off (or keep it) and choose its runtime;
    the config is edited as a protobuf, not as text."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = repository / model / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    if not batching:
        config.ClearField("dynamic_batching")
    config.parameters["runtime"].string_value = runtime  # OpenVINO reads the ONNX graph
    path.write_text(text_format.MessageToString(config))


# --- the measurements --------------------------------------------------------------------

def agreement(labels: list[np.ndarray], reference: np.ndarray) -> float:
    return min(float((lab == reference).mean()) for lab in labels)


def measure_local(model_dir: Path, image_a: np.ndarray, image_b: np.ndarray, cases: int,
                  tiles: int) -> tuple[list[Measurement], np.ndarray]:
    """The local engine on ONNX Runtime and OpenVINO; returns the rows and ORT's labels."""
    from cmc_serve.engine import Segmenter

    rows = []
    reference: np.ndarray | None = None
    for runtime in ("onnxruntime", "openvino"):
        with Segmenter(model_dir, runtime=runtime) as segmenter:
            patch_runtime = segmenter.runtime_for(MODE)  # load / compile outside the timing
            zeros = np.zeros((patch_runtime.max_batch, 1, *segmenter.model.patch_size), np.float32)
            patch_runtime.run({"image_a": zeros, "image_b": zeros})  # as warm_up() does for Triton
            start, cpu_start = time.monotonic(), cpu_jiffies()
            for _ in range(cases):
                labels = segmenter.segment(image_a, image_b, mode=MODE).labels
            wall, cpu_busy = time.monotonic() - start, busy_since(cpu_start)
        reference = labels if reference is None else reference
        print(f"  local {runtime}: {cases} cases in {wall:.1f} s", file=sys.stderr, flush=True)
        rows.append(Measurement("local Segmenter", runtime, "-", 1, cases, wall, tiles,
                                agreement([labels], reference), cpu_busy))
    assert reference is not None
    return rows, reference


def warm_up(url: str, model_dir: Path, volume_model: bool) -> None:
    """One full batch through the patch model (and a one-tile volume) before any timing."""
    from cmc_serve.model_dir import ModelInfo
    from cmc_serve.triton.client import TritonPatchRuntime, TritonVolumeClient

    info = ModelInfo.load(model_dir)
    runtime = TritonPatchRuntime(url, info, MODE)
    try:
        tiles = np.zeros((runtime.max_batch, 1, *info.patch_size), np.float32)
        runtime.run({"image_a": tiles, "image_b": tiles})
    finally:
        runtime.close()
    if volume_model:
        client = TritonVolumeClient(url, info.name)
        try:
            cube = np.zeros(tuple(info.patch_size), np.float32)
            client.segment(cube, cube)
        finally:
            client.close()


def measure_triton(repository: Path, model_dir: Path, size: int, cases: int,
                   plan: list[tuple[str, int]], runtime: str, batching: str, tiles: int,
                   reference: np.ndarray, models: list[str]) -> list[Measurement]:
    """Start one server on loopback and run each (kind, clients) of `plan` against it."""
    from cmc_serve.triton.server import TritonServer, TritonServerError

    log: list[str] = []  # kept for the error message only
    server = TritonServer(repository, models=models, log=log.append, ready_timeout_s=600)
    rows = []
    try:
        server.start()
        url = f"grpc://{server.grpc_url}"
        warm_up(url, model_dir, any(kind == "volume" for kind, _ in plan))
        for kind, clients in plan:
            print(f"  {kind} tiling, {runtime}, batching {batching}, {clients} client(s) ...",
                  file=sys.stderr, flush=True)
            wall, labels, cpu_busy = run_clients(kind, url, model_dir, size, clients, cases)
            print(f"    {cases} cases in {wall:.1f} s", file=sys.stderr, flush=True)
            path = CLIENT_SIDE if kind == "client" else \
                "Triton, server-side tiling (volume model)"
            rows.append(Measurement(path, runtime, batching, clients, cases, wall, tiles,
                                    agreement(labels, reference), cpu_busy))
    except TritonServerError as exc:
        raise BenchError(str(exc)) from exc
    finally:
        server.stop()
    return rows


# --- report ------------------------------------------------------------------------------

def table(rows: list[Measurement]) -> list[str]:
    """Markdown rows with the ratios to the same path's 1-client row and to local ORT."""
    local = next(r for r in rows if r.path.startswith("local") and r.runtime == "onnxruntime")
    single = {(r.path, r.runtime, r.batching): r for r in rows if r.clients == 1}
    lines = ["| path | runtime | dyn. batching | clients | cases | wall s | cases/min | tiles/s "
             "| x vs 1 client | x vs local ORT | labels = local ORT | CPU busy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = single.get((r.path, r.runtime, r.batching))
        vs_one = f"{r.tiles_per_s / base.tiles_per_s:.2f}" if base and base is not r else "1.00"
        same = "-" if r.agreement is None else f"{100 * r.agreement:.3f}%"
        lines.append(f"| {r.path} | {r.runtime} | {r.batching} | {r.clients} | {r.cases} | "
                     f"{r.wall_s:.1f} | {r.cases_per_min:.2f} | {r.tiles_per_s:.1f} | {vs_one} | "
                     f"{r.tiles_per_s / local.tiles_per_s:.2f} | {same} | "
                     f"{100 * r.cpu_busy:.0f}% |")
    return lines


def verdict(rows: list[Measurement], target: float) -> list[str]:
    """4 (most) clients vs 1 per Triton path, against the issue's target."""
    lines = []
    triton = [r for r in rows if r.path.startswith("Triton")]
    for key in dict.fromkeys((r.path, r.batching) for r in triton):
        group = [r for r in triton if (r.path, r.batching) == key]
        one = next((r for r in group if r.clients == 1), None)
        most = max(group, key=lambda r: r.clients)
        if one is None or most is one:
            continue
        ratio = most.tiles_per_s / one.tiles_per_s
        lines.append(f"- {key[0]} (batching {key[1]}): {most.clients} clients = {ratio:.2f}x "
                     f"1 client: target >= {target}x {'MET' if ratio >= target else 'NOT met'}")
    return lines


def remote_ratio(rows: list[Measurement]) -> float | None:
    """Wall time per case of Triton client-side tiling (1 client, batching on) over the
    local engine's on the server's runtime: the price of serving, 1.0 = none."""
    one = next((r for r in rows if r.path == CLIENT_SIDE and r.clients == 1
                and r.batching == "on"), None)
    local = next((r for r in rows if r.path.startswith("local")
                  and one is not None and r.runtime == one.runtime), None)
    return None if one is None or local is None else \
        round(local.cases_per_min / one.cases_per_min, 4)


def remote_verdict(rows: list[Measurement]) -> str:
    ratio = remote_ratio(rows)
    if ratio is None:
        return "- Triton vs local: no 1-client client-side row"
    met = "MET" if ratio <= 1 + REMOTE_TARGET else "NOT met"
    return (f"- Triton client-side tiling, 1 client: {ratio:.3f}x the local engine's time per "
            f"case: target <= {1 + REMOTE_TARGET:.2f}x {met}")


def thread_summary() -> str:
    import onnxruntime
    import openvino

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{os.cpu_count()} logical CPUs ({cores} usable); ONNX Runtime "
            f"{onnxruntime.__version__} intra-op threads: default (one per physical core); "
            f"OpenVINO {openvino.__version__} INFERENCE_NUM_THREADS={os.cpu_count()}; "
            f"the server, its python-backend stubs and all client processes share these")


def parse_clients(text: str) -> list[int]:
    values = sorted({int(v) for v in text.split(",") if v.strip()})
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"--clients wants positive integers, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=sorted(NETWORKS), default="cmc-tiny")
    parser.add_argument("--size", type=int, default=96, help="edge of the cubic volume")
    parser.add_argument("--cases", type=int, default=4,
                        help="cases per configuration, split evenly over its clients")
    parser.add_argument("--clients", type=parse_clients, default=[1, 2, 4],
                        help="client counts for client-side tiling (comma-separated)")
    parser.add_argument("--volume-clients", type=parse_clients, default=[1, 4],
                        help="client counts for server-side tiling (comma-separated)")
    parser.add_argument("--server-runtime", choices=("onnxruntime", "openvino"),
                        default="openvino",
                        help="runtime inside the Triton patch model (cmc export prefers openvino)")
    parser.add_argument("--target", type=float, default=1.5,
                        help="wanted throughput of the most clients vs 1 client")
    args = parser.parse_args()
    if args.cases < 1:
        parser.error("--cases must be >= 1")
    bad = [n for n in {*args.clients, *args.volume_clients} if args.cases % n]
    if bad:
        parser.error(f"--cases {args.cases} must be divisible by every client count ({bad})")

    from cmc_common.contract import patch_model_name
    from cmc_serve.model_dir import ModelInfo
    from cmc_serve.tiling import TileGrid
    from cmc_serve.triton.server import TritonInstall, TritonSetupError

    try:
        TritonInstall.locate()
    except TritonSetupError as exc:
        sys.exit(f"error: {exc}")
    started = time.monotonic()
    load_before = os.getloadavg()
    description, build = NETWORKS[args.network]
    work = Path(tempfile.mkdtemp(prefix="cmc_bench_triton_"))
    try:
        print(f"building the model: {description} ...", file=sys.stderr, flush=True)
        model_dir = build(work)
        info = ModelInfo.load(model_dir)
        patch_model = patch_model_name(info.name, MODE)
        # Served copies: cmc.json records the sizes of the export's files, so the model
        # directory itself stays as exported.
        batched, unbatched = work / "repository_batch", work / "repository_nobatch"
        shutil.copytree(model_dir / "repository", batched)
        shutil.copytree(model_dir / "repository", unbatched)
        edit_patch_config(batched, patch_model, batching=True, runtime=args.server_runtime)
        edit_patch_config(unbatched, patch_model, batching=False, runtime=args.server_runtime)

        image_a, image_b = synthetic_case((args.size,) * 3)
        tiles = len(list(TileGrid.build(image_a.shape, info.patch_size, 0.5).origins()))
        print("local engine ...", file=sys.stderr, flush=True)
        rows, reference = measure_local(model_dir, image_a, image_b, args.cases, tiles)
        plan_on = [("client", n) for n in args.clients] + \
            [("volume", n) for n in args.volume_clients]
        rows += measure_triton(batched, model_dir, args.size, args.cases, plan_on,
                               args.server_runtime, "on", tiles, reference,
                               [patch_model, info.name])
        rows += measure_triton(unbatched, model_dir, args.size, args.cases,
                               [("client", n) for n in args.clients], args.server_runtime,
                               "off", tiles, reference, [patch_model])
    except BenchError as exc:
        sys.exit(f"error: {exc}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cpu, features = cpu_info(FEATURES)
    print(f"CPU: {cpu} ({', '.join(features) or 'none of ' + ', '.join(FEATURES)}); "
          f"{thread_summary()}; python {platform.python_version()}")
    print(f"Load average (1 min) at start {load_before[0]:.1f}, at end {os.getloadavg()[0]:.1f}; "
          f"total run {time.monotonic() - started:.0f} s\n")
    print(f"## Triton throughput: {description}, fused mode, patch "
          f"{'x'.join(map(str, info.patch_size))}, K={info.num_classes}, two-modality "
          f"{args.size}^3 volume, overlap 0.5 ({tiles} tiles/case), gRPC on 127.0.0.1, "
          f"patch model max_batch_size {info.max_batch}\n")
    print("\n".join(table(rows)))
    print("\n" + "\n".join([remote_verdict(rows), *verdict(rows, args.target)]))
    command = f".venv/bin/python {shlex.join(sys.argv)}"
    print(f"\nCommand: {command}")
    saved = update_perf_rows(cpu, lambda document: document.update({"triton_throughput": {
        "host": {"cpu": cpu, "features": features}, "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
        "load_average_start_end": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "volume": args.size, "tiles_per_case": tiles, "remote_vs_local": remote_ratio(rows),
        "rows": [dataclasses.asdict(r) | {"cases_per_min": round(r.cases_per_min, 2)}
                 for r in rows]}}))
    print(f"rows written to {saved.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
