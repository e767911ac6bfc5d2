"""The torch-free engine end to end on small real ONNX/OpenVINO patch models
(`engine_fixtures`): cmc.json loading, tiling, blending and the answers against a naive
whole-volume reference. Runtime and precision choice: test_engine_runtimes.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from engine_fixtures import K, P, softmax, write_model_dir
from onnx import numpy_helper

from cmc_serve.engine import Segmenter, SegmenterInputError
from cmc_serve.model_dir import ModelDirError, ModelInfo
from cmc_serve.tiling import TileGrid, clip_box, extract_patch, gaussian_importance

# ---------------------------------------------------------------- cmc.json


def test_model_info_loads(conv3_model_dir: Path) -> None:
    info = ModelInfo.load(conv3_model_dir)
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
def test_model_info_rejects_bad_cmc_json(conv3_model_dir: Path, tmp_path: Path, edit, message: str) -> None:
    meta = json.loads((conv3_model_dir / "cmc.json").read_text())
    edit(meta)
    for sub in ("onnx", "openvino"):
        (tmp_path / sub).symlink_to(conv3_model_dir / sub)
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


def naive_reference(conv3_model_dir: Path, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense full-volume gaussian blending, one tile per ORT call."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(conv3_model_dir / "onnx/fused_fp32.onnx"),
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


def test_onnxruntime_and_openvino_match_naive_reference(conv3_model_dir: Path,
                                                        images: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = images
    ref = naive_reference(conv3_model_dir, a, b)
    for runtime in ("onnxruntime", "openvino"):
        with Segmenter(conv3_model_dir, runtime=runtime, return_probs=True, batch_size=3) as seg:
            result = seg.segment(a, b, mode="fused")
        assert result.runtime == runtime and result.precision == "fp32"
        np.testing.assert_allclose(result.probs, ref, atol=1e-5, err_msg=runtime)
        assert (result.labels == ref.argmax(0)).mean() > 0.999


def test_single_modality_modes_and_auto(conv3_model_dir: Path, images: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = images
    with Segmenter(conv3_model_dir, runtime="onnxruntime") as seg:
        only_b = seg.segment(None, b)
        assert only_b.mode == "b"
        assert seg.segment(a, None).mode == "a"
        assert seg.segment(a, b).mode == "fused"
        explicit = seg.segment(a, b, mode="b")  # image_a is ignored in mode b
    np.testing.assert_array_equal(explicit.labels, only_b.labels)


def test_tta_by_flips(pointwise_dir: Path, conv3_model_dir: Path,
                      images: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = images
    # a pointwise model is flip-equivariant: TTA must not change it
    with Segmenter(pointwise_dir, runtime="onnxruntime", return_probs=True) as plain, \
            Segmenter(pointwise_dir, runtime="onnxruntime", return_probs=True, tta=True) as tta:
        np.testing.assert_allclose(tta.segment(a, b).probs, plain.segment(a, b).probs, atol=1e-6)
    # a 3x3x3 model is not: TTA averages different predictions but mostly agrees
    with Segmenter(conv3_model_dir, runtime="onnxruntime", return_probs=True) as plain, \
            Segmenter(conv3_model_dir, runtime="onnxruntime", return_probs=True, tta=True) as tta:
        p0, p1 = plain.segment(a, b).probs, tta.segment(a, b).probs
    assert np.abs(p0 - p1).max() > 1e-3
    np.testing.assert_allclose(p1.sum(0), 1.0, atol=1e-5)


def test_memmap_input_gives_the_same_result(conv3_model_dir: Path, tmp_path: Path,
                                            images: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = images
    maps = []
    for name, arr in (("a", a), ("b", b)):
        mm = np.lib.format.open_memmap(tmp_path / f"{name}.npy", mode="w+", dtype=np.float32,
                                       shape=arr.shape)
        mm[:] = arr
        mm.flush()
        maps.append(np.load(tmp_path / f"{name}.npy", mmap_mode="r"))
    with Segmenter(conv3_model_dir, runtime="onnxruntime") as seg:
        np.testing.assert_array_equal(seg.segment(*maps).labels, seg.segment(a, b).labels)


def test_volume_smaller_than_patch_and_one_slice(conv3_model_dir: Path) -> None:
    rng = np.random.default_rng(3)
    with Segmenter(conv3_model_dir, runtime="openvino", return_probs=True) as seg:
        for shape in ((5, 9, 7), (1, 40, 21)):
            a, b = rng.normal(size=(2, *shape)).astype(np.float32)
            result = seg.segment(a, b)
            assert result.labels.shape == shape and result.labels.dtype == np.uint8
            np.testing.assert_allclose(result.probs.sum(0), 1.0, atol=1e-5)


# ---------------------------------------------------------------- errors


def test_bad_inputs_are_clear_errors(conv3_model_dir: Path, images: tuple[np.ndarray, np.ndarray],
                                     tmp_path: Path) -> None:
    a, b = images
    nan = a.copy()
    nan[20, 3, 3] = np.nan
    with Segmenter(conv3_model_dir, runtime="onnxruntime") as seg:
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
        Segmenter(conv3_model_dir, runtime="onnxruntime", batch_size=9).segment(a, b)
