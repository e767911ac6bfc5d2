"""The torch-free engine end to end on small real ONNX/OpenVINO patch models.

The fixture builds CMC-shaped patch graphs with onnx.helper (inputs image_a/image_b
[N, 1, P, P, P], a convolution per modality to K channels, softmax, fused = mean of the
two softmaxes, as DESIGN.md specifies), converts them to OpenVINO IR, and writes a
matching cmc.json, so these tests exercise the real runtimes without the trainer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import cmc_serve.runtimes.openvino_rt as openvino_rt
from cmc_common.contract import MODES
from cmc_serve.engine import Segmenter, SegmenterInputError
from cmc_serve.model_dir import ModelDirError, ModelInfo
from cmc_serve.model_json import ModelJson, graph_entry, write_model_json
from cmc_serve.runtimes import RuntimeUnavailable, open_runtime
from cmc_serve.runtimes.openvino_rt import unsupported_reason
from cmc_serve.runtimes.precision import choose_precision
from cmc_serve.tiling import TileGrid, clip_box, extract_patch, gaussian_importance

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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("conv3"), kernel_size=3)


@pytest.fixture(scope="module")
def pointwise_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("conv1"), kernel_size=1, modes=("fused",),
                           openvino=False)


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    shape = (29, 23, 19)
    return (rng.normal(size=shape).astype(np.float32),
            rng.normal(size=shape).astype(np.float32))


def softmax(x: np.ndarray, axis: int = 0) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


# ---------------------------------------------------------------- cmc.json


def test_model_info_loads(model_dir: Path) -> None:
    info = ModelInfo.load(model_dir)
    assert info.num_classes == K and info.patch_size == (P, P, P) and info.modes == ("fused", "a", "b")
    assert info.graph("a", "openvino", "bf16").path.name == "a_fp32.xml"  # bf16 = hint on fp32 IR
    with pytest.raises(ModelDirError, match="no graph for mode=a runtime=onnxruntime precision=fp16"):
        info.graph("a", "onnxruntime", "fp16")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.update(format_version=2), "format_version 2 is not supported"),
    (lambda m: m.update(format="something-else"), "not an exported cmc model"),
    (lambda m: m.pop("classes"), "missing key 'classes'"),
    (lambda m: m.update(patch_size=[16, 16]), "patch_size must be 3 positive integers"),
    (lambda m: m["graphs"][0].update(file="onnx/nope.onnx"), "does not exist"),
    (lambda m: m["graphs"][0].update(inputs=["image_a"]), "mode fused needs inputs"),
    (lambda m: m["graphs"].append(dict(m["graphs"][0])), "duplicate graph entries"),
])
def test_model_info_rejects_bad_cmc_json(model_dir: Path, tmp_path: Path, edit, message: str) -> None:
    meta = json.loads((model_dir / "cmc.json").read_text())
    edit(meta)
    for sub in ("onnx", "openvino"):
        (tmp_path / sub).symlink_to(model_dir / sub)
    (tmp_path / "cmc.json").write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match=message) as err:
        ModelInfo.load(tmp_path)
    assert str(tmp_path / "cmc.json") in str(err.value) and "\n" not in str(err.value)


def test_model_info_missing_dir_and_file(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="not a directory"):
        ModelInfo.load(tmp_path / "absent")
    with pytest.raises(ModelDirError, match="cmc.json: missing"):
        ModelInfo.load(tmp_path)
    (tmp_path / "cmc.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="cannot read JSON"):
        ModelInfo.load(tmp_path)


# ---------------------------------------------------------------- results


def test_pointwise_model_equals_whole_volume_evaluation(pointwise_dir: Path,
                                                        images: tuple[np.ndarray, np.ndarray]) -> None:
    """A 1x1x1 model is position independent, so tiling+blending must give back exactly the
    voxel-wise model applied to the whole volume: an end-to-end check independent of the
    tiling code."""
    a, b = images
    info = ModelInfo.load(pointwise_dir)
    graph = onnx.load(info.graph("fused", "onnxruntime", "fp32").path)
    w = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    expected = 0.5 * sum(
        softmax(w[f"{n}_w"][:, 0, 0, 0, 0, None, None, None] * img[None]
                + w[f"{n}_b"][:, None, None, None])
        for n, img in (("image_a", a), ("image_b", b)))
    with Segmenter(pointwise_dir, runtime="onnxruntime", return_probs=True) as seg:
        result = seg.segment(a, b)
    assert result.mode == "fused" and result.runtime == "onnxruntime"
    np.testing.assert_allclose(result.probs, expected, atol=2e-6)
    np.testing.assert_array_equal(result.labels, expected.argmax(0))


def naive_reference(model_dir: Path, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense full-volume gaussian blending, one tile per ORT call."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_dir / "onnx/fused_fp32.onnx"),
                                providers=["CPUExecutionProvider"])
    grid = TileGrid.build(a.shape, (P, P, P), 0.5)
    weights = gaussian_importance((P, P, P))
    acc = np.zeros((K, *a.shape), np.float64)
    wsum = np.zeros(a.shape, np.float64)
    for origin in grid.origins():
        feed = {"image_a": extract_patch(a, origin, grid.patch)[None, None],
                "image_b": extract_patch(b, origin, grid.patch)[None, None]}
        probs = sess.run(["probs"], feed)[0][0]
        boxes = [clip_box(o, P, n) for o, n in zip(origin, a.shape, strict=True)]
        vol = tuple(slice(lo, hi) for lo, hi, _ in boxes)
        loc = tuple(slice(off, off + hi - lo) for lo, hi, off in boxes)
        acc[(slice(None), *vol)] += probs[(slice(None), *loc)] * weights[loc]
        wsum[vol] += weights[loc]
    return acc / wsum


def test_onnxruntime_and_openvino_match_naive_reference(model_dir: Path,
                                                        images: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = images
    ref = naive_reference(model_dir, a, b)
    for runtime in ("onnxruntime", "openvino"):
        with Segmenter(model_dir, runtime=runtime, return_probs=True, batch_size=3) as seg:
            result = seg.segment(a, b, mode="fused")
        assert result.runtime == runtime and result.precision == "fp32"
        np.testing.assert_allclose(result.probs, ref, atol=1e-5, err_msg=runtime)
        assert (result.labels == ref.argmax(0)).mean() > 0.999


def test_single_modality_modes_and_auto(model_dir: Path, images: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = images
    with Segmenter(model_dir, runtime="onnxruntime") as seg:
        only_b = seg.segment(None, b)
        assert only_b.mode == "b"
        assert seg.segment(a, None).mode == "a"
        assert seg.segment(a, b).mode == "fused"
        explicit = seg.segment(a, b, mode="b")  # image_a is ignored in mode b
    np.testing.assert_array_equal(explicit.labels, only_b.labels)


def test_tta_by_flips(pointwise_dir: Path, model_dir: Path,
                      images: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = images
    # a pointwise model is flip-equivariant: TTA must not change it
    with Segmenter(pointwise_dir, runtime="onnxruntime", return_probs=True) as plain, \
            Segmenter(pointwise_dir, runtime="onnxruntime", return_probs=True, tta=True) as tta:
        np.testing.assert_allclose(tta.segment(a, b).probs, plain.segment(a, b).probs, atol=1e-6)
    # a 3x3x3 model is not: TTA averages different predictions but mostly agrees
    with Segmenter(model_dir, runtime="onnxruntime", return_probs=True) as plain, \
            Segmenter(model_dir, runtime="onnxruntime", return_probs=True, tta=True) as tta:
        p0, p1 = plain.segment(a, b).probs, tta.segment(a, b).probs
    assert np.abs(p0 - p1).max() > 1e-3
    np.testing.assert_allclose(p1.sum(0), 1.0, atol=1e-5)


def test_memmap_input_gives_the_same_result(model_dir: Path, tmp_path: Path,
                                            images: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = images
    maps = []
    for name, arr in (("a", a), ("b", b)):
        mm = np.lib.format.open_memmap(tmp_path / f"{name}.npy", mode="w+", dtype=np.float32,
                                       shape=arr.shape)
        mm[:] = arr
        mm.flush()
        maps.append(np.load(tmp_path / f"{name}.npy", mmap_mode="r"))
    with Segmenter(model_dir, runtime="onnxruntime") as seg:
        np.testing.assert_array_equal(seg.segment(*maps).labels, seg.segment(a, b).labels)


def test_volume_smaller_than_patch_and_one_slice(model_dir: Path) -> None:
    rng = np.random.default_rng(3)
    with Segmenter(model_dir, runtime="openvino", return_probs=True) as seg:
        for shape in ((5, 9, 7), (1, 40, 21)):
            a, b = rng.normal(size=(2, *shape)).astype(np.float32)
            result = seg.segment(a, b)
            assert result.labels.shape == shape and result.labels.dtype == np.uint8
            np.testing.assert_allclose(result.probs.sum(0), 1.0, atol=1e-5)


# ---------------------------------------------------------------- errors


def test_bad_inputs_are_clear_errors(model_dir: Path, images: tuple[np.ndarray, np.ndarray],
                                     tmp_path: Path) -> None:
    a, b = images
    nan = a.copy()
    nan[20, 3, 3] = np.nan
    with Segmenter(model_dir, runtime="onnxruntime") as seg:
        with pytest.raises(SegmenterInputError, match=r"image_a contains NaN.*slices 16\.\.28"):
            seg.segment(nan, b)
        with pytest.raises(SegmenterInputError, match="image shapes differ"):
            seg.segment(a, b[:-1])
        with pytest.raises(SegmenterInputError, match=r"\[D, H, W\] volume"):
            seg.segment(a[0], b[0])
        with pytest.raises(SegmenterInputError, match=r"mode 'fused' needs.*missing \['image_b'\]"):
            seg.segment(a, None, mode="fused")
        with pytest.raises(SegmenterInputError, match="unknown mode"):
            seg.segment(a, b, mode="both")
    partial = write_model_dir(tmp_path / "fused_only", 1, modes=("fused", "a"), openvino=False)
    with Segmenter(partial, runtime="onnxruntime") as seg:
        with pytest.raises(SegmenterInputError, match=r"mode 'b' is not exported.*\['fused', 'a'\]"):
            seg.segment(a, b, mode="b")
        with pytest.raises(SegmenterInputError, match="no exported mode"):
            seg.segment(None, b)
    with pytest.raises(ValueError, match="batch size 9 outside 1..4"):
        Segmenter(model_dir, runtime="onnxruntime", batch_size=9).segment(a, b)


# ---------------------------------------------------------------- runtime selection


def test_auto_prefers_openvino_on_cpu(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    info = ModelInfo.load(model_dir)
    with caplog.at_level(logging.INFO, logger="cmc_serve"):
        rt = open_runtime(info, "fused")
    assert rt.name == "openvino" and rt.device == "cpu" and rt.max_batch == MAX_BATCH
    assert "mode fused runs on openvino/cpu/fp32" in caplog.text


def test_openvino_reads_onnx_when_no_ir(pointwise_dir: Path) -> None:
    rt = open_runtime(ModelInfo.load(pointwise_dir), "fused", runtime="openvino")
    x = np.zeros((2, 1, P, P, P), np.float32)
    assert rt.run({"image_a": x, "image_b": x}).shape == (2, K, P, P, P)


def test_onnxruntime_logs_the_provider(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cmc_serve"):
        rt = open_runtime(ModelInfo.load(model_dir), "a", runtime="onnxruntime")
    assert rt.name == "onnxruntime"
    assert "fused" not in caplog.text and "a_fp32.onnx on CPUExecutionProvider" in caplog.text


def test_cuda_without_gpu_is_unavailable(model_dir: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this host has a CUDA onnxruntime")
    info = ModelInfo.load(model_dir)
    with pytest.raises(RuntimeUnavailable, match="no CUDAExecutionProvider"):
        open_runtime(info, "fused", runtime="onnxruntime", device="cuda")
    with pytest.raises(RuntimeUnavailable, match="no runtime can run mode fused on cuda"):
        open_runtime(info, "fused", runtime="auto", device="cuda")
    with pytest.raises(RuntimeUnavailable, match="openvino runs on cpu"):
        open_runtime(info, "fused", runtime="openvino", device="cuda")


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_silent_cpu_fallback_is_detected(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu without a usable GPU creates a CPU session without raising; with
    CUDA claimed available, the real session falls back and we must refuse it."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this host really has CUDA")
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(RuntimeUnavailable, match="fell back to .*CPUExecutionProvider"):
        open_runtime(ModelInfo.load(model_dir), "fused", runtime="onnxruntime", device="cuda")


def test_tensorrt_unavailable_is_clear(model_dir: Path) -> None:
    info = ModelInfo.load(model_dir)
    with pytest.raises(RuntimeUnavailable, match="tensorrt runs on cuda only"):
        open_runtime(info, "fused", runtime="tensorrt", device="cpu")
    from cmc_serve.runtimes import tensorrt_rt

    if getattr(tensorrt_rt.trt, "Runtime", None) is None:
        with pytest.raises(RuntimeUnavailable, match="tensorrt is not installed"):
            tensorrt_rt.TensorRtRuntime(model_dir / "onnx/fused_fp32.onnx", inputs=("image_a",),
                                        output="probs", precision="fp16", max_batch=1)
    with pytest.raises(RuntimeUnavailable, match="no graph for mode=fused runtime=tensorrt"):
        open_runtime(info, "fused", runtime="tensorrt", device="cuda")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_openvino_half_precision_runs_only_when_native(model_dir: Path, precision: str,
                                                        images: tuple[np.ndarray, np.ndarray]) -> None:
    import openvino as ov

    native = precision.upper() in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    a, b = images
    seg = Segmenter(model_dir, runtime="openvino", precision=precision, return_probs=True)
    if not native:
        with pytest.raises(RuntimeUnavailable, match=f"no native {precision}"):
            seg.segment(a, b)
        if precision == "bf16":  # auto has no ONNX Runtime bf16 graph to fall back on
            with pytest.raises(RuntimeUnavailable, match="onnxruntime .*bf16"):
                Segmenter(model_dir, runtime="auto", precision="bf16").segment(a, b)
        return
    with seg, Segmenter(model_dir, runtime="openvino", return_probs=True) as fp32:
        np.testing.assert_allclose(seg.segment(a, b).probs, fp32.segment(a, b).probs, atol=3e-2)


def test_auto_precision_runs_the_gated_bf16_graph_where_the_cpu_has_it(
        tmp_path: Path, model_dir: Path, images: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = images
    gated = write_model_dir(tmp_path / "gated", kernel_size=3, gated_half=("bf16",))
    native = unsupported_reason("bf16") is None
    with Segmenter(gated) as seg:  # runtime and precision auto, as `cmc segment` defaults
        result = seg.segment(a, b)
    assert (result.runtime, result.precision) == ("openvino", "bf16" if native else "fp32")
    assert result.precision_reason.startswith("auto: bf16, the fastest gated graph" if native
                                              else "auto: fp32 (bf16: not native here")
    # Without a gated bf16 graph, auto stays on fp32 even on a CPU that has bf16.
    with Segmenter(model_dir) as seg:
        result = seg.segment(a, b)
    assert result.precision == "fp32" and "no gated bf16 graph" in result.precision_reason


@pytest.mark.parametrize(("native", "expected"), [(("BF16", "FP16"), "bf16"), (("FP16",), "fp16"),
                                                  ((), "fp32")],
                         ids=["amx_fp16_host", "fp16_only_host", "plain_avx512_host"])
def test_auto_precision_logic_on_every_kind_of_host(monkeypatch: pytest.MonkeyPatch,
                                                    native: tuple[str, ...], expected: str) -> None:
    # OpenVINO's answer for the CPU is the only input replaced: the capability check and the
    # choice run as shipped.
    monkeypatch.setattr(openvino_rt, "cpu_capabilities",
                        lambda: ("test host", ("FP32", "INT8", *native)))
    assert choose_precision("openvino", "cpu", {"fp32", "bf16", "fp16"}).precision == expected
    assert choose_precision("openvino", "cpu", {"fp32"}).precision == "fp32"
    # ONNX Runtime's fp16 CPU kernels are slower than fp32: never chosen on a CPU.
    assert choose_precision("onnxruntime", "cpu", {"fp32", "fp16"}).precision == "fp32"
    assert choose_precision("tensorrt", "cuda", {"fp32", "fp16"}).precision == "fp16"


def test_unknown_choices_are_value_errors(model_dir: Path) -> None:
    info = ModelInfo.load(model_dir)
    for kwargs in ({"runtime": "tflite"}, {"device": "tpu"}, {"precision": "int4"}):
        with pytest.raises(ValueError, match="unknown"):
            open_runtime(info, "fused", **kwargs)


def test_segmenter_takes_a_loaded_model_info(model_dir: Path,
                                             images: tuple[np.ndarray, np.ndarray]) -> None:
    """A caller that has the ModelInfo already (a `cmc segment` run) hands it over: it is used
    as is, not read again, and segments exactly as the model directory does."""
    a, b = images
    info = ModelInfo.load(model_dir)
    with Segmenter(info, runtime="onnxruntime") as given, \
            Segmenter(model_dir, runtime="onnxruntime") as loaded:
        assert given.model is info
        np.testing.assert_array_equal(given.segment(a, b).labels, loaded.segment(a, b).labels)


def test_triton_is_a_runtime_that_needs_its_server(model_dir: Path) -> None:
    """runtime "triton" goes through the same selection as the local runtimes; the server
    URL is given exactly when it is used."""
    info = ModelInfo.load(model_dir)
    with pytest.raises(RuntimeUnavailable, match="--runtime triton needs --server"):
        open_runtime(info, "fused", runtime="triton")
    with pytest.raises(RuntimeUnavailable, match="--server is only used with --runtime triton"):
        open_runtime(info, "fused", runtime="onnxruntime", server="grpc://127.0.0.1:8001")
    with pytest.raises(RuntimeUnavailable, match="--runtime triton needs --server"):
        Segmenter(info, runtime="triton")



def test_one_overlap_limit_for_the_api_the_engine_and_the_tiling(model_dir: Path) -> None:
    """`cmc segment --overlap`, `SegmentOptions`, `Segmenter` and `TileGrid` accept the same
    range, 0 to MAX_OVERLAP (0.95)."""
    from cmc_common.contract import MAX_OVERLAP
    from cmc_serve.pipeline.api import SegmentOptionError, SegmentOptions

    too_much = MAX_OVERLAP + 0.01
    with pytest.raises(SegmentOptionError, match="0.95"):
        SegmentOptions(overlap=too_much)
    with pytest.raises(ValueError, match="0.95"):
        Segmenter(model_dir, overlap=too_much)
    with pytest.raises(ValueError, match="0.95"):
        TileGrid.build((20, 20, 20), (P, P, P), too_much)
    assert len(TileGrid.build((20, 20, 20), (P, P, P), MAX_OVERLAP)) > 0

@pytest.mark.gpu
def test_onnxruntime_cuda_matches_cpu(model_dir: Path, images: tuple[np.ndarray, np.ndarray]) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with a CUDA GPU (CUDAExecutionProvider unavailable)")
    a, b = images
    with Segmenter(model_dir, runtime="onnxruntime", device="cuda", return_probs=True) as gpu, \
            Segmenter(model_dir, runtime="onnxruntime", return_probs=True) as cpu:
        result = gpu.segment(a, b)
        assert result.device == "cuda"
        np.testing.assert_allclose(result.probs, cpu.segment(a, b).probs, atol=1e-4)
