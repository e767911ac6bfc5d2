"""Choosing and opening the patch runtime, device and precision on the engine test models
(`engine_fixtures`): auto's choices on every kind of host, refusals that say why, Triton.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from engine_fixtures import MAX_BATCH, K, P, write_model_dir

import cmc_serve.runtimes.openvino_rt as openvino_rt
from cmc_serve.engine import Segmenter
from cmc_serve.model_dir import ModelInfo
from cmc_serve.runtimes import RuntimeUnavailable, open_runtime
from cmc_serve.runtimes.openvino_rt import unsupported_reason
from cmc_serve.runtimes.precision import choose_precision
from cmc_serve.tiling import TileGrid

# ---------------------------------------------------------------- runtime selection


def test_auto_prefers_openvino_on_cpu(conv3_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    info = ModelInfo.load(conv3_model_dir)
    with caplog.at_level(logging.INFO, logger="cmc_serve"):
        rt = open_runtime(info, "fused")
    assert rt.name == "openvino" and rt.device == "cpu" and rt.max_batch == MAX_BATCH
    assert "mode fused runs on openvino/cpu/fp32" in caplog.text


def test_openvino_reads_onnx_when_no_ir(pointwise_dir: Path) -> None:
    rt = open_runtime(ModelInfo.load(pointwise_dir), "fused", runtime="openvino")
    x = np.zeros((2, 1, P, P, P), np.float32)
    assert rt.run({"image_a": x, "image_b": x}).shape == (2, K, P, P, P)


def test_onnxruntime_logs_the_provider(conv3_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cmc_serve"):
        rt = open_runtime(ModelInfo.load(conv3_model_dir), "a", runtime="onnxruntime")
    assert rt.name == "onnxruntime"
    assert "fused" not in caplog.text and "a_fp32.onnx on CPUExecutionProvider" in caplog.text


def test_cuda_without_gpu_is_unavailable(conv3_model_dir: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this host has a CUDA onnxruntime")
    info = ModelInfo.load(conv3_model_dir)
    with pytest.raises(RuntimeUnavailable, match="no CUDAExecutionProvider"):
        open_runtime(info, "fused", runtime="onnxruntime", device="cuda")
    with pytest.raises(RuntimeUnavailable, match="no runtime can run mode fused on cuda"):
        open_runtime(info, "fused", runtime="auto", device="cuda")
    with pytest.raises(RuntimeUnavailable, match="openvino runs on cpu"):
        open_runtime(info, "fused", runtime="openvino", device="cuda")


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_silent_cpu_fallback_is_detected(conv3_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu without a usable GPU creates a CPU session without raising; with
    CUDA claimed available, the real session falls back and we must refuse it."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this host really has CUDA")
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(RuntimeUnavailable, match="fell back to .*CPUExecutionProvider"):
        open_runtime(ModelInfo.load(conv3_model_dir), "fused", runtime="onnxruntime", device="cuda")


def test_tensorrt_unavailable_is_clear(conv3_model_dir: Path) -> None:
    info = ModelInfo.load(conv3_model_dir)
    with pytest.raises(RuntimeUnavailable, match="tensorrt runs on cuda only"):
        open_runtime(info, "fused", runtime="tensorrt", device="cpu")
    from cmc_serve.runtimes import tensorrt_rt

    if getattr(tensorrt_rt.trt, "Runtime", None) is None:
        with pytest.raises(RuntimeUnavailable, match="tensorrt is not installed"):
            tensorrt_rt.TensorRtRuntime(conv3_model_dir / "onnx/fused_fp32.onnx", inputs=("image_a",),
                                        output="probs", precision="fp16", max_batch=1)
    with pytest.raises(RuntimeUnavailable, match="no graph for mode=fused runtime=tensorrt"):
        open_runtime(info, "fused", runtime="tensorrt", device="cuda")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_openvino_half_precision_runs_only_when_native(conv3_model_dir: Path, precision: str,
                                                        images: tuple[np.ndarray, np.ndarray]) -> None:
    import openvino as ov

    native = precision.upper() in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    a, b = images
    seg = Segmenter(conv3_model_dir, runtime="openvino", precision=precision, return_probs=True)
    if not native:
        with pytest.raises(RuntimeUnavailable, match=f"no native {precision}"):
            seg.segment(a, b)
        if precision == "bf16":  # auto has no ONNX Runtime bf16 graph to fall back on
            with pytest.raises(RuntimeUnavailable, match="onnxruntime .*bf16"):
                Segmenter(conv3_model_dir, runtime="auto", precision="bf16").segment(a, b)
        return
    with seg, Segmenter(conv3_model_dir, runtime="openvino", return_probs=True) as fp32:
        np.testing.assert_allclose(seg.segment(a, b).probs, fp32.segment(a, b).probs, atol=3e-2)


def test_auto_precision_runs_the_gated_bf16_graph_where_the_cpu_has_it(
        tmp_path: Path, conv3_model_dir: Path, images: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = images
    gated = write_model_dir(tmp_path / "gated", kernel_size=3, gated_half=("bf16",))
    native = unsupported_reason("bf16") is None
    with Segmenter(gated) as seg:  # runtime and precision auto, as `cmc segment` defaults
        result = seg.segment(a, b)
    assert (result.runtime, result.precision) == ("openvino", "bf16" if native else "fp32")
    assert result.precision_reason.startswith("auto: bf16, the fastest gated graph" if native
                                              else "auto: fp32 (bf16: not native here")
    # Without a gated bf16 graph, auto stays on fp32 even on a CPU that has bf16.
    with Segmenter(conv3_model_dir) as seg:
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


def test_unknown_choices_are_value_errors(conv3_model_dir: Path) -> None:
    info = ModelInfo.load(conv3_model_dir)
    for kwargs in ({"runtime": "tflite"}, {"device": "tpu"}, {"precision": "int4"}):
        with pytest.raises(ValueError, match="unknown"):
            open_runtime(info, "fused", **kwargs)


def test_segmenter_takes_a_loaded_model_info(conv3_model_dir: Path,
                                             images: tuple[np.ndarray, np.ndarray]) -> None:
    """A caller that has the ModelInfo already (a `cmc segment` run) hands it over: it is used
    as is, not read again, and segments exactly as the model directory does."""
    a, b = images
    info = ModelInfo.load(conv3_model_dir)
    with Segmenter(info, runtime="onnxruntime") as given, \
            Segmenter(conv3_model_dir, runtime="onnxruntime") as loaded:
        assert given.model is info
        np.testing.assert_array_equal(given.segment(a, b).labels, loaded.segment(a, b).labels)


def test_triton_is_a_runtime_that_needs_its_server(conv3_model_dir: Path) -> None:
    """runtime "triton" goes through the same selection as the local runtimes; the server
    URL is given exactly when it is used."""
    info = ModelInfo.load(conv3_model_dir)
    with pytest.raises(RuntimeUnavailable, match="--runtime triton needs --server"):
        open_runtime(info, "fused", runtime="triton")
    with pytest.raises(RuntimeUnavailable, match="--server is only used with --runtime triton"):
        open_runtime(info, "fused", runtime="onnxruntime", server="grpc://127.0.0.1:8001")
    with pytest.raises(RuntimeUnavailable, match="--runtime triton needs --server"):
        Segmenter(info, runtime="triton")



def test_one_overlap_limit_for_the_api_the_engine_and_the_tiling(conv3_model_dir: Path) -> None:
    """`cmc segment --overlap`, `SegmentOptions`, `Segmenter` and `TileGrid` accept the same
    range, 0 to MAX_OVERLAP (0.95)."""
    from cmc_common.contract import MAX_OVERLAP
    from cmc_serve.pipeline.api import SegmentOptionError, SegmentOptions

    too_much = MAX_OVERLAP + 0.01
    with pytest.raises(SegmentOptionError, match="0.95"):
        SegmentOptions(overlap=too_much)
    with pytest.raises(ValueError, match="0.95"):
        Segmenter(conv3_model_dir, overlap=too_much)
    with pytest.raises(ValueError, match="0.95"):
        TileGrid.build((20, 20, 20), (P, P, P), too_much)
    assert len(TileGrid.build((20, 20, 20), (P, P, P), MAX_OVERLAP)) > 0

@pytest.mark.gpu
def test_onnxruntime_cuda_matches_cpu(conv3_model_dir: Path, images: tuple[np.ndarray, np.ndarray]) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with a CUDA GPU (CUDAExecutionProvider unavailable)")
    a, b = images
    with Segmenter(conv3_model_dir, runtime="onnxruntime", device="cuda", return_probs=True) as gpu, \
            Segmenter(conv3_model_dir, runtime="onnxruntime", return_probs=True) as cpu:
        result = gpu.segment(a, b)
        assert result.device == "cuda"
        np.testing.assert_allclose(result.probs, cpu.segment(a, b).probs, atol=1e-4)
