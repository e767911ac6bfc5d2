"""The Triton model repository of an export: one patch model per mode plus the volume model.

- `<name>_patch` (fused), `<name>_patch_a`, `<name>_patch_b`: one exported patch graph each,
  batched by Triton's dynamic batcher, warmed up with a zero batch. Backend `python` runs
  the graph with cmc's ONNX Runtime / OpenVINO runtimes inside the python backend (the only
  backend of the pip-installable tritonserver); `onnxruntime`, `openvino` and `tensorrt`
  use Triton's native backends on a full server.
- `<name>`: the python BLS volume model (tiling, batched patch requests, gaussian
  stitching), which calls the patch models by name.
The python model code is copied from the checked-in top-level `model_repository/` folder.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cmc_model_repository

from cmc_common.contract import (
    MODE_INPUTS,
    MODE_OUTPUTS,
    RUNTIMES,
    Runtime,
    patch_model_name,
)
from cmc_export.errors import ExportError

# The python backend (cmc's own model code) or a graph runtime's native Triton backend.
BACKENDS = ("python", *RUNTIMES)
# Triton's `platform` / `backend` line and the file name its native backends look for.
_NATIVE: dict[str, tuple[str, str]] = {
    Runtime.ONNXRUNTIME: ('platform: "onnxruntime_onnx"', "model.onnx"),
    Runtime.OPENVINO: ('backend: "openvino"', "model.xml"),
    Runtime.TENSORRT: ('platform: "tensorrt_plan"', "model.plan")}
# The top-level `cmc_model_repository` package (package data in a wheel, the checkout otherwise).
MODEL_CODE_DIR = Path(cmc_model_repository.__file__).resolve().parent


@dataclass(frozen=True)
class PatchGraph:
    """The graph a patch model serves: its file in the export and how to run it."""

    mode: str
    runtime: str  # onnxruntime | openvino | tensorrt
    precision: str  # or "auto" (python backend): the server picks among `gated`
    file: Path
    gated: tuple[str, ...] = ()
    int8_file: Path | None = None  # the int8 IR beside an OpenVINO fp32 IR at "auto"


def _dims(values: Sequence[int]) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def _tensor(name: str, dtype: str, dims: Sequence[int], optional: bool = False) -> str:
    extra = "\n    optional: true" if optional else ""
    return f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: {_dims(dims)}{extra}\n  }}'


def _parameters(values: Mapping[str, str]) -> str:
    return "\n".join(f'parameters {{\n  key: "{k}"\n  value: {{ string_value: {json.dumps(v)} }}\n}}'
                     for k, v in values.items())


def preferred_batch_sizes(max_batch: int) -> list[int]:
    """Batch sizes the dynamic batcher aims for: half of max_batch and max_batch."""
    return sorted({max(1, max_batch // 2), max_batch})


def patch_model_config(model_name: str, backend: str, graph: PatchGraph, patch_size: int,
                       num_classes: int, max_batch: int, graph_file: str,
                       max_queue_delay_us: int = 2000, int8_graph_file: str | None = None) -> str:
    """config.pbtxt of a patch model serving `graph` (graph_file: path inside the model folder)."""
    if backend not in BACKENDS:
        raise ExportError(f"unknown Triton backend {backend!r}; choose one of {list(BACKENDS)}")
    patch = [1, patch_size, patch_size, patch_size]
    inputs = MODE_INPUTS[graph.mode]
    kind = "KIND_GPU" if graph.runtime == Runtime.TENSORRT else "KIND_CPU"
    head = 'backend: "python"' if backend == "python" else _NATIVE[backend][0]
    warmup_inputs = "\n".join(
        f'    inputs {{\n      key: "{n}"\n      value {{ data_type: TYPE_FP32 dims: {_dims(patch)} '
        f'zero_data: true }}\n    }}' for n in inputs)
    sections = [
        f'name: "{model_name}"',
        head,
        f"max_batch_size: {max_batch}",
        "input [\n" + ",\n".join(_tensor(n, "TYPE_FP32", patch) for n in inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor(n, "TYPE_FP32",
                                           [num_classes, patch_size, patch_size, patch_size])
                                   for n in MODE_OUTPUTS[graph.mode]) + "\n]",
        f"dynamic_batching {{\n  preferred_batch_size: {_dims(preferred_batch_sizes(max_batch))}\n"
        f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}",
        f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]",
        f'model_warmup [\n  {{\n    name: "zero_batch"\n    batch_size: 1\n{warmup_inputs}\n  }}\n]',
    ]
    if backend == "python":
        parameters = {"graph": graph_file, "runtime": graph.runtime, "precision": graph.precision}
        if graph.gated:
            parameters["gated_precisions"] = ",".join(graph.gated)
        if int8_graph_file:
            parameters["int8_graph"] = int8_graph_file
        sections.append(_parameters(parameters))
    else:
        sections.append(f'default_model_filename: "{graph_file.split("/")[-1]}"')
    return "\n".join(sections) + "\n"


def volume_model_config(name: str, patch_models: Mapping[str, str], patch_size: int,
                        num_classes: int, tile_batch: int,
                        postprocessing: Mapping[str, Any] | None = None) -> str:
    """config.pbtxt of the python BLS volume model `<name>` (pre-processed volumes in, labels out)."""
    volume = [1, -1, -1, -1]
    sections = [
        f'name: "{name}"',
        'backend: "python"',
        "max_batch_size: 0",
        "input [\n" + ",\n".join(_tensor(n, "TYPE_FP32", volume, optional=True)
                                 for n in ("image_a", "image_b")) + "\n]",
        "output [\n" + _tensor("labels", "TYPE_UINT8", volume) + ",\n"
        + _tensor("probs", "TYPE_FP32", [1, num_classes, -1, -1, -1]) + "\n]",
        "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]",
        _parameters({"patch_models": json.dumps(dict(patch_models)),
                     "patch_size": ",".join([str(patch_size)] * 3),
                     "num_classes": str(num_classes),
                     "patch_input_type": "TYPE_FP32",
                     "tile_batch": str(tile_batch),
                     **({"postprocessing": json.dumps(postprocessing)} if postprocessing else {})}),
    ]
    return "\n".join(sections) + "\n"


def _model_code(relative: str) -> Path:
    path = MODEL_CODE_DIR / relative
    if not path.is_file():
        raise ExportError(f"{path}: Triton python model code is missing from this installation")
    return path


def _copy_graph(graph: PatchGraph, version_dir: Path, backend: str) -> str:
    """Copy the graph (with an OpenVINO IR's .bin) into the version folder; return its path there."""
    target_name = _NATIVE[backend][1] if backend != "python" else graph.file.name
    shutil.copy2(graph.file, version_dir / target_name)
    if graph.file.suffix == ".xml":
        shutil.copy2(graph.file.with_suffix(".bin"), (version_dir / target_name).with_suffix(".bin"))
    return f"{version_dir.name}/{target_name}"


def write_repository(repo_dir: Path, name: str, backend: str, graphs: Sequence[PatchGraph],
                     patch_size: int, num_classes: int, max_batch: int,
                     postprocessing: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write the repository; `graphs` holds one graph per mode. Returns mode -> patch model
    name. `postprocessing` (the checkpoint's choice) goes to the volume model's parameters."""
    if backend not in BACKENDS:
        raise ExportError(f"unknown Triton backend {backend!r}; choose one of {list(BACKENDS)}")
    patch_models = {}
    for graph in graphs:
        model_name = patch_model_name(name, graph.mode)
        version_dir = repo_dir / model_name / "1"
        version_dir.mkdir(parents=True)
        if backend == "python":
            shutil.copy2(_model_code("cmc_patch/1/model.py"), version_dir / "model.py")
        graph_file = _copy_graph(graph, version_dir, backend)
        int8_file = (_copy_graph(replace(graph, file=graph.int8_file), version_dir, backend)
                     if graph.int8_file and backend == "python" else None)
        (repo_dir / model_name / "config.pbtxt").write_text(patch_model_config(
            model_name, backend, graph, patch_size, num_classes, max_batch, graph_file,
            int8_graph_file=int8_file))
        patch_models[graph.mode] = model_name
    volume_dir = repo_dir / name / "1"
    volume_dir.mkdir(parents=True)
    shutil.copy2(_model_code("cmc/1/model.py"), volume_dir / "model.py")
    (repo_dir / name / "config.pbtxt").write_text(volume_model_config(
        name, patch_models, patch_size, num_classes, tile_batch=min(4, max_batch),
        postprocessing=postprocessing))
    return patch_models
