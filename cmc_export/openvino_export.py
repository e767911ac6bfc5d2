"""OpenVINO IR (.xml/.bin) from the fp32 ONNX graph, and its runner for the parity gates.

The IR is always stored in fp32 (`compress_to_fp16=False`): bf16 / fp16 are inference
precision hints applied at compile time on CPUs that support them natively. Without native
support OpenVINO accepts the hint and quietly runs fp32, so the exporter asks the CPU's
OPTIMIZATION_CAPABILITIES first (`unsupported_reason`, shared with the serving runtime) and
skips the precision with a message instead. fp32 is requested explicitly: on CPUs with
bf16, OpenVINO's default is bf16.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from cmc_common.contract import GRAPH_OUTPUT
from cmc_export.errors import ExportError
from cmc_serve.runtimes.openvino_rt import OpenVinoRuntime, unsupported_reason

__all__ = ["export_openvino", "openvino_runner", "unsupported_reason"]


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


def openvino_runner(xml_path: Path, precision: str, inputs: Sequence[str], max_batch: int,
                    threads: int = 0, outputs: Sequence[str] = (GRAPH_OUTPUT,)
                    ) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """The IR compiled as `cmc segment` and the Triton patch model run it (cmc_serve's
    OpenVinoRuntime: one-tile static shape, `precision` as the inference-precision hint),
    so that the parity gate checks the kernels that will serve; returns the named `outputs`
    joined along the class axis (`cmc_export.gates.join_outputs`)."""
    from cmc_export.gates import join_outputs

    runtime = OpenVinoRuntime(xml_path, inputs=tuple(inputs), output=GRAPH_OUTPUT,
                              precision=precision, max_batch=max_batch,
                              num_threads=threads or None)

    def run(feed: Mapping[str, np.ndarray]) -> np.ndarray:
        return join_outputs(runtime.run_outputs(dict(feed), tuple(outputs)))

    return run
