"""Triton repository: every generated config.pbtxt parses into Triton's ModelConfig proto."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from cmc_common.contract import patch_model_name
from cmc_export.errors import ExportError
from cmc_export.triton_repository import (
    BACKENDS,
    MODEL_CODE_DIR,
    PatchGraph,
    patch_model_config,
    volume_model_config,
    write_repository,
)

S, K, MAX_BATCH = 16, 5, 8


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fused", "a", "b"])
def test_patch_config_parses_with_graph_io(backend: str, mode: str) -> None:
    runtime = "tensorrt" if backend == "tensorrt" else "onnxruntime"
    graph = PatchGraph(mode, runtime, "fp32", Path(f"{mode}_fp32.onnx"))
    config = parse(patch_model_config(patch_model_name("cmc", mode), backend, graph, S, K,
                                      MAX_BATCH, f"1/{mode}_fp32.onnx"))
    inputs = {"fused": ["image_a", "image_b"], "a": ["image_a"], "b": ["image_b"]}[mode]
    assert config.name == ("cmc_patch" if mode == "fused" else f"cmc_patch_{mode}")
    assert config.max_batch_size == MAX_BATCH
    assert [i.name for i in config.input] == inputs
    assert all(list(i.dims) == [1, S, S, S] and i.data_type == model_config_pb2.TYPE_FP32
               for i in config.input)
    # the fused graph also serves each decoder's softmax (quality control's branch agreement)
    assert [o.name for o in config.output] == (["probs", "probs_a", "probs_b"]
                                               if mode == "fused" else ["probs"])
    assert all(list(o.dims) == [K, S, S, S] for o in config.output)
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    kind = config.instance_group[0].kind
    assert kind == (model_config_pb2.ModelInstanceGroup.KIND_GPU if backend == "tensorrt"
                    else model_config_pb2.ModelInstanceGroup.KIND_CPU)
    (warmup,) = config.model_warmup
    assert warmup.batch_size == 1 and sorted(warmup.inputs) == sorted(inputs)
    assert all(w.zero_data and list(w.dims) == [1, S, S, S] for w in warmup.inputs.values())
    if backend == "python":
        assert config.backend == "python"
        assert config.parameters["graph"].string_value == f"1/{mode}_fp32.onnx"
        assert config.parameters["runtime"].string_value == runtime
    else:
        assert (config.platform or config.backend) in (
            "onnxruntime_onnx", "openvino", "tensorrt_plan")


def test_volume_config_parses_and_names_patch_models() -> None:
    models = {"fused": "cmc_patch", "a": "cmc_patch_a"}
    config = parse(volume_model_config("cmc", models, S, K, tile_batch=4))
    assert config.backend == "python" and config.max_batch_size == 0
    assert [(i.name, i.optional, list(i.dims)) for i in config.input] == [
        ("image_a", True, [1, -1, -1, -1]), ("image_b", True, [1, -1, -1, -1])]
    assert [(o.name, list(o.dims)) for o in config.output] == [
        ("labels", [1, -1, -1, -1]), ("probs", [1, K, -1, -1, -1])]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert json.loads(params["patch_models"]) == models
    assert params["patch_size"] == f"{S},{S},{S}" and params["num_classes"] == str(K)


def test_unknown_backend_is_refused() -> None:
    graph = PatchGraph("a", "onnxruntime", "fp32", Path("a_fp32.onnx"))
    with pytest.raises(ExportError, match="unknown Triton backend 'onnx'"):
        patch_model_config("cmc_patch_a", "onnx", graph, S, K, MAX_BATCH, "1/a_fp32.onnx")


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_repository_copies_graphs_and_model_code(tmp_path: Path, backend: str) -> None:
    assert (MODEL_CODE_DIR / "cmc_patch/1/model.py").is_file()
    graphs = []
    for mode in ("fused", "b"):
        suffix = {"openvino": ".xml", "tensorrt": ".plan"}.get(backend, ".onnx")
        file = tmp_path / "export" / f"{mode}_fp32{suffix}"
        file.parent.mkdir(exist_ok=True)
        file.write_bytes(b"graph " + mode.encode())
        if suffix == ".xml":
            file.with_suffix(".bin").write_bytes(b"weights")
        runtime = {"openvino": "openvino", "tensorrt": "tensorrt"}.get(backend, "onnxruntime")
        graphs.append(PatchGraph(mode, runtime, "fp32", file))
    repo = tmp_path / "repository"
    models = write_repository(repo, "organs", backend, graphs, S, K, MAX_BATCH)
    assert models == {"fused": "organs_patch", "b": "organs_patch_b"}
    for mode, model in models.items():
        config = parse((repo / model / "config.pbtxt").read_text())
        assert config.name == model
        if backend == "python":
            graph_file = repo / model / config.parameters["graph"].string_value
            assert (repo / model / "1" / "model.py").read_text() == (
                MODEL_CODE_DIR / "cmc_patch/1/model.py").read_text()
        else:
            graph_file = repo / model / "1" / config.default_model_filename
        assert graph_file.read_bytes() == b"graph " + mode.encode()
        if backend == "openvino":
            assert graph_file.with_suffix(".bin").read_bytes() == b"weights"
    volume = parse((repo / "organs" / "config.pbtxt").read_text())
    assert json.loads(volume.parameters["patch_models"].string_value) == models
    assert (repo / "organs" / "1" / "model.py").is_file()
