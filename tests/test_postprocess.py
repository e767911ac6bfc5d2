"""Post-processing of predictions: the connected-component operations (cmc_serve), their
choice on validation data by `cmc evaluate`, the record in the checkpoint and in the
exported cmc.json, and `cmc segment` applying it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import segment_fixtures as fx
import torch
from cmc_cli.main import app
from typer.testing import CliRunner

from cmc_serve.model_dir import ModelDirError, ModelInfo
from cmc_serve.postprocess import PostprocessError, apply, check_record, clean_class
from cmc_train.checkpoint import (
    build_metadata,
    load_checkpoint,
    record_postprocessing,
    save_checkpoint,
)
from cmc_train.config import ModelConfig, PreprocessConfig
from cmc_train.network import build_cmc
from cmc_train.postprocess_choice import CasePrediction, choose_operations
from cmc_train.synth import CLASSES, write_synthetic_study

MICRO = ModelConfig(img_size=16, vit_patch=4, embed_dim=32, depth=2, num_heads=2,
                    neck_channels=16, adapter_dim=8, decoder_channels=4, num_classes=5)
WIDE = {"COLUMNS": "400"}


def _organ_with_island() -> tuple[np.ndarray, np.ndarray]:
    """Reference: a 6^3 cube of class 1 and a 3^3 cube of class 2; prediction: the same plus a
    2^3 island of class 1 far away (touching nothing)."""
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[2:8, 2:8, 2:8] = 1
    ref[12:15, 2:5, 2:5] = 2
    pred = ref.copy()
    pred[15:17, 15:17, 15:17] = 1
    return pred, ref


def test_largest_component_and_small_component_removal() -> None:
    pred, ref = _organ_with_island()
    cleaned = clean_class(pred, 1, {"op": "largest_component"}, voxel_mm3=8.0)
    np.testing.assert_array_equal(cleaned, ref)
    assert pred[15, 15, 15] == 1  # the input is not modified
    # The island is 8 voxels of 2 mm: 64 mm3. Below 65 mm3 it goes; below 64 it stays.
    np.testing.assert_array_equal(
        clean_class(pred, 1, {"op": "remove_small", "min_mm3": 65.0}, 8.0), ref)
    np.testing.assert_array_equal(
        clean_class(pred, 1, {"op": "remove_small", "min_mm3": 64.0}, 8.0), pred)
    record = {"spacing_mm": [2.0, 2.0, 2.0],
              "modes": {"a": [{"class": 1, "op": "largest_component"}]}}
    np.testing.assert_array_equal(apply(pred, record, "a"), ref)
    np.testing.assert_array_equal(apply(pred, record, "b"), pred)  # nothing for mode b
    np.testing.assert_array_equal(apply(pred, None, "a"), pred)


@pytest.mark.parametrize("record, message", [
    ({"spacing_mm": [2, 2], "modes": {}}, "spacing_mm"),
    ({"spacing_mm": [2, 2, 2], "modes": {"x": []}}, "'x' is not a mode"),
    ({"spacing_mm": [2, 2, 2], "modes": {"a": [{"class": 5, "op": "largest_component"}]}},
     "foreground class 1..4"),
    ({"spacing_mm": [2, 2, 2], "modes": {"a": [{"class": 1, "op": "remove_small"}]}},
     "min_mm3"),
])
def test_invalid_records_are_refused(record: dict, message: str) -> None:
    with pytest.raises(PostprocessError, match=message):
        check_record(record, num_classes=5)


def test_choice_removes_islands_and_leaves_clean_classes_alone() -> None:
    pred, ref = _organ_with_island()
    cases = [CasePrediction("c1", pred, ref, (2.0, 2.0, 2.0)),
             CasePrediction("c2", ref.copy(), ref, (2.0, 2.0, 2.0))]
    ops = choose_operations(cases, ["background", "liver", "spleen"])
    assert [(op["class"], op["name"]) for op in ops] == [(1, "liver")]
    assert ops[0]["op"] in ("largest_component", "remove_small")
    np.testing.assert_array_equal(clean_class(pred, 1, ops[0], 8.0), ref)
    # Two true components of one class (e.g. a split organ): keeping the largest would
    # lose Dice, so nothing is chosen.
    twin = ref.copy()
    twin[2:8, 12:18, 2:8] = 1
    assert choose_operations([CasePrediction("c", twin, twin, (2.0, 2.0, 2.0))],
                             ["background", "liver", "spleen"]) == []


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_study(tmp_path_factory.mktemp("study"), cases=1, seed=2, size=32,
                                 val_cases=1, test_cases=1)


def _checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    path = folder / "model.pt"
    prep = PreprocessConfig(modalities=("ct", "mr"), spacing=(3.0, 3.0, 3.0))
    save_checkpoint(path, build_cmc(MICRO).state_dict(),
                    build_metadata(MICRO, prep, list(CLASSES), {"steps": 0}))
    return path


def test_evaluate_chooses_on_validation_records_in_checkpoint_and_applies_it(
        study: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    weights = load_checkpoint(ckpt).state_dict
    runner = CliRunner()
    refused = runner.invoke(app, ["evaluate", str(ckpt), "--data", str(study), "--out",
                                  str(tmp_path / "t.json"), "--choose-postprocessing"], env=WIDE)
    assert refused.exit_code == 2 and "not on the test split" in refused.output

    chosen = runner.invoke(app, ["evaluate", str(ckpt), "--data", str(study), "--split",
                                 "validation", "--out", str(tmp_path / "v.json"),
                                 "--choose-postprocessing", "--modes", "a,b",
                                 "--threads", "1"], env=WIDE)
    assert chosen.exit_code == 0, chosen.output
    assert "post-processing recorded in" in chosen.output
    metrics = json.loads((tmp_path / "v.json").read_text())
    record = load_checkpoint(ckpt).metadata["postprocessing"]
    assert record == metrics["postprocessing"]
    assert record["spacing_mm"] == [3.0, 3.0, 3.0] and set(record["modes"]) == {"a", "b"}
    assert record["chosen_on"].startswith("validation split of datalist.json")
    check_record(record, 5)
    # A random network scatters every class: islands to remove in some class and mode.
    assert any(record["modes"].values())
    for mode, summary in metrics["modes"].items():
        if record["modes"][mode]:
            raw = summary["without_postprocessing"]
            assert summary["mean_fg_dice"] >= raw["mean_fg_dice"]
    reloaded = load_checkpoint(ckpt)
    assert all(torch.equal(weights[k], reloaded.state_dict[k]) for k in weights)

    # Evaluation applies the recorded choice unless told not to.
    again = runner.invoke(app, ["evaluate", str(ckpt), "--data", str(study), "--split",
                                "validation", "--out", str(tmp_path / "v2.json"),
                                "--modes", "a,b"], env=WIDE)
    assert again.exit_code == 0, again.output
    applied = json.loads((tmp_path / "v2.json").read_text())
    assert applied["modes"]["a"]["mean_fg_dice"] == metrics["modes"]["a"]["mean_fg_dice"]
    raw = runner.invoke(app, ["evaluate", str(ckpt), "--data", str(study), "--split",
                              "validation", "--out", str(tmp_path / "v3.json"), "--modes",
                              "a,b", "--no-postprocessing"], env=WIDE)
    assert raw.exit_code == 0, raw.output
    unprocessed = json.loads((tmp_path / "v3.json").read_text())
    assert "postprocessing" not in unprocessed
    assert all(unprocessed["modes"][m]["postprocessing"] == "none" for m in ("a", "b"))


def test_export_carries_the_choice_to_cmc_json_and_triton(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    record = {"chosen_on": "test", "spacing_mm": [3.0, 3.0, 3.0],
              "modes": {"a": [{"class": 2, "name": "spleen", "op": "largest_component"}]}}
    record_postprocessing(ckpt, record)
    with pytest.raises(Exception, match="foreground class"):
        record_postprocessing(ckpt, {**record, "modes": {"a": [{"class": 9, "op":
                                                                "largest_component"}]}})
    model = tmp_path / "model"
    result = CliRunner().invoke(app, ["export", str(ckpt), "--out", str(model), "--format",
                                      "onnx", "--precision", "fp32", "--modes", "a"])
    assert result.exit_code == 0, result.output
    assert json.loads((model / "cmc.json").read_text())["postprocessing"] == record
    assert ModelInfo.load(model).postprocessing == record
    config = (model / "repository" / "cmc" / "config.pbtxt").read_text()
    assert 'key: "postprocessing"' in config and "largest_component" in config


def test_segment_applies_the_model_dirs_postprocessing(tmp_path: Path) -> None:
    model = fx.make_model_dir(tmp_path / "model")
    shape = (24, 24, 16)
    affine = fx.ras_affine(fx.SPACING, shape)
    image = np.full(shape, fx.CT_BACKGROUND, np.float32)
    image[4:14, 4:14, 4:12] = fx.CT_OBJECT   # the organ
    image[19:21, 19:21, 12:14] = fx.CT_OBJECT  # a 2^3-voxel island (64 mm3 at 2 mm)
    ct = fx.write_nifti(tmp_path / "in" / "p1_ct.nii.gz", image, affine)

    def segment(out: Path) -> np.ndarray:
        result = CliRunner().invoke(app, ["segment", str(ct), "-o", str(out), "--model",
                                          str(model), "--mode", "a", "--runtime",
                                          "onnxruntime", "--output-type", "nifti"])
        assert result.exit_code == 0, result.output
        (seg,) = out.glob("*/seg.nii.gz")
        return np.asarray(nib.load(str(seg)).dataobj)

    raw = segment(tmp_path / "raw")
    assert raw[20, 20, 13] == 1 and raw[8, 8, 8] == 1
    record = {"spacing_mm": list(fx.SPACING), "modes": {
        "a": [{"class": 1, "name": "bright_a", "op": "remove_small", "min_mm3": 100.0}]}}
    fx.make_model_dir(model, postprocessing=record)
    cleaned = segment(tmp_path / "cleaned")
    assert cleaned[20, 20, 13] == 0 and cleaned[8, 8, 8] == 1
    expected = raw.copy()
    expected[19:21, 19:21, 12:14] = 0
    np.testing.assert_array_equal(cleaned, expected)

    record["modes"]["a"][0]["class"] = 7
    fx.make_model_dir(model, postprocessing=record)
    with pytest.raises(ModelDirError, match="foreground class 1..2"):
        ModelInfo.load(model)


pytest_plugins = ["triton_fixture"]  # triton_install: a local tritonserver (marker triton)


@pytest.mark.triton
def test_triton_volume_model_applies_the_recorded_postprocessing(
        triton_install: Any, tmp_path: Path) -> None:
    """Server-side tiling returns what the local engine plus `cmc_serve.postprocess` give."""
    import triton_fixture as tf

    from cmc_export.triton_repository import PatchGraph, write_repository
    from cmc_serve.engine import Segmenter
    from cmc_serve.triton.client import TritonVolumeClient
    from cmc_serve.triton.server import TritonServer

    probe = subprocess.run([str(triton_install.venv / "bin" / "python"), "-c",
                            "import scipy.ndimage"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"{triton_install.venv} has no scipy (installed before post-processing "
                    "needed it): re-run `make triton-server`")
    model = tf.write_model_dir(tmp_path / "model")
    record = {"spacing_mm": [1.5, 1.5, 1.5], "modes": {"fused": [
        {"class": 1, "name": "liver", "op": "largest_component"},
        {"class": 2, "name": "spleen", "op": "remove_small", "min_mm3": 20.0}]}}
    shutil.rmtree(model / "repository")
    write_repository(model / "repository", tf.NAME, "python",
                     [PatchGraph("fused", "onnxruntime", "fp32", model / "onnx" / "fused_fp32.onnx")],
                     tf.PATCH, len(tf.CLASSES), tf.MAX_BATCH, postprocessing=record)
    rng = np.random.default_rng(3)
    image_a = rng.normal(size=(24, 20, 18)).astype(np.float32)
    image_b = rng.normal(size=(24, 20, 18)).astype(np.float32)
    with Segmenter(model, runtime="onnxruntime") as local:
        raw = local.segment(image_a, image_b).labels
    expected = apply(raw, record, "fused")
    assert not np.array_equal(expected, raw)  # random weights: islands to remove
    with TritonServer(model / "repository", install=triton_install,
                      ready_timeout_s=90) as server:
        client = TritonVolumeClient(f"http://{server.http_url}", tf.NAME)
        try:
            served = client.segment(image_a, image_b).labels
        finally:
            client.close()
    np.testing.assert_array_equal(served, expected)
