"""CMC-shaped patch models for the engine tests: graphs built with onnx.helper (inputs
image_a/image_b [N, 1, P, P, P], a convolution per modality to K channels, softmax, fused =
mean of the two softmaxes, as DESIGN.md specifies), converted to OpenVINO IR, with a
matching cmc.json, so the tests exercise the real runtimes without the trainer. A pytest
plugin (tests/conftest.py): `conv3_model_dir`, `pointwise_dir` and `images` are fixtures of
every test module, one per module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cmc_common.contract import MODES
from cmc_serve.model_json import ModelJson, graph_entry, write_model_json

P = 16
K = 3
MAX_BATCH = 4


def _conv_softmax(prefix: str, inp: str, kernel: np.ndarray) -> tuple[list, list]:
    k = kernel.shape[-1]
    nodes = [helper.make_node("Conv", [inp, f"{prefix}_w", f"{prefix}_b"], [f"{prefix}_y"],
                              pads=[k // 2] * 6),
             helper.make_node("Softmax", [f"{prefix}_y"], [f"{prefix}_p"], axis=1)]
    init = [numpy_helper.from_array(kernel, f"{prefix}_w"),
            numpy_helper.from_array(np.linspace(-0.5, 0.5, K, dtype=np.float32), f"{prefix}_b")]
    return nodes, init


def build_graph(mode: str, kernels: dict[str, np.ndarray]) -> onnx.ModelProto:
    def io(name: str, c: int) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", c, P, P, P])

    names = {"fused": ["image_a", "image_b"], "a": ["image_a"], "b": ["image_b"]}[mode]
    nodes, init = [], []
    for name in names:
        n, i = _conv_softmax(name, name, kernels[name])
        nodes += n
        init += i
    if mode == "fused":
        nodes += [helper.make_node("Add", ["image_a_p", "image_b_p"], ["sum"]),
                  helper.make_node("Mul", ["sum", "half"], ["probs"])]
        init.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    else:
        nodes.append(helper.make_node("Identity", [f"{names[0]}_p"], ["probs"]))
    graph = helper.make_graph(nodes, f"cmc_{mode}", [io(n, 1) for n in names],
                              [io("probs", K)], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_model_dir(root: Path, kernel_size: int, modes: tuple[str, ...] = MODES,
                    openvino: bool = True, gated_half: tuple[str, ...] = ()) -> Path:
    """A model dir of a pointwise-softmax graph; `gated_half`: OpenVINO half precisions
    listed as gated (on the fp32 IR, as `cmc export` lists them)."""
    import openvino as ov

    rng = np.random.default_rng(kernel_size)
    kernels = {n: rng.normal(scale=1.5, size=(K, 1, kernel_size, kernel_size, kernel_size))
               .astype(np.float32) for n in ("image_a", "image_b")}
    graphs = []
    (root / "onnx").mkdir(parents=True)
    (root / "openvino").mkdir()
    for mode in modes:
        onnx_file = f"onnx/{mode}_fp32.onnx"
        onnx.save(build_graph(mode, kernels), root / onnx_file)
        graphs.append(graph_entry(mode, "onnxruntime", "fp32", onnx_file))
        if openvino:
            xml = f"openvino/{mode}_fp32.xml"
            ov.save_model(ov.convert_model(str(root / onnx_file)), str(root / xml),
                          compress_to_fp16=False)
            graphs += [graph_entry(mode, "openvino", precision, xml)
                       for precision in ("fp32", *gated_half)]
    write_model_json(root, ModelJson(
        name="test", cmc_version="0.1.0", modalities=["ct", "mr"],
        classes=["background", "liver", "kidney"], patch_size=[P, P, P], max_batch=MAX_BATCH,
        preprocessing={"modalities": ["ct", "mr"], "spacing": [2.0, 2.0, 2.0]},
        checkpoint_sha256="0" * 64, graphs=graphs))
    return root



def softmax(x: np.ndarray, axis: int = 0) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


@pytest.fixture(scope="module")
def conv3_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 3^3-kernel model in every mode (ONNX + OpenVINO), one per test module."""
    return write_model_dir(tmp_path_factory.mktemp("conv3"), kernel_size=3)


@pytest.fixture(scope="module")
def pointwise_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 1^3-kernel fused model, ONNX only: its answer is known voxel by voxel."""
    return write_model_dir(tmp_path_factory.mktemp("conv1"), kernel_size=1, modes=("fused",),
                           openvino=False)


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    """Two random images of an odd shape no patch size divides."""
    rng = np.random.default_rng(7)
    shape = (29, 23, 19)
    return (rng.normal(size=shape).astype(np.float32),
            rng.normal(size=shape).astype(np.float32))
