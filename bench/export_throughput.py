"""Patch throughput of the exported graphs against PyTorch eager, on the same batch.

    .venv/bin/python bench/export_throughput.py [--presets tiny,small] [--batch 2] [--repeats 5]

Random-initialised networks of the named presets (speed does not depend on the weights),
fused mode (two encoders: the heaviest graph). The runtimes take turns, one batch each per
round, so that a change in the machine's speed (shared hosts drift by 1.5x within minutes)
hits them all alike. Prints a markdown table: median seconds per batch, patches per second
and the speed-up over torch eager, with the CPU model and thread count.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import torch

from cmc_common.contract import MODE_INPUTS
from cmc_export.fp16 import convert_fp16
from cmc_export.gate_inputs import random_patches
from cmc_export.onnx_export import onnxruntime_runner, trace_to_onnx
from cmc_export.openvino_export import export_openvino, openvino_runner, unsupported_reason
from cmc_export.patch_graph import patch_graph, torch_runner
from cmc_train.config import model_config
from cmc_train.network import build_cmc

Runner = Callable[[Mapping[str, np.ndarray]], np.ndarray]
K = TypeVar("K")
MODE = "fused"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def seconds_per_batch(runs: Mapping[K, Runner], batch: Mapping[str, np.ndarray],
                      repeats: int) -> dict[K, float]:
    """Median wall time per runner over `repeats` rounds (each runner once per round), after
    one warm-up run each."""
    for run in runs.values():
        run(batch)
    times: dict[K, list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            run(batch)
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


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
            xml, precision, MODE_INPUTS[MODE], batch, threads)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cmc-bench-") as tmp:
        for preset in args.presets.split(","):
            size = model_config(preset, num_classes=5).img_size
            batch = random_patches(MODE, size, args.batch)
            table = runners(preset, Path(tmp), threads, args.batch)
            seconds = seconds_per_batch({k: r for k, r in table.items() if not isinstance(r, str)},
                                        batch, args.repeats)
            baseline = seconds[("torch eager", "fp32")]
            for (runtime, precision), run in table.items():
                if isinstance(run, str):
                    rows.append(f"| {preset} ({size}^3) | {runtime} | {precision} | - | - | "
                                f"skipped: {run.split(': ', 1)[-1]} |")
                    continue
                took = seconds[(runtime, precision)]
                rows.append(f"| {preset} ({size}^3) | {runtime} | {precision} | {took:.3f} | "
                            f"{args.batch / took:.2f} | {baseline / took:.2f}x |")
    print(f"Patch throughput, {MODE} mode, batch {args.batch}, median of {args.repeats} rounds "
          f"(runtimes in turn) after 1 warm-up each; {cpu_model()}, {threads} threads\n")
    print("| config | runtime | precision | s / batch | patches / s | vs torch eager |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
