"""Trace a patch graph to one self-contained ONNX file with the CMC metadata inside.

The legacy TorchScript exporter (opset 17) is used: it writes a single file with a dynamic
batch axis and needs no external-data handling. The CMC metadata travels in
`metadata_props` so that a bare .onnx file still says which classes, modalities, patch size
and pre-processing it expects.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from cmc_common.contract import GRAPH_OUTPUT, MODE_INPUTS, MODE_OUTPUTS
from cmc_export.errors import ExportError

OPSET = 17
BATCH_AXIS_NAME = "batch"


def example_inputs(mode: str, patch_size: int, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random patches [batch, 1, S, S, S] for every input of the `mode` graph."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, 1, patch_size, patch_size, patch_size, generator=gen)
            for name in MODE_INPUTS[mode]}


def cmc_metadata_props(checkpoint_metadata: Mapping[str, Any], mode: str, precision: str,
                       checkpoint_sha256: str) -> dict[str, str]:
    """The key/value strings stored in the ONNX `metadata_props` (values JSON-encoded)."""
    model = checkpoint_metadata["model"]
    preprocessing = checkpoint_metadata["preprocessing"]
    size = int(model["img_size"])
    props: dict[str, Any] = {
        "cmc_version": checkpoint_metadata.get("cmc_version", ""),
        "mode": mode,
        "inputs": list(MODE_INPUTS[mode]),
        "output": GRAPH_OUTPUT,
        "outputs": list(MODE_OUTPUTS[mode]),
        "classes": list(checkpoint_metadata["classes"]),
        "modalities": list(checkpoint_metadata["modalities"]),
        "patch_size": [size, size, size],
        "spacing": list(preprocessing["spacing"]),
        "orientation": preprocessing.get("orientation", "RAS"),
        "normalisation": preprocessing["normalisation"],
        "precision": precision,
        "checkpoint_sha256": checkpoint_sha256,
    }
    return {key: value if isinstance(value, str) else json.dumps(value)
            for key, value in props.items()}


def set_metadata_props(model: onnx.ModelProto, props: Mapping[str, str]) -> None:
    """Replace the model's metadata_props with `props` (in place)."""
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def read_metadata_props(path: Path) -> dict[str, str]:
    """The metadata_props of an ONNX file, without loading its weights' meaning."""
    model = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in model.metadata_props}


def trace_to_onnx(graph: nn.Module, mode: str, patch_size: int) -> onnx.ModelProto:
    """Trace `graph` (a `patch_graph` wrapper) to an in-memory opset-17 model, batch axis dynamic."""
    inputs = example_inputs(mode, patch_size)
    names = list(MODE_INPUTS[mode])
    outputs = list(MODE_OUTPUTS[mode])
    with (tempfile.TemporaryDirectory(prefix="cmc-trace-") as tmp, warnings.catch_warnings(),
          torch.no_grad()):
        # The legacy exporter announces its deprecation and tracer shape warnings on every call.
        warnings.simplefilter("ignore")
        path = Path(tmp) / "graph.onnx"
        torch.onnx.export(
            graph, tuple(inputs[n] for n in names), path,
            input_names=names, output_names=outputs,
            dynamic_axes={n: {0: BATCH_AXIS_NAME} for n in [*names, *outputs]},
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
        model = onnx.load(str(path))
    separate_graph_outputs(model)
    return model


def separate_graph_outputs(model: onnx.ModelProto) -> None:
    """Give every graph output that other nodes also read its own Identity (in place).

    The fused graph's `probs_a` / `probs_b` are graph outputs and the inputs of its mean;
    the float16 converter (`keep_io_types`) casts such an output back to float32 for the
    graph's caller and then also feeds that float32 value to the consumers inside, whose
    other input is float16 (ONNX Runtime refuses the fp16 graph). Behind an Identity the
    inner value stays internal; `cmc_export.fp16` keeps identities that feed graph outputs.
    """
    graph = model.graph
    outputs = {o.name for o in graph.output}
    consumed = {name for node in graph.node for name in node.input} & outputs
    for node in list(graph.node):
        for i, name in enumerate(node.input):
            if name in consumed:
                node.input[i] = f"{name}__value"
        for i, name in enumerate(node.output):
            if name in consumed:
                node.output[i] = f"{name}__value"
                graph.node.append(onnx.helper.make_node("Identity", [f"{name}__value"],
                                                        [name], name=f"{name}__output"))


def check_and_save(model: onnx.ModelProto, path: Path) -> None:
    """onnx.checker (full, with shape inference) then write one self-contained file."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{path.name}: ONNX checker rejected the graph ({exc})") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))


def export_onnx(graph: nn.Module, mode: str, patch_size: int, path: Path,
                props: Mapping[str, str]) -> onnx.ModelProto:
    """Trace, attach the CMC metadata, check and save `path`; returns the saved model."""
    model = trace_to_onnx(graph, mode, patch_size)
    set_metadata_props(model, props)
    check_and_save(model, path)
    return model


def onnxruntime_runner(model: Path | onnx.ModelProto, threads: int = 0,
                       outputs: Sequence[str] = (GRAPH_OUTPUT,)
                       ) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """An ONNX Runtime CPU session as a gate runner (named inputs -> the named `outputs`
    joined along the class axis, `cmc_export.gates.join_outputs`)."""
    import onnxruntime as ort

    from cmc_export.gates import join_outputs

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])

    def run(inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        return join_outputs([np.asarray(a) for a in session.run(list(outputs), dict(inputs))])

    return run
