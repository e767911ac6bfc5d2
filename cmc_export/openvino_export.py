"""OpenVINO IR (.xml/.bin) from the fp32 ONNX graph, and its compiled CPU runner.

The IR is always stored in fp32 (`compress_to_fp16=False`): bf16 / fp16 are inference
precision hints applied at compile time on CPUs that support them natively. Without native
support OpenVINO accepts the hint and quietly runs fp32, so the exporter asks the CPU's
OPTIMIZATION_CAPABILITIES first and skips the precision with a message instead.
fp32 is requested explicitly: on CPUs with bf16, OpenVINO's default is bf16.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cmc_export.errors import ExportError
from cmc_export.patch_graph import GRAPH_OUTPUT

OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
CAPABILITY = {"fp32": "FP32", "bf16": "BF16", "fp16": "FP16"}


def _core() -> Any:
    import openvino as ov

    return ov.Core()


def cpu_name() -> str:
    """The CPU as OpenVINO names it."""
    return str(_core().get_property("CPU", "FULL_DEVICE_NAME"))


def unsupported_reason(precision: str) -> str | None:
    """Why this CPU cannot run `precision` natively in OpenVINO, or None if it can."""
    if precision not in OV_PRECISION:
        return f"OpenVINO has no {precision} inference precision"
    core = _core()
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if CAPABILITY[precision] not in capabilities:
        return (f"OpenVINO {precision}: this CPU ({core.get_property('CPU', 'FULL_DEVICE_NAME')}) "
                f"has no native {precision} (capabilities {', '.join(capabilities)})")
    return None


def export_openvino(onnx_path: Path, xml_path: Path, props: Mapping[str, str]) -> None:
    """Convert the fp32 ONNX graph to an fp32 IR at `xml_path` (+ .bin), CMC metadata in rt_info."""
    import openvino as ov

    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as exc:  # OpenVINO raises plain RuntimeError subclasses
        raise ExportError(f"{onnx_path.name}: OpenVINO cannot convert the graph ({exc})") from exc
    for key, value in props.items():
        model.set_rt_info(value, ["cmc", key])
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=False)


def openvino_runner(xml_path: Path, precision: str, threads: int = 0
                    ) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """The IR compiled for CPU with `precision` as the inference-precision hint."""
    reason = unsupported_reason(precision)
    if reason:
        raise ExportError(reason)
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": OV_PRECISION[precision]}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = _core().compile_model(str(xml_path), "CPU", config)
    request = compiled.create_infer_request()

    def run(inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        result = request.infer(dict(inputs))
        return np.array(result[compiled.output(GRAPH_OUTPUT)], dtype=np.float32)

    return run
