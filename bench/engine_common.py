"""What both parts of bench/engine.py (speed, peak RSS) build: a model directory exported
from a torch module, the synthetic two-modality case, and progress lines on stderr.

Also imported by bench/triton_throughput.py (through bench/engine.py) for the same case.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cmc_common.contract import GRAPH_OUTPUT, MODE_INPUTS
from cmc_serve.model_json import ModelJson, graph_entry, write_model_json


class Progress:
    """One line per step on stderr with the seconds since the benchmark started: a run of
    several minutes says where it is (stdout keeps only the tables)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"[{elapsed:7.1f} s] {message}", file=sys.stderr, flush=True)


def write_model_dir(root: Path, graphs: Mapping[str, Any], example: tuple[Any, ...],
                    classes: int, patch: int, openvino: bool) -> Path:
    """Export `graphs` (mode -> torch module) to ONNX (+ OpenVINO IR) with a cmc.json: the
    fp32 graphs only, ungated (the benchmark's random or hand-built networks have nothing to
    gate against; `cmc export` is what a user runs)."""
    import torch

    (root / "onnx").mkdir(parents=True)
    entries = []
    for mode, module in graphs.items():
        inputs = list(MODE_INPUTS[mode])
        onnx_file = f"onnx/{mode}_fp32.onnx"
        with torch.no_grad():
            torch.onnx.export(module, example, str(root / onnx_file), input_names=inputs,
                              output_names=[GRAPH_OUTPUT], opset_version=17, dynamo=False,
                              dynamic_axes={n: {0: "batch"} for n in [*inputs, GRAPH_OUTPUT]})
        entries.append(graph_entry(mode, "onnxruntime", "fp32", onnx_file))
        if openvino:
            import openvino as ov

            (root / "openvino").mkdir(exist_ok=True)
            xml = f"openvino/{mode}_fp32.xml"
            ov.save_model(ov.convert_model(str(root / onnx_file)), str(root / xml),
                          compress_to_fp16=False)
            entries.append(graph_entry(mode, "openvino", "fp32", xml))
    write_model_json(root, ModelJson(
        name="bench", cmc_version="0.1.0", modalities=["ct", "mr"],
        classes=[f"c{i}" for i in range(classes)], patch_size=[patch] * 3, max_batch=4,
        preprocessing={}, graphs=entries))
    return root


def synthetic_case(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A pre-processed-looking CT/MR pair: a Gaussian blob (and its sine-modulated twin) in
    N(0, 0.3) noise, float32."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape],
                             indexing="ij")
    blob = np.exp(-4 * (zz**2 + yy**2 + xx**2))
    a = blob + 0.3 * rng.standard_normal(shape, dtype=np.float32)
    b = np.sin(3 * zz) * blob + 0.3 * rng.standard_normal(shape, dtype=np.float32)
    return a.astype(np.float32), b.astype(np.float32)
