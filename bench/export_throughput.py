"""Patch throughput of the exported graphs against PyTorch eager, on the same batch.

    .venv/bin/python bench/export_throughput.py [--presets tiny,small] [--batch 2] [--repeats 3]

Random-initialised networks of the named presets (speed does not depend on the weights),
fused mode (two encoders: the heaviest graph). Prints a markdown table: seconds per batch,
patches per second and the speed-up over torch eager, with the CPU model and thread count.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import torch

from cmc_export.fp16 import convert_fp16
from cmc_export.gate_inputs import random_patches
from cmc_export.onnx_export import onnxruntime_runner, trace_to_onnx
from cmc_export.openvino_export import export_openvino, openvino_runner, unsupported_reason
from cmc_export.patch_graph import GRAPH_INPUTS, patch_graph, torch_runner
from cmc_train.config import model_config
from cmc_train.network import build_cmc

Runner = Callable[[Mapping[str, np.ndarray]], np.ndarray]
MODE = "fused"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def seconds_per_batch(run: Runner, batch: Mapping[str, np.ndarray], repeats: int) -> float:
    """Median wall time of `repeats` runs after one warm-up run."""
    run(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def runners(preset: str, folder: Path, threads: int,
            batch: int) -> dict[tuple[str, str], Runner | str]:
    """(runtime, precision) -> runner, or the reason it cannot run here."""
    torch.manual_seed(0)
    net = build_cmc(model_config(preset, num_classes=5)).eval()
    graph = patch_graph(net, MODE)
    model = trace_to_onnx(graph, MODE, net.cfg.img_size)
    fp32, fp16 = folder / f"{preset}_fp32.onnx", folder / f"{preset}_fp16.onnx"
    onnx.save_model(model, str(fp32))
    onnx.save_model(convert_fp16(model), str(fp16))
    xml = folder / f"{preset}_fp32.xml"
    export_openvino(fp32, xml, {})
    table: dict[tuple[str, str], Runner | str] = {
        ("torch eager", "fp32"): torch_runner(graph),
        ("onnxruntime", "fp32"): onnxruntime_runner(fp32, threads),
        ("onnxruntime", "fp16"): onnxruntime_runner(fp16, threads),
    }
    for precision in ("fp32", "bf16"):
        reason = unsupported_reason(precision)
        table[("openvino", precision)] = reason or openvino_runner(
            xml, precision, GRAPH_INPUTS[MODE], batch, threads)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cmc-bench-") as tmp:
        for preset in args.presets.split(","):
            size = model_config(preset, num_classes=5).img_size
            batch = random_patches(MODE, size, args.batch)
            baseline = None
            for (runtime, precision), run in runners(preset, Path(tmp), threads,
                                                           args.batch).items():
                if isinstance(run, str):
                    rows.append(f"| {preset} ({size}^3) | {runtime} | {precision} | - | - | "
                                f"skipped: {run.split(': ', 1)[-1]} |")
                    continue
                seconds = seconds_per_batch(run, batch, args.repeats)
                baseline = baseline or seconds
                rows.append(f"| {preset} ({size}^3) | {runtime} | {precision} | {seconds:.3f} | "
                            f"{args.batch / seconds:.2f} | {baseline / seconds:.2f}x |")
    print(f"Patch throughput, {MODE} mode, batch {args.batch}, median of {args.repeats} "
          f"after 1 warm-up; {cpu_model()}, {threads} threads\n")
    print("| config | runtime | precision | s / batch | patches / s | vs torch eager |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
