"""Parity gates: they pass correct graphs and refuse deliberately broken ones, on any host.

Half precision is emulated in ONNX Runtime where the CPU lacks it, so every verdict is
checked here; the native OpenVINO bf16 / fp16 tests run where the CPU has them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from export_fixtures import CLASSES, MICRO, PREPROCESS, micro_net
from onnx import numpy_helper

from cmc_export.emulated_precision import emulate, round_to
from cmc_export.errors import GateFailed
from cmc_export.fault_injection import inject
from cmc_export.fp16 import FP32_OPS, convert_fp16
from cmc_export.gate_inputs import mode_inputs, random_patches, synthetic_tiles
from cmc_export.gates import (
    RoundingNoise,
    dice_per_class,
    fp32_parity,
    run_batched,
    segmentation_parity,
)
from cmc_export.onnx_export import onnxruntime_runner, trace_to_onnx
from cmc_export.openvino_export import export_openvino, openvino_runner, unsupported_reason
from cmc_export.patch_graph import patch_graph, torch_runner
from cmc_serve.errors import RuntimeUnavailable

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


def _noise(model: onnx.ModelProto, precision: str, inputs: dict[str, np.ndarray],
           reference: np.ndarray) -> RoundingNoise:
    return RoundingNoise.measure(precision, reference, _probs(emulate(model, precision), inputs))


# Correct half-precision graphs built on any host: the fp16 converter's graph (fp16 weights
# and activations, statistics in fp32), and rounding with normalisations and softmax kept
# in fp32 as OpenVINO's bf16 / fp16 kernels keep them.
CORRECT = {
    "onnx_fp16": ("fp16", convert_fp16),
    "bf16_fp32_statistics": ("bf16", lambda m: emulate(m, "bf16", FP32_OPS)),
    "fp16_fp32_statistics": ("fp16", lambda m: emulate(m, "fp16", FP32_OPS)),
}


# logit_scale 5 makes the micro model about as confident as a trained one, with more bf16
# rounding noise than the trained checkpoints of docs/GATES.md (a harder case for the gate).
TRAINED = 5.0


@pytest.fixture(scope="module", params=[1.0, TRAINED], ids=["barely_trained", "trained"])
def judged(request) -> tuple[onnx.ModelProto, dict[str, np.ndarray], np.ndarray]:
    """(fp32 graph, gate inputs, reference probs) of a near-uniform and a confident model."""
    graph = patch_graph(micro_net(logit_scale=request.param), "fused")
    model = trace_to_onnx(graph, "fused", S)
    inputs = mode_inputs(synthetic_tiles(PREPROCESS, S), "fused")
    return model, inputs, _probs(model, inputs)


@pytest.mark.parametrize("candidate", sorted(CORRECT))
def test_correct_half_precision_graphs_pass(judged, candidate: str) -> None:
    model, inputs, reference = judged
    precision, build = CORRECT[candidate]
    numbers = segmentation_parity(candidate, reference, _probs(build(model), inputs), CLASSES,
                                  _noise(model, precision, inputs, reference))
    assert numbers["decided_agreement"] >= 0.999 and 0 < numbers["prob_error_max"]
    assert numbers["limits"]["decided_margin"] >= 0.05 and numbers["noise"]["emulated"] == precision


@pytest.mark.parametrize("fault", ["nan", "overflow", "wrong_layer", "swapped_inputs"])
def test_broken_half_precision_graphs_are_refused(judged, fault: str) -> None:
    model, inputs, reference = judged
    noise = _noise(model, "bf16", inputs, reference)
    broken = _probs(inject(emulate(model, "bf16"), fault), inputs)
    with pytest.raises(GateFailed, match=r"precision gate failed: .*(NaN/inf|prob_error_p999 "
                                         r"\d\.\d+ > \d\.\d+ \(3 x emulated bf16)"):
        segmentation_parity(fault, reference, broken, CLASSES, noise)


def test_a_class_losing_two_dice_points_is_refused() -> None:
    model = trace_to_onnx(patch_graph(micro_net(logit_scale=TRAINED), "a"), "a", S)
    inputs = mode_inputs(synthetic_tiles(PREPROCESS, S), "a")
    reference = _probs(model, inputs)
    noise = _noise(model, "bf16", inputs, reference)
    labels = reference.argmax(axis=1)
    organ = int(np.bincount(labels.ravel(), minlength=len(CLASSES))[1:].argmax()) + 1
    # The smallest logit shift that costs the largest organ 2 Dice points over all voxels.
    for bias in (0.05, 0.1, 0.2, 0.3, 0.5):
        biased = _probs(inject(emulate(model, "bf16"), "class_bias", organ, bias), inputs)
        if dice_per_class(labels, biased.argmax(axis=1), CLASSES)[CLASSES[organ]] <= 0.98:
            break
    else:
        pytest.fail("no tried bias costs the organ 2 Dice points")
    with pytest.raises(GateFailed, match="precision gate failed"):
        segmentation_parity(f"bias {bias}", reference, biased, CLASSES, noise)


def test_changed_decoder_weights_are_refused(fp32_model, gate_sets) -> None:
    reference = _probs(fp32_model, gate_sets["synthetic"])
    noise = _noise(fp32_model, "fp16", gate_sets["synthetic"], reference)
    # Changed decoder weights (what a wrong conversion does): the labels move.
    broken = convert_fp16(_perturbed(fp32_model, 0.5, "decoder"))
    with pytest.raises(GateFailed, match=r"fused_fp16\.onnx: precision gate failed: "
                                         r"prob_error_p999 0\.\d+ > "):
        segmentation_parity("fused_fp16.onnx", reference,
                            _probs(broken, gate_sets["synthetic"]), CLASSES, noise)


def test_segmentation_parity_rejects_nan() -> None:
    probs = np.full((1, 2, 2, 2, 2), 0.5, np.float32)
    bad = probs.copy()
    bad[0, 0, 0, 0, 0] = np.nan
    with pytest.raises(GateFailed, match="NaN"):
        segmentation_parity("x", probs, bad, ["background", "organ"],
                            RoundingNoise("bf16", 0.0, 0.0))


def test_noise_sets_the_limits_and_small_classes_are_not_scored() -> None:
    # 2000 voxels: class 1 decided on 1967, class 2 on 3 (below the 0.5 % share), 30 undecided.
    reference = np.zeros((1, 3, 20, 10, 10), np.float32)
    reference[0, 0] = 0.1
    reference[0, 1] = 0.9
    reference[0, 2, 0, 0, :3] = 0.95
    reference[0, 1, 0, 0, :3] = 0.05
    coin_toss = (slice(None), slice(None), 19, slice(None), slice(0, 3))
    reference[coin_toss] = np.array([0.33, 0.34, 0.33])[:, None, None]
    candidate = reference.copy()
    candidate[coin_toss] = np.array([0.34, 0.33, 0.33])[:, None, None]
    candidate[0, :, 0, 0, 0] = (0.1, 0.5, 0.4)  # one flipped voxel of the small class
    noise = RoundingNoise("bf16", 0.004, 0.01)
    numbers = segmentation_parity("x", reference, candidate, ["bg", "organ", "tiny"], noise)
    assert numbers["limits"]["max_prob_error_p999"] == pytest.approx(3 * 0.004 + 0.005)
    assert numbers["limits"]["decided_margin"] == 0.05  # 2 x 0.01, raised to the minimum
    assert numbers["unscored_classes"] == ["tiny"] and set(numbers["dice"]) == {"organ"}
    assert numbers["argmax_agreement"] < 0.99 < numbers["decided_agreement"]
    # The same candidate against a sharper model's noise: its error is within the limit.
    assert segmentation_parity("x", reference, candidate, ["bg", "organ", "tiny"],
                               RoundingNoise("bf16", 0.2, 0.3))["limits"]["decided_margin"] == 0.5


def test_dice_per_class_scores_only_present_classes() -> None:
    ref = np.array([0, 0, 1, 1, 2, 2])
    cand = np.array([0, 0, 1, 2, 2, 2])
    scores = dice_per_class(ref, cand, ["bg", "a", "b", "absent"])
    assert scores == pytest.approx({"bg": 1.0, "a": 2 / 3, "b": 0.8})


def test_round_to_rounds_half_to_even() -> None:
    values = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-9, np.inf, -2.5e-3], np.float32)
    np.testing.assert_array_equal(round_to(values, "bf16")[:5],
                                  [1.0, 1.0, 1 + 2**-6, 1.0, np.inf])
    assert abs(round_to(values, "bf16")[5] + 2.5e-3) < 2.5e-3 * 2**-8
    np.testing.assert_array_equal(round_to(values, "fp16"), values.astype(np.float16))


def _ov_graph(tmp_path: Path, model: onnx.ModelProto) -> Path:
    onnx_path = tmp_path / "fused_fp32.onnx"
    onnx.save_model(model, str(onnx_path))
    xml = tmp_path / "fused_fp32.xml"
    export_openvino(onnx_path, xml, {"precision": "fp32"})
    return xml


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_native_openvino_half_precision_passes_the_gate(tmp_path: Path, judged,
                                                        precision: str) -> None:
    reason = unsupported_reason(precision)
    if reason:
        pytest.skip(f"needs native {precision} (the emulated tests above cover the gate "
                    f"logic on this host): {reason}")
    model, inputs, reference = judged
    runner = openvino_runner(_ov_graph(tmp_path, model), precision, ("image_a", "image_b"), 8)
    numbers = segmentation_parity(f"ov {precision}", reference, run_batched(runner, inputs, 8),
                                  CLASSES, _noise(model, precision, inputs, reference))
    assert numbers["decided_agreement"] >= 0.999 and numbers["prob_error_max"] > 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_openvino_refuses_a_half_precision_the_cpu_lacks(tmp_path: Path, precision: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # On every host, AMX ones included: OpenVINO's capability list is played as a CPU that
    # has the other half precision but not this one.
    import cmc_serve.runtimes.openvino_rt as openvino_rt

    other = {"bf16": "FP16", "fp16": "BF16"}[precision]
    monkeypatch.setattr(openvino_rt, "cpu_capabilities", lambda: ("test host", ("FP32", other)))
    with pytest.raises(RuntimeUnavailable, match=f"no native {precision}"):
        openvino_runner(tmp_path / "never_read.xml", precision, ("image_a", "image_b"), 8)
