"""ONNX Runtime patch runtime (CPU, CUDA or TensorRT execution provider).

ONNX Runtime silently falls back to the CPU provider when a GPU provider fails to load
(docs/PLATFORM.md: onnxruntime-gpu without a GPU only logs errors), so after creating the
session we check which providers it actually got and refuse a session that is not running
where it was asked to.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cmc_common.contract import Device, Precision, Runtime
from cmc_serve.errors import RuntimeUnavailable
from cmc_serve.runtimes.base import check_batch, check_outputs

log = logging.getLogger(__name__)

# execution provider -> ONNX Runtime provider list, most preferred first; CPU stays last
# for the few ops a GPU provider does not implement (ORT assigns those node by node); a
# device, or ORT's own TensorRT provider.
PROVIDERS = {
    Device.CPU: ["CPUExecutionProvider"],
    Device.CUDA: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class OnnxRuntimeRuntime:
    """One ONNX graph in an `onnxruntime.InferenceSession`."""

    name: str = Runtime.ONNXRUNTIME

    def __init__(self, path: Path, *, inputs: tuple[str, ...], output: str, precision: str,
                 max_batch: int, execution_provider: str = Device.CPU) -> None:
        try:
            import onnxruntime as ort  # type: ignore[import-untyped,unused-ignore]
        except ImportError as exc:
            raise RuntimeUnavailable(f"onnxruntime is not installed ({exc})") from exc
        if execution_provider not in PROVIDERS:
            raise ValueError(f"unknown execution provider {execution_provider!r} "
                             f"(expected one of {sorted(PROVIDERS)})")
        wanted = PROVIDERS[execution_provider]
        primary = wanted[0]
        if primary not in ort.get_available_providers():
            raise RuntimeUnavailable(
                f"onnxruntime {ort.__version__} has no {primary} (available: "
                f"{ort.get_available_providers()}); install onnxruntime-gpu on a CUDA host")
        providers: list[Any] = list(wanted)
        if execution_provider == "tensorrt":
            providers[0] = (primary, {"trt_fp16_enable": precision == Precision.FP16})
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if execution_provider == Device.CPU:
            # The memory pattern pre-plans one block for every intermediate of a run and keeps
            # it: about twice the memory per tile for no speed (BENCHMARKS.md, peak RSS).
            opts.enable_mem_pattern = False
        try:
            self._session: Any = ort.InferenceSession(str(path), sess_options=opts,
                                                 providers=providers)
        except Exception as exc:  # ORT raises its own exception types per failure
            raise RuntimeUnavailable(f"{path}: onnxruntime cannot load the graph ({exc})") from exc
        got = self._session.get_providers()
        if primary not in got:
            raise RuntimeUnavailable(
                f"{path}: onnxruntime fell back to {got} although {primary} was requested")
        names = tuple(i.name for i in self._session.get_inputs())
        if set(names) != set(inputs) or output not in {o.name for o in self._session.get_outputs()}:
            raise RuntimeUnavailable(f"{path}: graph I/O {names} -> "
                                     f"{[o.name for o in self._session.get_outputs()]} does not "
                                     f"match cmc.json ({list(inputs)} -> {output})")
        self.inputs = inputs
        self.output = output
        offered = [o.name for o in self._session.get_outputs()]
        self.outputs = (output, *(n for n in offered if n != output))
        self.device: str = Device.CPU if execution_provider == Device.CPU else Device.CUDA
        self.precision = precision
        self.max_batch = max_batch
        self.provider = primary
        log.info("onnxruntime %s: %s on %s (session providers %s)", ort.__version__, path.name,
                 primary, got)

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.run_outputs(inputs, (self.output,))[0]

    def run_outputs(self, inputs: dict[str, np.ndarray],
                    names: Sequence[str]) -> list[np.ndarray]:
        if self._session is None:
            raise RuntimeError("onnxruntime: run() after close()")
        check_batch(inputs, self.inputs, self.max_batch, self.name)
        check_outputs(names, self.outputs, self.name)
        feed = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
        return [np.asarray(a, dtype=np.float32) for a in self._session.run(list(names), feed)]

    def close(self) -> None:
        self._session = None
