"""Parity gates: they pass real exports and fail deliberately broken graphs, with numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from export_fixtures import CLASSES, MICRO, PREPROCESS, micro_net
from onnx import numpy_helper

from cmc_export.errors import ExportError, GateFailed
from cmc_export.fp16 import convert_fp16
from cmc_export.gate_inputs import mode_inputs, random_patches, synthetic_tiles
from cmc_export.gates import dice_per_class, fp32_parity, run_batched, segmentation_parity
from cmc_export.onnx_export import onnxruntime_runner, trace_to_onnx
from cmc_export.openvino_export import export_openvino, openvino_runner, unsupported_reason
from cmc_export.patch_graph import patch_graph, torch_runner

S = MICRO.img_size


@pytest.fixture(scope="module")
def graph():
    return patch_graph(micro_net(), "fused")


@pytest.fixture(scope="module")
def fp32_model(graph) -> onnx.ModelProto:
    return trace_to_onnx(graph, "fused", S)


@pytest.fixture(scope="module")
def gate_sets() -> dict[str, dict[str, np.ndarray]]:
    return {"random": random_patches("fused", S),
            "synthetic": mode_inputs(synthetic_tiles(PREPROCESS, S), "fused")}


@pytest.fixture(scope="module")
def torch_probs(graph, gate_sets) -> dict[str, np.ndarray]:
    run = torch_runner(graph)
    return {k: run_batched(run, v, 8) for k, v in gate_sets.items()}


def _probs(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> np.ndarray:
    return run_batched(onnxruntime_runner(model), inputs, 8)


def _perturbed(model: onnx.ModelProto, scale: float, name_part: str = "") -> onnx.ModelProto:
    """A copy whose float initializers (those whose name contains name_part) are changed."""
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    rng = np.random.default_rng(1)
    for init in broken.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32 and array.size > 1 and name_part in init.name:
            noisy = array + scale * rng.standard_normal(array.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    return broken


def test_synthetic_tiles_are_preprocessed_phantom_patches() -> None:
    tiles = synthetic_tiles(PREPROCESS, S)
    assert set(tiles) == {"image_a", "image_b"}
    for array in tiles.values():
        assert array.shape == (4, 1, S, S, S) and array.dtype == np.float32
        assert np.isfinite(array).all() and array.std() > 0.05
    # CT window scales to [0, 1]; MR is z-scored over its non-zero voxels.
    assert 0.0 <= tiles["image_a"].min() and tiles["image_a"].max() <= 1.0
    assert tiles["image_b"].min() < 0.0 < tiles["image_b"].max()


def test_fp32_onnx_passes_parity_with_pytorch(fp32_model, gate_sets, torch_probs) -> None:
    candidate = {k: _probs(fp32_model, v) for k, v in gate_sets.items()}
    numbers = fp32_parity("fused_fp32.onnx", torch_probs, candidate)
    assert numbers["max_abs_diff_random"] <= 1e-4 and numbers["max_abs_diff_synthetic"] <= 1e-4


def test_fp32_parity_fails_on_perturbed_initializers(fp32_model, gate_sets, torch_probs) -> None:
    broken = _perturbed(fp32_model, 1e-2)
    candidate = {k: _probs(broken, v) for k, v in gate_sets.items()}
    with pytest.raises(GateFailed, match=r"fused_fp32\.onnx: fp32 parity gate failed: "
                                         r"max_abs_diff_random \d"):
        fp32_parity("fused_fp32.onnx", torch_probs, candidate)


def test_fp16_passes_segmentation_parity(fp32_model, gate_sets) -> None:
    reference = _probs(fp32_model, gate_sets["synthetic"])
    numbers = segmentation_parity("fused_fp16.onnx", reference,
                                  _probs(convert_fp16(fp32_model), gate_sets["synthetic"]), CLASSES)
    assert numbers["argmax_agreement"] >= 0.995 and numbers["min_dice"] >= 0.99
    assert 0 < numbers["max_abs_diff"] < 1e-2  # fp16 differs, but only a little


def test_segmentation_parity_fails_on_changed_weights(fp32_model, gate_sets) -> None:
    reference = _probs(fp32_model, gate_sets["synthetic"])
    # Changed decoder weights (what a wrong conversion does): the labels move.
    broken = convert_fp16(_perturbed(fp32_model, 0.5, "decoder"))
    with pytest.raises(GateFailed, match=r"precision gate failed: argmax_agreement 0\.\d+; dice"):
        segmentation_parity("fused_fp16.onnx", reference,
                            _probs(broken, gate_sets["synthetic"]), CLASSES)


def test_segmentation_parity_rejects_nan() -> None:
    probs = np.full((1, 2, 2, 2, 2), 0.5, np.float32)
    bad = probs.copy()
    bad[0, 0, 0, 0, 0] = np.nan
    with pytest.raises(GateFailed, match="NaN"):
        segmentation_parity("x", probs, bad, ["background", "organ"])


def test_dice_per_class_scores_only_present_classes() -> None:
    ref = np.array([0, 0, 1, 1, 2, 2])
    cand = np.array([0, 0, 1, 2, 2, 2])
    scores = dice_per_class(ref, cand, ["bg", "a", "b", "absent"])
    assert scores == pytest.approx({"bg": 1.0, "a": 2 / 3, "b": 0.8})


def test_openvino_bf16_is_gated_where_the_cpu_has_it_and_refused_elsewhere(
        tmp_path: Path, fp32_model, gate_sets) -> None:
    # (OpenVINO fp32 is gated in every export: tests/test_export.py.)
    reason = unsupported_reason("bf16")
    if reason:
        assert "no native bf16" in reason
        with pytest.raises(ExportError, match="no native bf16"):
            openvino_runner(tmp_path / "never_read.xml", "bf16", ("image_a", "image_b"), 8)
        return
    onnx_path = tmp_path / "fused_fp32.onnx"
    onnx.save_model(fp32_model, str(onnx_path))
    xml = tmp_path / "fused_fp32.xml"
    export_openvino(onnx_path, xml, {"precision": "fp32"})
    reference = _probs(fp32_model, gate_sets["synthetic"])
    bf16 = run_batched(openvino_runner(xml, "bf16", ("image_a", "image_b"), 8),
                       gate_sets["synthetic"], 8)
    numbers = segmentation_parity("ov bf16", reference, bf16, CLASSES)
    assert numbers["min_dice"] >= 0.99 and numbers["max_abs_diff"] > 0
