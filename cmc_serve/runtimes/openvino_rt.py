"""OpenVINO patch runtime (CPU, fp32 or bf16).

OpenVINO reads the exported IR (.xml/.bin) or the ONNX graph directly; on our AVX-512 CPU
it segments 1.7x faster than ONNX Runtime end to end (BENCHMARKS.md, tiny network). bf16
is an inference-precision hint on the fp32 graph; OpenVINO accepts the hint on CPUs
without native bf16 and quietly runs fp32, so we check the CPU's capabilities and refuse
instead. A batch is split over the plugin's
optimal number of infer requests (one per CPU stream), started together so the streams
run tiles concurrently. Plain requests, not an `AsyncInferQueue` with a Python callback:
destroying such a queue can deadlock on the GIL with the thread that ran the callback
(seen in our tests under load).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from cmc_serve.runtimes.base import RuntimeUnavailable, check_batch

log = logging.getLogger(__name__)

OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}


class OpenVinoRuntime:
    """One IR or ONNX graph compiled for the OpenVINO CPU plugin."""

    name = "openvino"
    device = "cpu"

    def __init__(self, path: Path, *, inputs: tuple[str, ...], output: str, precision: str,
                 max_batch: int, num_threads: int | None = None) -> None:
        try:
            import openvino as ov  # type: ignore[import-untyped,unused-ignore]
        except ImportError as exc:
            raise RuntimeUnavailable(f"openvino is not installed ({exc})") from exc
        if precision not in OV_PRECISION:
            raise RuntimeUnavailable(f"openvino on CPU runs fp32 or bf16, not {precision}")
        core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise RuntimeUnavailable(
                f"this CPU ({core.get_property('CPU', 'FULL_DEVICE_NAME')}) has no native bf16; "
                "OpenVINO would silently run fp32: use precision fp32")
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises plain RuntimeError subclasses
            raise RuntimeUnavailable(f"{path}: openvino cannot read the graph ({exc})") from exc
        names = {n for port in model.inputs for n in port.get_names()}
        outs = {n for port in model.outputs for n in port.get_names()}
        if not set(inputs) <= names or output not in outs:
            raise RuntimeUnavailable(f"{path}: graph I/O {sorted(names)} -> {sorted(outs)} does "
                                     f"not match cmc.json ({list(inputs)} -> {output})")
        threads = num_threads or os.cpu_count() or 1
        config = {"INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
                  "INFERENCE_NUM_THREADS": threads,
                  "PERFORMANCE_HINT": "THROUGHPUT"}
        self._compiled: Any = core.compile_model(model, "CPU", config)
        jobs = max(1, int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._requests: list[Any] = [self._compiled.create_infer_request() for _ in range(jobs)]
        self.inputs = inputs
        self.output = output
        self.precision = precision
        self.max_batch = max_batch
        self.jobs = jobs
        log.info("openvino %s: %s on CPU, %s, %d threads, %d infer requests", ov.__version__,
                 path.name, OV_PRECISION[precision], threads, jobs)

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if self._compiled is None:
            raise RuntimeError("openvino: run() after close()")
        n = check_batch(inputs, self.inputs, self.max_batch, self.name)
        chunks = np.array_split(np.arange(n), min(self.jobs, n))
        busy = self._requests[:len(chunks)]
        for request, rows in zip(busy, chunks, strict=True):
            feed = {k: np.ascontiguousarray(v[rows[0]:rows[-1] + 1], dtype=np.float32)
                    for k, v in inputs.items()}
            request.start_async(feed)
        outputs = []
        for request in busy:
            request.wait()
            outputs.append(np.array(request.get_tensor(self.output).data, dtype=np.float32))
        return np.concatenate(outputs, axis=0)

    def close(self) -> None:
        self._requests = []
        self._compiled = None
