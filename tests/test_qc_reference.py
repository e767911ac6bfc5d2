"""The quality-control reference travels: `cmc train` records it in the checkpoints, `cmc
export` carries it into cmc.json, `ModelInfo.qc_reference` reads it; a model directory
exported before it existed still loads and is still assessed."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from export_fixtures import PREPROCESS, write_micro_checkpoint

from cmc_export.exporter import export
from cmc_serve.model_dir import ModelInfo
from cmc_serve.qc.inputs import QcInputs, RoleImage
from cmc_serve.qc.verdict import assess_case
from cmc_train.checkpoint import load_checkpoint
from cmc_train.config import ModelConfig, PreprocessConfig, RunConfig, TrainConfig
from cmc_train.data.datalist import Datalist
from cmc_train.evaluate import ValidationSet
from cmc_train.qc_reference import record_reference
from cmc_train.run_state import BEST, LAST
from cmc_train.synth import write_synthetic_study
from cmc_train.trainer import train

MICRO = ModelConfig(img_size=16, vit_patch=4, embed_dim=32, depth=2, num_heads=2,
                    neck_channels=16, adapter_dim=8, decoder_channels=4, num_classes=5)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 training, 2 validation and 2 calibration cases, the last one's labels dropped
    (calibration labels are optional)."""
    path = write_synthetic_study(tmp_path_factory.mktemp("study"), cases=3, seed=0, size=32,
                                 labelled_ratio=0.34, val_cases=2, test_cases=0,
                                 calibration_cases=2)
    datalist = Datalist.load(path)
    first, last = datalist.calibration
    replace(datalist, calibration=(first, replace(last, label={}))).save(path)
    return path


RECORDED_SAID: list[str] = []  # what `recorded` reported


@pytest.fixture(scope="module")
def recorded(study: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro checkpoint with the reference recorded as the end of `cmc train` does."""
    path = write_micro_checkpoint(tmp_path_factory.mktemp("ckpt") / "micro.pt")
    datalist = Datalist.load(study)
    val_set = ValidationSet.from_datalist(datalist, PREPROCESS)
    record_reference([path], datalist, val_set, torch.device("cpu"), say=RECORDED_SAID.append)
    return path


def _reference(path: Path) -> dict[str, Any]:
    reference: dict[str, Any] = load_checkpoint(path).metadata["qc_reference"]
    return reference


def test_the_reference_records_fingerprint_anatomy_and_calibration(recorded: Path) -> None:
    reference = _reference(recorded)
    assert reference["version"] == 1
    fingerprints = reference["fingerprint"]
    assert set(fingerprints) == {"ct", "mr"}
    # 3 training, 2 validation and 2 calibration cases; MR z-scored (judged by its
    # profile), CT windowed
    assert fingerprints["ct"]["images"] == 7 and fingerprints["mr"]["images"] == 7
    assert not fingerprints["ct"]["scale_invariant"] and fingerprints["mr"]["scale_invariant"]
    ct_p50 = fingerprints["ct"]["intensity"]["p50"]
    assert ct_p50["min"] <= ct_p50["median"] <= ct_p50["max"]
    assert -200 < ct_p50["median"] < 200  # HU of soft tissue, measured on the raw image
    anatomy = reference["anatomy"]
    assert anatomy["labels"] == 2  # one labelled case, both modalities labelled
    assert set(anatomy["structures"]) == {"liver", "spleen", "kidney_r", "kidney_l"}
    assert [p["right"] for p in anatomy["lateral_pairs"]] == ["kidney_r"]
    calibration = reference["calibration"]
    # the 2 validation and the 2 calibration cases; Dice from the three labelled ones
    assert calibration["cases"] == 4 and calibration["labelled_cases"] == 3
    assert 0.0 <= calibration["validation_mean_dice"] <= 1.0
    assert set(calibration["signals"]) == {"mean_dice", "mean_margin", "cross_a", "cross_b"}
    for stats in calibration["signals"].values():
        assert stats["min"] <= stats["mean"] <= stats["max"]
    assert calibration["anatomy"]["labels"] == 4  # the fused answers to the four cases


def test_the_recording_says_what_it_rests_on_and_warns_when_thin(recorded: Path) -> None:
    (said,) = RECORDED_SAID
    assert said.startswith("micro.pt: quality-control reference recorded (4 held-out cases")
    assert "on the 3 labelled" in said
    assert "fewer than 20: the flags' floors are coarse" in said and "'calibration'" in said


@pytest.mark.slow  # a micro training run (about 40 s on 2 busy cores)
def test_training_records_the_reference_in_both_checkpoints(study: Path, tmp_path: Path) -> None:
    cfg = RunConfig(MICRO, PreprocessConfig(modalities=("ct", "mr"), spacing=(3.0, 3.0, 3.0)),
                    TrainConfig(steps=2, val_every=2, warmup_steps=1, batch_labelled=1,
                                batch_unlabelled=1, seed=1), preset="micro")
    train(study, tmp_path, cfg, progress=False)
    for name in (BEST, LAST):
        reference = _reference(tmp_path / name)
        assert set(reference) == {"version", "fingerprint", "anatomy", "calibration"}
        assert reference["calibration"]["cases"] == 4
    # the resumable checkpoint keeps its trainer state through the rewrite
    assert load_checkpoint(tmp_path / LAST).trainer_state is not None


def test_reference_survives_export_into_model_info(recorded: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    export(recorded, out, formats=("onnx",), precisions=("fp32",), modes=("fused",),
           max_batch=2, log=lambda _: None)
    info = ModelInfo.load(out)
    assert info.qc_reference == json.loads(json.dumps(_reference(recorded)))


def test_model_dir_without_reference_loads_and_is_assessed(model_dir: Path) -> None:
    info = ModelInfo.load(model_dir)
    assert info.qc_reference is None
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[2:5, 2:5, 2:5] = 1
    image = RoleImage(info.modalities[0], np.zeros((8, 8, 8), np.float32), np.eye(4))
    qc = assess_case(info.qc_reference, QcInputs(info.classes, "a", labels, np.eye(4),
                                                 {"a": image}))
    assert qc.signals["reference"].startswith("missing")
    assert not qc.flagged


def test_a_malformed_reference_is_refused(model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from cmc_serve.model_dir import ModelDirError

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    document = json.loads((copy / "cmc.json").read_text())
    document["qc_reference"] = [1, 2]
    (copy / "cmc.json").write_text(json.dumps(document))
    with pytest.raises(ModelDirError, match="qc_reference must be an object"):
        ModelInfo.load(copy)
