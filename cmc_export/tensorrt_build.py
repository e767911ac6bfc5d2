"""TensorRT engines (.plan) from the fp32 ONNX graph, with their build record.

An engine only runs under the TensorRT version and on the GPU architecture it was built
for, so `<mode>_<precision>.json` beside each plan records both (`tensorrt_version`,
`compute_capability`); `cmc_serve` refuses a mismatch. The batch axis gets one
optimization profile [1, opt, max]; FP16 engines keep float32 I/O (TensorRT casts at the
boundary) and are gated against the fp32 ONNX graph like every other candidate.

The pure parts (profile shapes, the builder settings, the equivalent `trtexec` command) are
plain functions, tested without TensorRT. The build itself needs the `tensorrt` package and
a CUDA GPU; without them `ExportError` says so. This module type-checks with mypy against
`tensorrt-stubs` (see tests/test_tensorrt_build.py).
"""

from __future__ import annotations

import importlib
import json
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmc_common.contract import Precision
from cmc_export.errors import ExportError

try:
    import tensorrt as trt  # type: ignore[import-untyped, unused-ignore]
except ImportError:  # pragma: no cover - depends on the host
    trt = None  # type: ignore[assignment, unused-ignore]

TRT_PRECISIONS = (Precision.FP32, Precision.FP16)
DEFAULT_WORKSPACE_BYTES = 4 << 30


@dataclass(frozen=True)
class ProfileShapes:
    """Min / opt / max shapes of one input of the optimization profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def profile_shapes(patch_size: int, max_batch: int, opt_batch: int | None = None) -> ProfileShapes:
    """[1, opt, max] on the batch axis of an [N, 1, S, S, S] input (opt: half of max by default)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    opt = opt_batch if opt_batch is not None else max(1, (max_batch + 1) // 2)
    if not 1 <= opt <= max_batch:
        raise ValueError(f"opt batch {opt} is outside [1, {max_batch}]")
    patch = (1, patch_size, patch_size, patch_size)
    return ProfileShapes(min=(1, *patch), opt=(opt, *patch), max=(max_batch, *patch))


def builder_settings(precision: str, patch_size: int, max_batch: int, inputs: Sequence[str],
                     timing_cache: Path | None, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
                     ) -> dict[str, Any]:
    """Everything the builder is configured with, as JSON-ready data (also the build record)."""
    if precision not in TRT_PRECISIONS:
        raise ValueError(f"TensorRT engines are built in {list(TRT_PRECISIONS)}, not {precision}")
    shapes = profile_shapes(patch_size, max_batch)
    return {
        "precision": precision,
        "flags": ["FP16"] if precision == Precision.FP16 else [],
        "workspace_bytes": workspace_bytes,
        "profile": {name: {"min": list(shapes.min), "opt": list(shapes.opt),
                           "max": list(shapes.max)} for name in inputs},
        "timing_cache": str(timing_cache) if timing_cache else None,
    }


def _shape_arg(inputs: Sequence[str], shape: tuple[int, ...]) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name in inputs)


def trtexec_command(onnx_path: Path, plan_path: Path, inputs: Sequence[str], patch_size: int,
                    max_batch: int, precision: str = Precision.FP16, timing_cache: Path | None = None,
                    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> str:
    """The `trtexec` command line that builds the same engine as `build_engine`."""
    settings = builder_settings(precision, patch_size, max_batch, inputs, timing_cache,
                                workspace_bytes)
    shapes = profile_shapes(patch_size, max_batch)
    argv = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan_path}",
            f"--minShapes={_shape_arg(inputs, shapes.min)}",
            f"--optShapes={_shape_arg(inputs, shapes.opt)}",
            f"--maxShapes={_shape_arg(inputs, shapes.max)}",
            f"--memPoolSize=workspace:{settings['workspace_bytes'] >> 20}"]
    if precision == Precision.FP16:
        argv.append("--fp16")
    if timing_cache:
        argv.append(f"--timingCacheFile={timing_cache}")
    return shlex.join(argv)


def tensorrt_unavailable_reason() -> str | None:
    """Why no engine can be built here (no TensorRT, no CUDA GPU), or None."""
    # tensorrt-stubs installs an importable but empty `tensorrt` package: look for the API.
    if trt is None or getattr(trt, "Builder", None) is None:
        return "TensorRT is not installed (the `tensorrt` package needs a CUDA host)"
    try:
        gpu_compute_capability()
    except ExportError as exc:
        return str(exc)
    return None


def gpu_compute_capability() -> str:
    """Compute capability of GPU 0 ("8.9"), from nvidia-smi; ExportError without a GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise ExportError("no NVIDIA GPU: nvidia-smi is not on PATH")
    result = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=30, check=False)
    lines = result.stdout.split()
    if result.returncode != 0 or not lines:
        raise ExportError(f"no usable NVIDIA GPU (nvidia-smi: {result.stderr.strip() or 'no GPU'})")
    return lines[0]


def _load_timing_cache(config: trt.IBuilderConfig, timing_cache: Path | None) -> trt.ITimingCache:
    blob = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def build_engine(onnx_path: Path, plan_path: Path, inputs: Sequence[str], patch_size: int,
                 max_batch: int, precision: str = Precision.FP16, timing_cache: Path | None = None,
                 workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> dict[str, Any]:
    """Build and serialize an engine; write the plan and its JSON build record; return the record."""
    reason = tensorrt_unavailable_reason()
    if reason:
        raise ExportError(f"{plan_path.name}: cannot build a TensorRT engine: {reason}")
    settings = builder_settings(precision, patch_size, max_batch, inputs, timing_cache,
                                workspace_bytes)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path.name}: TensorRT cannot parse the graph ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == Precision.FP16:
        config.set_flag(trt.BuilderFlag.FP16)
    shapes = profile_shapes(patch_size, max_batch)
    profile = builder.create_optimization_profile()
    for name in inputs:
        profile.set_shape(name, trt.Dims(list(shapes.min)), trt.Dims(list(shapes.opt)),
                          trt.Dims(list(shapes.max)))
    config.add_optimization_profile(profile)
    cache = _load_timing_cache(config, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"{plan_path.name}: TensorRT failed to build the engine (see its log)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(plan))
    if timing_cache:
        timing_cache.write_bytes(bytes(cache.serialize()))
    record = {"tensorrt_version": str(trt.__version__),
              "compute_capability": gpu_compute_capability(), **settings}
    plan_path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def tensorrt_runner(plan_path: Path, output: str | Sequence[str]
                    ) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """The engine as a gate runner; device buffers are CUDA torch tensors. Several outputs
    come back joined along the class axis (`cmc_export.gates.join_outputs`)."""
    from cmc_export.gates import join_outputs

    outputs = [output] if isinstance(output, str) else list(output)
    torch: Any = importlib.import_module("torch")
    if not torch.cuda.is_available():
        raise ExportError(f"{plan_path.name}: gating a TensorRT engine needs CUDA-enabled torch")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise ExportError(f"{plan_path.name}: TensorRT cannot deserialize the engine it built")
    context = engine.create_execution_context()

    def run(inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        device = {name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).cuda()
                  for name, a in inputs.items()}
        for name, tensor in device.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, int(tensor.data_ptr()))
        results = {}
        for index in range(engine.num_io_tensors):  # TensorRT needs every output's address
            name = engine.get_tensor_name(index)
            if engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                continue
            dims = context.get_tensor_shape(name)
            shape = tuple(int(dims[i]) for i in range(len(dims)))
            results[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
            context.set_tensor_address(name, int(results[name].data_ptr()))
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise ExportError(f"{plan_path.name}: TensorRT execution failed")
        stream.synchronize()
        return join_outputs([np.asarray(results[name].cpu().numpy()) for name in outputs])

    return run
