"""Choose and open the patch runtime for a model, mode, device and precision.

"auto" picks the fastest runtime that can actually run here: OpenVINO on CPU (faster than
ONNX Runtime end to end, BENCHMARKS.md engine section) and a TensorRT engine,
then ONNX Runtime's CUDA provider, on a GPU. Falling back is only ever done for "auto": a
runtime or device the caller named explicitly either runs or fails with RuntimeUnavailable
saying why. "auto" falls back only when a runtime cannot run here (RuntimeUnavailable: not
installed, no GPU, no graph for it); a damaged graph file (ModelFileError, checked against
cmc.json's sha256 before the graph is opened) stops the choice and reaches the user.

"triton" runs the patch graph on a Triton server's `<name>_patch` models
(`cmc_serve.triton.client.TritonPatchRuntime`; tiling, blending and stitching stay local,
so messages stay patch-sized). It is never chosen by "auto" and needs `server`; an
unreachable server or a served model that is not this cmc.json's is RuntimeUnavailable.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from cmc_common.contract import (
    AUTO,
    DEVICES,
    MODE_INPUTS,
    MODEL_JSON,
    PRECISIONS,
    SERVING_RUNTIMES,
    Device,
    Precision,
    Runtime,
)
from cmc_serve.errors import RuntimeUnavailable
from cmc_serve.model_dir import (
    GraphInfo,
    ModelInfo,
    verify_files,
)
from cmc_serve.runtimes.base import PatchRuntime
from cmc_serve.runtimes.precision import (
    PrecisionChoice,
    choose_precision,
    measure_tile_seconds,
)

log = logging.getLogger(__name__)

AUTO_ORDER: dict[str, tuple[str, ...]] = {
    Device.CPU: (Runtime.OPENVINO, Runtime.ONNXRUNTIME),
    Device.CUDA: (Runtime.TENSORRT, Runtime.ONNXRUNTIME),
}


def _open_onnxruntime(model: ModelInfo, mode: str, device: str, precision: str,
                      batch: int) -> PatchRuntime:
    from cmc_serve.runtimes.onnxruntime_rt import OnnxRuntimeRuntime

    graph = _graph(model, mode, Runtime.ONNXRUNTIME, precision)
    return OnnxRuntimeRuntime(graph.path, inputs=graph.inputs, output=graph.output,
                              precision=precision, max_batch=batch, execution_provider=device)


def _open_openvino(model: ModelInfo, mode: str, device: str, precision: str,
                   batch: int) -> PatchRuntime:
    from cmc_serve.runtimes.openvino_rt import OpenVinoRuntime

    if device != Device.CPU:
        raise RuntimeUnavailable("openvino runs on cpu here (no CUDA support)")
    # OpenVINO reads ONNX directly, so a model dir without IR still runs on it (not int8,
    # which is a quantised IR of its own).
    try:
        graph = _graph(model, mode, Runtime.OPENVINO, precision)
    except RuntimeUnavailable:
        if precision == Precision.INT8:
            raise
        graph = _graph(model, mode, Runtime.ONNXRUNTIME, Precision.FP32)
    return OpenVinoRuntime(graph.path, inputs=graph.inputs, output=graph.output,
                           precision=precision, max_batch=batch)


def _open_tensorrt(model: ModelInfo, mode: str, device: str, precision: str,
                   batch: int) -> PatchRuntime:
    from cmc_serve.runtimes.tensorrt_rt import TensorRtRuntime

    if device != Device.CUDA:
        raise RuntimeUnavailable("tensorrt runs on cuda only")
    graph = _graph(model, mode, Runtime.TENSORRT, precision)
    return TensorRtRuntime(graph.path, inputs=graph.inputs, output=graph.output,
                           precision=precision, max_batch=batch)


def _open_triton(model: ModelInfo, mode: str, server: str) -> PatchRuntime:
    """The Triton server's patch model of `mode`, checked against cmc.json; its batch size
    and precision are the served model's."""
    try:
        from cmc_serve.triton.client import TritonPatchRuntime
    except ImportError as exc:
        raise RuntimeUnavailable(f"the Triton runtime is not available: {exc}") from exc
    # unreachable or not this model: TritonUnavailable / TritonModelMismatch, both
    # RuntimeUnavailable, stop the run
    return TritonPatchRuntime(server, model, mode)


OPENERS: dict[str, Callable[[ModelInfo, str, str, str, int], PatchRuntime]] = {
    Runtime.OPENVINO: _open_openvino,
    Runtime.ONNXRUNTIME: _open_onnxruntime,
    Runtime.TENSORRT: _open_tensorrt,
}
TRITON_PRECISION_REASON = "set by the Triton server's patch model"


def gated_precisions(model: ModelInfo, mode: str, runtime: str) -> set[str]:
    """Precisions with a gated graph of `mode` for `runtime` (OpenVINO can always read the
    fp32 ONNX graph)."""
    gated = {g.precision for g in model.graphs if g.mode == mode and g.runtime == runtime}
    return gated | {Precision.FP32} if runtime == Runtime.OPENVINO else gated


# (model folder, mode, precisions) -> seconds per tile: auto measures once per process.
_MEASURED: dict[tuple[Path, str, tuple[str, ...]], dict[str, float]] = {}
_MEASURED_LOCK = threading.Lock()


def measured_seconds(model: ModelInfo, mode: str, runtime: str, device: str,
                     precisions: Sequence[str]) -> dict[str, float]:
    """Seconds per tile of `mode`'s graph at each precision on `runtime` (measured once per
    model, mode and process: `precision.measure_tile_seconds`)."""
    key = (model.root.resolve(), mode, tuple(precisions))
    with _MEASURED_LOCK:
        if key not in _MEASURED:
            _MEASURED[key] = measure_tile_seconds(
                lambda p: OPENERS[runtime](model, mode, device, p, model.max_batch),
                precisions, MODE_INPUTS[mode], model.patch_size)
            log.info("precision auto: %s", ", ".join(
                f"{p} {1e3 * s:.1f} ms per tile" for p, s in _MEASURED[key].items()))
        return _MEASURED[key]


def resolve_precision(model: ModelInfo, mode: str, runtime: str, device: str,
                      precision: str) -> PrecisionChoice:
    """What `precision` means for `runtime` on `device`: auto chooses (timing the gated
    int8 graph against the rule's choice where there is one), anything else stays."""
    if precision != AUTO:
        return PrecisionChoice(precision, "requested")
    if runtime == Runtime.TRITON:
        return PrecisionChoice(precision, TRITON_PRECISION_REASON)
    return choose_precision(runtime, device, gated_precisions(model, mode, runtime),
                            lambda chosen: measured_seconds(model, mode, runtime, device, chosen))


def _graph(model: ModelInfo, mode: str, runtime: str, precision: str) -> GraphInfo:
    """The verified graph for the combination; GraphNotExported (a RuntimeUnavailable) when
    none was exported, ModelFileError (never caught by "auto") when its files are damaged."""
    graph = model.graph(mode, runtime, precision)
    verify_files(graph.files)
    return graph


def check_server(runtime: str, server: str | None) -> None:
    """RuntimeUnavailable unless a Triton server is given exactly when runtime is triton."""
    if runtime == Runtime.TRITON and server is None:
        raise RuntimeUnavailable("--runtime triton needs --server grpc://HOST:PORT or "
                                 "http://HOST:PORT")
    if runtime != Runtime.TRITON and server is not None:
        raise RuntimeUnavailable("--server is only used with --runtime triton")


def open_runtime(model: ModelInfo, mode: str, runtime: str = AUTO, device: str = Device.CPU,
                 precision: str = AUTO, max_batch: int | None = None,
                 server: str | None = None) -> PatchRuntime:
    """Open the patch graph of `mode` on the requested runtime/device/precision.

    `precision` "auto" takes, per runtime tried, the fastest gated precision it runs
    natively (`resolve_precision`). `max_batch` (default: the model's) bounds the tiles per
    `run` call. `server` (grpc://HOST:PORT or http://HOST:PORT) is the Triton server of
    runtime "triton", which takes device, precision and batch size from the served model.
    """
    for value, choices, what in ((runtime, (AUTO, *SERVING_RUNTIMES), "runtime"),
                                 (device, DEVICES, "device"),
                                 (precision, (AUTO, *PRECISIONS), "precision")):
        if value not in choices:
            raise ValueError(f"unknown {what} {value!r} (expected one of {list(choices)})")
    check_server(runtime, server)
    if mode not in model.modes:
        raise RuntimeUnavailable(f"{model.root / MODEL_JSON}: mode {mode!r} not exported "
                                 f"(available: {list(model.modes)})")
    if server is not None:
        return _open_triton(model, mode, server)
    batch = model.max_batch if max_batch is None else max_batch
    if not 1 <= batch <= model.max_batch:
        raise ValueError(f"batch size {batch} outside 1..{model.max_batch} (the model's max_batch)")
    candidates = AUTO_ORDER[device] if runtime == AUTO else (runtime,)
    reasons = []
    for name in candidates:
        choice = resolve_precision(model, mode, name, device, precision)
        try:
            rt = OPENERS[name](model, mode, device, choice.precision, batch)
        except RuntimeUnavailable as exc:
            if runtime != AUTO:
                raise
            log.info("runtime auto: %s unavailable (%s)", name, exc)
            reasons.append(f"{name}: {exc}")
            continue
        log.info("mode %s runs on %s/%s/%s (batch %d; precision %s)", mode, rt.name, rt.device,
                 rt.precision, rt.max_batch, choice.reason)
        return rt
    raise RuntimeUnavailable(f"no runtime can run mode {mode} on {device} at {precision}: "
                             + "; ".join(reasons))
