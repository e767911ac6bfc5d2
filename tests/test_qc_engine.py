"""Quality control's engine half: the fused graph's branch outputs, gated and stitched.

The fused graph returns each decoder's softmax beside `probs`; the gates must refuse a graph
whose branch outputs are wrong even when `probs` is right, and the engine must stitch the
branches exactly as a direct per-tile computation does, in bounded memory, and say
"unavailable" (None) for a graph exported before those outputs.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from export_fixtures import MICRO, micro_net
from onnx import TensorProto, helper, numpy_helper

from cmc_common.contract import MODE_OUTPUTS
from cmc_export.emulated_precision import emulate
from cmc_export.errors import GateFailed
from cmc_export.fp16 import convert_fp16
from cmc_export.gate_inputs import random_patches
from cmc_export.gates import RoundingNoise, fp32_parity, outputs_parity, run_batched
from cmc_export.onnx_export import onnxruntime_runner, trace_to_onnx
from cmc_export.patch_graph import patch_graph, torch_runner
from cmc_serve.engine import Segmenter
from cmc_serve.model_json import ModelJson, graph_entry, write_model_json
from cmc_serve.tiling import TileGrid, clip_box, extract_patch, gaussian_importance

S = MICRO.img_size
OUTPUTS = MODE_OUTPUTS["fused"]
CLASSES = ["background", "liver", "spleen", "kidney_r", "kidney_l"]
P, K = 16, 3


# ---------------------------------------------------------------- gates

@pytest.fixture(scope="module")
def fused() -> tuple[onnx.ModelProto, dict[str, np.ndarray], np.ndarray]:
    """(fp32 fused graph with branch outputs, random patches, PyTorch's joined outputs)."""
    graph = patch_graph(micro_net(logit_scale=5.0), "fused")
    inputs = random_patches("fused", S)
    return (trace_to_onnx(graph, "fused", S), inputs,
            run_batched(torch_runner(graph, OUTPUTS), inputs, 8))


def swapped_branches(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose `probs_a` / `probs_b` outputs return each other's values (`probs`,
    their mean, is unchanged): a graph only the branch-output gate can catch."""
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    nodes = {n.output[0]: n for n in broken.graph.node if n.output[0] in OUTPUTS[1:]}
    a, b = nodes["probs_a"], nodes["probs_b"]
    a.input[0], b.input[0] = b.input[0], a.input[0]
    return broken


Fused = tuple[onnx.ModelProto, dict[str, np.ndarray], np.ndarray]


def test_fused_graph_has_branch_outputs_whose_mean_is_probs(fused: Fused) -> None:
    model, inputs, reference = fused
    assert [o.name for o in model.graph.output] == list(OUTPUTS)
    probs, probs_a, probs_b = np.split(reference, 3, axis=1)
    np.testing.assert_allclose(probs, 0.5 * (probs_a + probs_b), atol=1e-6)
    assert np.abs(probs_a - probs_b).max() > 0.05  # two decoders, two answers


def test_fp32_gate_checks_every_output_and_refuses_swapped_branches(fused: Fused) -> None:
    model, inputs, reference = fused
    good = run_batched(onnxruntime_runner(model, outputs=OUTPUTS), inputs, 8)
    numbers = fp32_parity("fused_fp32.onnx", {"random": reference}, {"random": good},
                          outputs=OUTPUTS)
    assert {"max_abs_diff_random", "max_abs_diff_random_probs_a",
            "max_abs_diff_random_probs_b"} <= set(numbers)
    bad = run_batched(onnxruntime_runner(swapped_branches(model), outputs=OUTPUTS), inputs, 8)
    np.testing.assert_allclose(bad[:, :len(CLASSES)], good[:, :len(CLASSES)], atol=1e-6)
    with pytest.raises(GateFailed, match=r"fp32 parity gate failed: .*"
                                         r"max_abs_diff_random_probs_a 0\.\d"):
        fp32_parity("fused_fp32.onnx", {"random": reference}, {"random": bad}, outputs=OUTPUTS)


def test_half_precision_gate_judges_each_branch_output(fused: Fused) -> None:
    model, inputs, _ = fused
    reference = run_batched(onnxruntime_runner(model, outputs=OUTPUTS), inputs, 8)
    emulated = run_batched(onnxruntime_runner(emulate(model, "fp16"), outputs=OUTPUTS),
                           inputs, 8)
    noise = RoundingNoise.measure_outputs("fp16", reference, emulated, OUTPUTS)
    fp16 = convert_fp16(model)
    candidate = run_batched(onnxruntime_runner(fp16, outputs=OUTPUTS), inputs, 8)
    gate = outputs_parity("fused_fp16.onnx", reference, candidate, OUTPUTS, CLASSES, noise)
    assert set(gate["branch_outputs"]) == {"probs_a", "probs_b"}
    broken = run_batched(onnxruntime_runner(swapped_branches(fp16), outputs=OUTPUTS),
                         inputs, 8)
    with pytest.raises(GateFailed, match=r"fused_fp16\.onnx probs_a: precision gate failed"):
        outputs_parity("fused_fp16.onnx", reference, broken, OUTPUTS, CLASSES, noise)
    with pytest.raises(GateFailed, match="output shape"):  # an old graph: probs only
        outputs_parity("fused_fp16.onnx", reference, candidate[:, :len(CLASSES)], OUTPUTS,
                       CLASSES, noise)


# ---------------------------------------------------------------- engine

def _branch_graph(kernels: dict[str, np.ndarray], branch_outputs: bool) -> onnx.ModelProto:
    """A fused graph like CMC's: a 3x3x3 convolution + softmax per branch (each sees both
    images), `probs` their mean; with `branch_outputs` the two softmaxes are outputs too."""
    def io(name: str, c: int) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", c, P, P, P])

    nodes = [helper.make_node("Concat", ["image_a", "image_b"], ["x"], axis=1)]
    init = [numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    for role, kernel in kernels.items():
        nodes += [helper.make_node("Conv", ["x", f"w_{role}"], [f"logits_{role}"], pads=[1] * 6),
                  helper.make_node("Softmax", [f"logits_{role}"], [f"p_{role}"], axis=1),
                  helper.make_node("Identity", [f"p_{role}"], [f"probs_{role}"])]
        init.append(numpy_helper.from_array(kernel, f"w_{role}"))
    nodes += [helper.make_node("Add", ["p_a", "p_b"], ["both"]),
              helper.make_node("Mul", ["both", "half"], ["probs"])]
    outputs = list(OUTPUTS) if branch_outputs else ["probs"]
    graph = helper.make_graph(nodes, "fused", [io("image_a", 1), io("image_b", 1)],
                              [io(n, K) for n in outputs], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _model_dir(root: Path, branch_outputs: bool = True) -> Path:
    rng = np.random.default_rng(5)
    kernels = {r: rng.normal(scale=1.5, size=(K, 2, 3, 3, 3)).astype(np.float32)
               for r in ("a", "b")}
    (root / "onnx").mkdir(parents=True)
    onnx.save(_branch_graph(kernels, branch_outputs), root / "onnx/fused_fp32.onnx")
    write_model_json(root, ModelJson(
        name="qc", cmc_version="0.1.0", modalities=["ct", "mr"],
        classes=["background", "liver", "kidney"], patch_size=[P] * 3, max_batch=4,
        preprocessing={"modalities": ["ct", "mr"], "spacing": [2.0, 2.0, 2.0]},
        checkpoint_sha256="0" * 64,
        graphs=[graph_entry("fused", "onnxruntime", "fp32", "onnx/fused_fp32.onnx")]))
    return root


@pytest.fixture(scope="module")
def branch_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model_dir(tmp_path_factory.mktemp("branches"))


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    a, b = rng.normal(size=(2, 29, 23, 19)).astype(np.float32)
    return a, b


def direct_branches(model_dir: Path, a: np.ndarray, b: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Dense float64 blending of every output, one tile per ONNX Runtime call: (fused
    labels, labels_a, labels_b, fused margin per voxel)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_dir / "onnx/fused_fp32.onnx"),
                                   providers=["CPUExecutionProvider"])
    grid = TileGrid.build(a.shape, (P, P, P), 0.5)
    weights = gaussian_importance((P, P, P))
    acc = np.zeros((3, K, *a.shape))
    wsum = np.zeros(a.shape)
    for origin in grid.origins():
        feed = {"image_a": extract_patch(a, origin, grid.patch)[None, None],
                "image_b": extract_patch(b, origin, grid.patch)[None, None]}
        tiles = [t[0] for t in session.run(list(OUTPUTS), feed)]
        boxes = [clip_box(o, P, n) for o, n in zip(origin, a.shape, strict=True)]
        vol = tuple(slice(lo, hi) for lo, hi, _ in boxes)
        loc = tuple(slice(off, off + hi - lo) for lo, hi, off in boxes)
        for i, tile in enumerate(tiles):
            acc[i][(slice(None), *vol)] += tile[(slice(None), *loc)] * weights[loc]
        wsum[vol] += weights[loc]
    probs = acc[0] / wsum
    ordered = np.sort(probs, axis=0)
    return probs.argmax(0), acc[1].argmax(0), acc[2].argmax(0), ordered[-1] - ordered[-2]


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_engine_branches_match_a_direct_per_tile_computation(
        branch_dir: Path, images: tuple[np.ndarray, np.ndarray], runtime: str) -> None:
    a, b = images
    labels, labels_a, labels_b, margin = direct_branches(branch_dir, a, b)
    with Segmenter(branch_dir, runtime=runtime, batch_size=3) as seg:
        result = seg.segment(a, b, branches=True)
        plain = seg.segment(a, b)
    branches = result.branches
    assert branches is not None and plain.branches is None
    np.testing.assert_array_equal(result.labels, plain.labels)  # QC never changes the answer
    assert branches.labels_a.dtype == branches.labels_b.dtype == np.uint8
    assert (branches.labels_a == labels_a).mean() > 0.999
    assert (branches.labels_b == labels_b).mean() > 0.999
    assert (branches.labels_a != branches.labels_b).mean() > 0.1  # the branches differ
    np.testing.assert_array_equal(branches.voxel_count,
                                  np.bincount(result.labels.ravel(), minlength=K))
    expected = np.bincount(result.labels.ravel(), weights=margin.ravel(), minlength=K)
    np.testing.assert_allclose(branches.margin_sum, expected, rtol=1e-4)
    assert (result.labels == labels).mean() > 0.999


def test_a_fused_graph_exported_before_branch_outputs_still_serves(
        tmp_path: Path, branch_dir: Path, images: tuple[np.ndarray, np.ndarray]) -> None:
    old = _model_dir(tmp_path / "old", branch_outputs=False)
    with Segmenter(old, runtime="onnxruntime") as seg, \
            Segmenter(branch_dir, runtime="onnxruntime") as new:
        result = seg.segment(*images, branches=True)
        assert result.branches is None  # unavailable, never invented
        np.testing.assert_array_equal(result.labels, new.segment(*images).labels)


def _peak_bytes(model_dir: Path, depth: int) -> int:
    rng = np.random.default_rng(depth)
    a, b = rng.normal(size=(2, depth, 40, 40)).astype(np.float32)
    with Segmenter(model_dir, runtime="onnxruntime") as seg:
        seg.segment(a[:20], b[:20], branches=True)  # runtime opened before measuring
        tracemalloc.start()
        try:
            seg.segment(a, b, branches=True)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()


def test_branch_stitching_allocates_nothing_volume_sized_in_float(branch_dir: Path) -> None:
    """Four times the depth may add the three uint8 label volumes (fused, a, b), not one
    float per voxel: the accumulators stay about one patch depth deep."""
    shallow, deep = _peak_bytes(branch_dir, 48), _peak_bytes(branch_dir, 192)
    added_voxels = (192 - 48) * 40 * 40
    assert (deep - shallow) / added_voxels < 3.5, (shallow, deep)


@pytest.mark.triton
def test_triton_patch_model_serves_the_branch_outputs(triton_server: Any, tiny_model_dir: Path
                                                      ) -> None:
    """The Triton runtime returns the fused graph's branches as the local runtime does."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(2, 24, 20, 12)).astype(np.float32)
    with Segmenter(tiny_model_dir, runtime="onnxruntime") as local, \
            Segmenter(tiny_model_dir, runtime="triton",
                      server=f"grpc://{triton_server.grpc_url}") as remote:
        expected = local.segment(a, b, branches=True).branches
        served = remote.segment(a, b, branches=True).branches
    assert expected is not None and served is not None
    for field in ("labels_a", "labels_b", "voxel_count"):
        np.testing.assert_array_equal(getattr(served, field), getattr(expected, field))
    np.testing.assert_allclose(served.margin_sum, expected.margin_sum, rtol=1e-3)


def test_tta_flips_the_branch_outputs_with_the_tiles(branch_dir: Path,
                                                     images: tuple[np.ndarray, np.ndarray]
                                                     ) -> None:
    with Segmenter(branch_dir, runtime="onnxruntime", tta=True) as seg:
        result = seg.segment(*images, branches=True)
        single = seg.segment(*images)
    assert result.branches is not None
    np.testing.assert_array_equal(result.labels, single.labels)
    np.testing.assert_array_equal(result.branches.voxel_count,
                                  np.bincount(result.labels.ravel(), minlength=K))


def test_export_writes_and_gates_the_fused_branch_outputs(tmp_path: Path) -> None:
    from export_fixtures import write_micro_checkpoint

    from cmc_export.exporter import export
    from cmc_serve.model_dir import ModelInfo

    ckpt = write_micro_checkpoint(tmp_path / "micro.pt")
    report = export(ckpt, tmp_path / "model", formats=("onnx",), precisions=("fp32",),
                    modes=("fused", "a"), log=lambda line: None)
    gates = {g["mode"]: g["gate"] for g in report.graphs}
    assert gates["fused"]["max_abs_diff_synthetic_probs_b"] <= gates["fused"]["tolerance"]
    assert not any(k.endswith(("_probs_a", "_probs_b")) for k in gates["a"])
    info = ModelInfo.load(tmp_path / "model")
    model = onnx.load(info.graph("fused", "onnxruntime", "fp32").path)
    assert [o.name for o in model.graph.output] == list(OUTPUTS)
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(2, 20, 18, 17)).astype(np.float32)
    with Segmenter(info, runtime="onnxruntime") as seg:
        assert seg.segment(a, b, branches=True).branches is not None
