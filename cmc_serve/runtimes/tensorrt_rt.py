"""TensorRT engine patch runtime (CUDA, the `.plan` built by `cmc export` on a GPU host).

A serialized TensorRT engine only runs under the TensorRT version and on the GPU
architecture it was built for, so the `.json` written beside the plan records both
(`{"tensorrt_version": "10.x.y.z", "compute_capability": "8.9", ...}`) and we refuse a
mismatch with a message that says to re-export on this host, instead of letting
deserialisation fail obscurely. Device memory and copies go through cuda-python's runtime
API (no torch). Both imports are guarded: without them the runtime is unavailable.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cmc_common.contract import Device, Runtime
from cmc_serve.errors import RuntimeUnavailable
from cmc_serve.runtimes.base import check_batch, check_outputs

try:
    import tensorrt as trt  # type: ignore[import-untyped,unused-ignore]
except ImportError:  # pragma: no cover - depends on the host
    trt = None

log = logging.getLogger(__name__)


def _require_tensorrt() -> None:
    # The type stubs install an importable but empty `tensorrt` namespace package, so a
    # successful import alone does not mean TensorRT is there.
    if trt is None or getattr(trt, "Runtime", None) is None:
        raise RuntimeUnavailable("tensorrt is not installed (needs the `tensorrt` package "
                                 "on a CUDA host)")


def _cudart() -> Any:
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise RuntimeUnavailable("cuda-python is not installed (the tensorrt runtime needs "
                             "`pip install cuda-python` for device memory)")


def _check(result: tuple[Any, ...], what: str) -> Any:
    """Unpack a cuda-python call's (error, value...) tuple, raising on error."""
    err, *rest = result
    if int(err) != 0:
        raise RuntimeUnavailable(f"CUDA {what} failed: {err}")
    return rest[0] if len(rest) == 1 else tuple(rest)


def _dims(dims: trt.Dims) -> list[int]:
    """A TensorRT Dims as a list (the bindings index it but do not declare iteration)."""
    return [int(dims[i]) for i in range(len(dims))]


def _capability(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ".".join(str(int(v)) for v in value)
    return str(value)


class TensorRtRuntime:
    """One deserialized TensorRT engine with an execution context and device buffers."""

    name: str = Runtime.TENSORRT
    device: str = Device.CUDA

    def __init__(self, path: Path, *, inputs: tuple[str, ...], output: str, precision: str,
                 max_batch: int) -> None:
        _require_tensorrt()
        self._cudart = cudart = _cudart()
        meta_path = path.with_suffix(".json")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RuntimeUnavailable(f"{meta_path}: cannot read the engine's build record "
                                     f"({exc})") from exc
        dev = _check(cudart.cudaGetDevice(), "cudaGetDevice")
        props = _check(cudart.cudaGetDeviceProperties(dev), "cudaGetDeviceProperties")
        here = f"{props.major}.{props.minor}"
        built_cc = _capability(meta.get("compute_capability"))
        built_trt = str(meta.get("tensorrt_version"))
        if built_trt != trt.__version__ or built_cc != here:
            raise RuntimeUnavailable(
                f"{path}: engine built with TensorRT {built_trt} for compute capability "
                f"{built_cc}, this host has TensorRT {trt.__version__} and {here}: "
                "re-export the model on this host")

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise RuntimeUnavailable(f"{path}: TensorRT could not deserialize the engine")
        self._context = self._engine.create_execution_context()

        io = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        in_names = tuple(n for n in io
                         if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        if set(in_names) != set(inputs) or output not in io:
            raise RuntimeUnavailable(f"{path}: engine I/O {io} does not match cmc.json "
                                     f"({list(inputs)} -> {output})")
        # The engine's optimisation profile bounds the batch; never exceed it.
        profile_max = min(self._engine.get_tensor_profile_shape(n, 0)[2][0] for n in in_names)
        self.max_batch = min(max_batch, int(profile_max))
        self.inputs = inputs
        self.output = output
        self.outputs = (output, *(n for n in io if n not in in_names and n != output))
        self.precision = precision
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in io}

        self._stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, int] = {}
        for n in io:
            shape = _dims(self._engine.get_tensor_profile_shape(n, 0)[2]) if n in in_names \
                else [self.max_batch, *_dims(self._engine.get_tensor_shape(n))[1:]]
            if any(int(s) < 0 for s in shape):
                raise RuntimeUnavailable(f"{path}: tensor {n} has dynamic non-batch dims {shape}")
            nbytes = int(np.prod(shape)) * self._dtypes[n].itemsize
            self._buffers[n] = int(_check(cudart.cudaMalloc(nbytes), "cudaMalloc"))
            self._context.set_tensor_address(n, self._buffers[n])
        log.info("tensorrt %s: %s on cuda (sm %s), %s, max batch %d", trt.__version__,
                 path.name, here, precision, self.max_batch)

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.run_outputs(inputs, (self.output,))[0]

    def run_outputs(self, inputs: dict[str, np.ndarray],
                    names: Sequence[str]) -> list[np.ndarray]:
        if not self._buffers:
            raise RuntimeError("tensorrt: run() after close()")
        check_batch(inputs, self.inputs, self.max_batch, self.name)
        check_outputs(names, self.outputs, self.name)
        cudart = self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        host = {n: np.ascontiguousarray(a, dtype=self._dtypes[n]) for n, a in inputs.items()}
        for n, arr in host.items():
            if not self._context.set_input_shape(n, arr.shape):
                raise ValueError(f"tensorrt: input {n} shape {arr.shape} outside the profile")
            _check(cudart.cudaMemcpyAsync(self._buffers[n], arr.ctypes.data, arr.nbytes, h2d,
                                          self._stream), "cudaMemcpyAsync")
        outs = [np.empty(tuple(_dims(self._context.get_tensor_shape(n))), dtype=self._dtypes[n])
                for n in names]
        if not self._context.execute_async_v3(int(self._stream)):
            raise RuntimeError("tensorrt: execute_async_v3 failed")
        for name, out in zip(names, outs, strict=True):
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[name], out.nbytes,
                                          d2h, self._stream), "cudaMemcpyAsync")
        _check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return [out.astype(np.float32, copy=False) for out in outs]

    def close(self) -> None:
        for ptr in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._buffers = {}
        if self._stream is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None
