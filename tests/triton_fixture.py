"""Fixtures for tests against a real `tritonserver` on loopback (marker `triton`).

A tiny but real exported model directory is built: a two-input ONNX graph made with
onnx.helper (concat -> 3x3x3 conv -> softmax, fixed random weights, 16^3 patches, 3
classes), its cmc.json, and the Triton repository that `cmc export` writes for it
(cmc_export.triton_repository, python backend, the model code of model_repository/), plus
the same patch graph on OpenVINO with FP16 inputs. The server comes from $CMC_TRITON_PREFIX or `<repo>/.triton`
(`make .triton/.ready`); if it is missing the fixture prepares it, and skips only if that is
impossible here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cmc_export.triton_repository import PatchGraph, write_repository
from cmc_serve.model_json import ModelJson, graph_entry, write_model_json
from cmc_serve.triton.server import PREFIX_ENV, TritonInstall, TritonServer, TritonSetupError

ROOT = Path(__file__).resolve().parents[1]
PATCH = 16
CLASSES = ("background", "liver", "spleen")
NAME = "cmc"
MAX_BATCH = 4
OPENVINO_PATCH = f"{NAME}_patch_openvino"  # the same graph on OpenVINO, FP16 on the wire
# ... and at precision auto, as `cmc export` writes OpenVINO patch models: the server picks
# bf16 where its CPU runs it natively (the graph is listed as gated in bf16), else fp32.
OPENVINO_AUTO_PATCH = f"{NAME}_patch_openvino_auto"


def write_tiny_onnx(path: Path, seed: int = 0) -> None:
    """image_a, image_b [N, 1, P, P, P] -> probs [N, K, P, P, P] (opset 17, dynamic N), and
    like an exported fused graph each decoder's softmax `probs_a` / `probs_b` (here both
    the one softmax, so `probs`, their mean, is that softmax to the bit)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    k = len(CLASSES)
    weight = rng.normal(0.0, 0.6, size=(k, 2, 3, 3, 3)).astype(np.float32)
    bias = np.array([0.5, -0.2, -0.3], dtype=np.float32)
    shape: list[int | str] = ["N", 1, PATCH, PATCH, PATCH]
    graph = helper.make_graph(
        [helper.make_node("Concat", ["image_a", "image_b"], ["x"], axis=1),
         helper.make_node("Conv", ["x", "w", "b"], ["logits"], pads=[1] * 6),
         helper.make_node("Softmax", ["logits"], ["probs_a"], axis=1),
         helper.make_node("Identity", ["probs_a"], ["probs_b"]),
         helper.make_node("Add", ["probs_a", "probs_b"], ["both"]),
         helper.make_node("Mul", ["both", "half"], ["probs"])],
        "tiny_cmc",
        [helper.make_tensor_value_info("image_a", TensorProto.FLOAT, shape),
         helper.make_tensor_value_info("image_b", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", k, PATCH, PATCH, PATCH])
         for name in ("probs", "probs_a", "probs_b")],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b"),
                     numpy_helper.from_array(np.array(0.5, np.float32), "half")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def write_model_dir(root: Path) -> Path:
    """An exported-model directory (cmc.json + onnx graph + Triton repository)."""
    write_tiny_onnx(root / "onnx" / "fused_fp32.onnx")
    write_model_json(root, ModelJson(
        name=NAME, cmc_version="0.1.0", modalities=["ct", "mr"], classes=CLASSES,
        patch_size=[PATCH] * 3, max_batch=MAX_BATCH,
        preprocessing={"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], "normalisation": {}},
        graphs=[graph_entry("fused", "onnxruntime", "fp32", "onnx/fused_fp32.onnx")]))
    graph = PatchGraph(mode="fused", runtime="onnxruntime", precision="fp32",
                       file=root / "onnx" / "fused_fp32.onnx")
    write_repository(root / "repository", NAME, "python", [graph], PATCH, len(CLASSES),
                     MAX_BATCH)
    add_runtime_variant(root / "repository", f"{NAME}_patch", OPENVINO_PATCH, "openvino")
    add_runtime_variant(root / "repository", f"{NAME}_patch", OPENVINO_AUTO_PATCH, "openvino",
                        {"precision": "auto", "gated_precisions": "fp32,bf16"})
    return root


def add_runtime_variant(repository: Path, model: str, variant: str, runtime: str,
                        parameters: dict[str, str] | None = None) -> None:
    """Copy patch model `model` as `variant` running on `runtime` with FP16 inputs (half the
    bytes on the wire), with `parameters` changed; the config is edited as a protobuf, not
    as text."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    shutil.copytree(repository / model, repository / variant)
    path = repository / variant / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    config.name = variant
    config.parameters["runtime"].string_value = runtime
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    fp16 = model_config_pb2.DataType.TYPE_FP16
    for tensor in config.input:
        tensor.data_type = fp16
    for warmup in config.model_warmup:
        for tensor in warmup.inputs.values():
            tensor.data_type = fp16
    path.write_text(text_format.MessageToString(config))


@pytest.fixture(scope="session")
def triton_install() -> TritonInstall:
    """The local server, prepared on first use; skip (with the reason) if impossible."""
    prefix = Path(os.environ.get(PREFIX_ENV) or ROOT / ".triton")
    try:
        return TritonInstall.locate(prefix)
    except TritonSetupError:
        pass
    from cmc_serve.triton.setup import prepare

    try:
        return prepare(prefix)
    except TritonSetupError as exc:
        pytest.skip(f"no local Triton server can be prepared here: {exc}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def triton_server(triton_install: TritonInstall, tiny_model_dir: Path) -> Iterator[TritonServer]:
    log: list[str] = []  # kept, not printed: pytest shows it only through failures
    with TritonServer(tiny_model_dir / "repository", install=triton_install,
                      log=log.append, ready_timeout_s=90) as server:
        yield server
