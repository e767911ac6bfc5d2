"""OpenVINO patch runtime (CPU, fp32, or bf16 / fp16 where the CPU has them natively).

OpenVINO reads the exported IR (.xml/.bin) or the ONNX graph directly and segments faster
than ONNX Runtime on a CPU (BENCHMARKS.md, engine section). bf16
and fp16 are inference-precision hints on the fp32 graph; OpenVINO accepts a hint on CPUs
without native support and quietly runs another (fp32; bf16 for an fp16 hint on a CPU with
AVX512-BF16 only), so we check the CPU's capabilities and
refuse instead (`unsupported_reason`, also what `cmc export` skips a precision for).

The graph is compiled for one tile at a time: OpenVINO's CPU plugin picks its kernels
for a static shape once, where a dynamic batch axis costs it speed (BENCHMARKS.md,
static vs dynamic shapes). The tiles of a batch are
queued over the plugin's optimal number of infer requests (one per CPU stream), so the
streams run tiles concurrently. Plain requests, not an `AsyncInferQueue` with a Python
callback: destroying such a queue can deadlock on the GIL with the thread that ran the
callback (seen in our tests under load).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cmc_common.contract import Device, Precision, Runtime
from cmc_common.errors import one_line
from cmc_serve.errors import RuntimeUnavailable
from cmc_serve.model_dir import ModelFileError
from cmc_serve.runtimes.base import check_batch, check_outputs
from cmc_serve.runtimes.signal_stack import own_signal_stack

log = logging.getLogger(__name__)

# An int8 IR carries its own quantised layers; the rest of it runs in fp32 on every CPU
# (VNNI / AMX-INT8 make it fast, without them it still runs), so int8 needs no capability.
OV_PRECISION: dict[str, str] = {Precision.FP32: "f32", Precision.BF16: "bf16",
                                Precision.FP16: "f16", Precision.INT8: "f32"}
CAPABILITY: dict[str, str] = {Precision.FP32: "FP32", Precision.BF16: "BF16",
                              Precision.FP16: "FP16"}


@functools.cache
def cpu_capabilities() -> tuple[str, tuple[str, ...]]:
    """The CPU's name and OpenVINO's OPTIMIZATION_CAPABILITIES for it: the one place cmc asks
    which precisions this CPU runs natively (export, serving and the Triton patch model all
    go through `unsupported_reason`), so a test can play another kind of host here. Asked
    once per process (an `ov.Core()` each time cost about 7 ms, asked per mode and graph)."""
    import openvino as ov  # type: ignore[import-untyped,unused-ignore]

    core = ov.Core()
    return (str(core.get_property("CPU", "FULL_DEVICE_NAME")),
            tuple(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")))


def unsupported_reason(precision: str) -> str | None:
    """Why OpenVINO cannot run `precision` natively on this CPU, or None if it can."""
    try:
        import openvino  # type: ignore[import-untyped,unused-ignore]  # noqa: F401
    except ImportError as exc:
        return f"openvino is not installed ({exc})"
    if precision not in OV_PRECISION:
        return f"OpenVINO has no {precision} inference precision on CPU"
    if precision not in CAPABILITY:
        return None
    name, capabilities = cpu_capabilities()
    if CAPABILITY[precision] not in capabilities:
        return (f"OpenVINO {precision}: this CPU ({name}) has no native {precision} "
                f"(capabilities {', '.join(capabilities)}); it would silently run another "
                "precision")
    return None


class OpenVinoRuntime:
    """One IR or ONNX graph compiled for the OpenVINO CPU plugin."""

    name: str = Runtime.OPENVINO
    device: str = Device.CPU

    def __init__(self, path: Path, *, inputs: tuple[str, ...], output: str, precision: str,
                 max_batch: int, num_threads: int | None = None) -> None:
        reason = unsupported_reason(precision)
        if reason:
            raise RuntimeUnavailable(reason)
        import openvino as ov  # type: ignore[import-untyped,unused-ignore]

        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises plain RuntimeError subclasses
            # a file problem, not "cannot run here": never a reason for auto to fall back
            raise ModelFileError(f"{path}: openvino cannot read the graph "
                                 f"({one_line(exc)})") from exc
        names = {n for port in model.inputs for n in port.get_names()}
        outs = {n for port in model.outputs for n in port.get_names()}
        if not set(inputs) <= names or output not in outs:
            raise RuntimeUnavailable(f"{path}: graph I/O {sorted(names)} -> {sorted(outs)} does "
                                     f"not match cmc.json ({list(inputs)} -> {output})")
        model.reshape({port.get_any_name(): one_tile_shape(port.get_partial_shape())
                       for port in model.inputs})
        threads = num_threads or os.cpu_count() or 1
        config = {"INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
                  "INFERENCE_NUM_THREADS": threads,
                  "PERFORMANCE_HINT": "THROUGHPUT"}
        self._compiled: Any = core.compile_model(model, "CPU", config)
        jobs = max(1, int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._requests: list[Any] = [self._compiled.create_infer_request() for _ in range(jobs)]
        own_signal_stack()  # the plugin may have installed one it frees with this graph
        self.inputs = inputs
        self.output = output
        offered = sorted(outs)  # every name of every output port (a port may have several)
        self.outputs = (output, *(n for n in offered if n != output))
        self.precision = precision
        self.max_batch = max_batch
        log.info("openvino %s: %s on CPU, %s, %d threads, %d infer requests", ov.__version__,
                 path.name, OV_PRECISION[precision], threads, jobs)

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.run_outputs(inputs, (self.output,))[0]

    def run_outputs(self, inputs: dict[str, np.ndarray],
                    names: Sequence[str]) -> list[np.ndarray]:
        if self._compiled is None:
            raise RuntimeError("openvino: run() after close()")
        n = check_batch(inputs, self.inputs, self.max_batch, self.name)
        check_outputs(names, self.outputs, self.name)
        # Tile `row` goes to request `row % jobs`; that request last ran tile `row - jobs`,
        # the oldest one still running, so collecting before reuse keeps the tiles in order.
        jobs = len(self._requests)
        batch: list[np.ndarray] = []
        for row in range(n):
            request = self._requests[row % jobs]
            if row >= jobs:
                self._collect(request, names, row - jobs, n, batch)
            request.start_async({k: np.ascontiguousarray(v[row:row + 1], dtype=np.float32)
                                 for k, v in inputs.items()})
        for row in range(max(0, n - jobs), n):
            self._collect(self._requests[row % jobs], names, row, n, batch)
        return batch

    @staticmethod
    def _collect(request: Any, names: Sequence[str], row: int, n: int,
                 batch: list[np.ndarray]) -> None:
        """Wait for `request`, which ran tile `row` (tiles are collected in order), and copy
        its named outputs into row `row` of `batch`'s arrays, allocated at tile 0: one copy
        out of the request's buffers and none to assemble the batch (the outputs are
        three probability volumes per tile with quality control on)."""
        request.wait()
        for i, name in enumerate(names):
            data = request.get_tensor(name).data
            if row == 0:
                batch.append(np.empty((n, *data.shape[1:]), np.float32))
            batch[i][row] = data[0]

    def close(self) -> None:
        self._requests = []
        self._compiled = None
        own_signal_stack()  # the plugin put back whichever stack it found, maybe freed


def one_tile_shape(shape: Any) -> Any:
    """`shape` (an OpenVINO PartialShape) with its batch axis fixed to one tile."""
    fixed = shape.__class__(shape)
    fixed[0] = 1
    return fixed
