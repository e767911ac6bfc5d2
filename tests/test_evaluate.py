"""`evaluate` / `cmc evaluate` on a tiny synthetic study, and world-coordinate resampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cmc_cli.main import app
from typer.testing import CliRunner

from cmc_train.checkpoint import build_metadata, save_checkpoint
from cmc_train.config import ModelConfig, PreprocessConfig
from cmc_train.data.datalist import Datalist
from cmc_train.data.loaders import validation_volumes
from cmc_train.evaluate import dead_classes, evaluate, resample_onto, spacing_of
from cmc_train.metrics import per_class_metrics
from cmc_train.network import build_cmc
from cmc_train.sliding_window import predict_labels
from cmc_train.synth import CLASSES, write_synthetic_study

MICRO = ModelConfig(img_size=16, vit_patch=4, embed_dim=32, depth=2, num_heads=2,
                    neck_channels=16, adapter_dim=8, decoder_channels=4, num_classes=5)
PREPROCESS = PreprocessConfig(modalities=("ct", "mr"), spacing=(3.0, 3.0, 3.0))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_study(tmp_path_factory.mktemp("study"), cases=1, seed=1, size=32,
                                 val_cases=0, test_cases=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, build_cmc(MICRO).state_dict(),
                    build_metadata(MICRO, PREPROCESS, list(CLASSES), {"steps": 0}))
    return path


def test_evaluate_reports_every_class_and_mode(study: Path, checkpoint: Path) -> None:
    result = evaluate(checkpoint, study, "test")
    assert result["spacing_mm"] == [3.0, 3.0, 3.0] and result["split"] == "test"
    assert set(result["modes"]) == {"fused", "a", "b"}
    assert result["modes"]["a"]["modality"] == "ct" and result["modes"]["b"]["modality"] == "mr"
    fg = list(CLASSES[1:])
    for summary in result["modes"].values():
        assert summary["num_cases"] == 1
        assert list(summary["dice"]) == fg and list(summary["hd95_mm"]) == fg
        assert all(0.0 <= d <= 1.0 for d in summary["dice"].values())
        assert all(h is None or h >= 0.0 for h in summary["hd95_mm"].values())
        assert summary["mean_fg_dice"] == pytest.approx(np.mean(list(summary["dice"].values())))
    json.dumps(result, allow_nan=False)  # strict JSON: undefined HD95 is null, not NaN

    # The mode-b numbers are those of a direct whole-volume prediction of that volume.
    net_input = build_cmc(MICRO)
    net_input.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    (vol,) = [v for v in validation_volumes(Datalist.load(study), PREPROCESS, "test")
              if v.modality == "mr"]
    pred = predict_labels(net_input, None, vol.image[0], "b", MICRO.img_size)
    direct = per_class_metrics(pred, vol.label[0].numpy(), 5, spacing_of(vol.affine))
    case = result["modes"]["b"]["cases"][vol.case_id]
    assert list(case["dice"].values()) == pytest.approx(direct["dice"])


def test_cli_writes_metrics_and_refuses_mismatched_data(
    study: Path, checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "metrics.json"
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(checkpoint), "--data", str(study), "--out",
                                 str(out), "--modes", "a"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert list(metrics["modes"]) == ["a"] and metrics["modes"]["a"]["num_cases"] == 1

    data = json.loads(study.read_text())
    data["classes"] = data["classes"][:-1]
    other = study.parent / "fewer_classes.json"
    other.write_text(json.dumps(data))
    result = runner.invoke(app, ["evaluate", str(checkpoint), "--data", str(other), "--out",
                                 str(tmp_path / "x.json")])
    assert result.exit_code == 2
    assert "fewer_classes.json: classes" in result.output
    assert not (tmp_path / "x.json").exists()


def test_resample_onto_follows_world_coordinates() -> None:
    image = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    assert torch.equal(resample_onto(image, affine, (4, 5, 6), affine), image)

    shifted = affine.copy()
    shifted[:3, 3] = [2.0, 0.0, 0.0]  # destination voxel i sits on source voxel i + 1
    out = resample_onto(image, affine, (3, 5, 6), shifted)
    assert torch.allclose(out, image[1:])

    flipped = affine.copy()
    flipped[0, 0], flipped[0, 3] = -2.0, 6.0  # same voxels, first axis reversed
    assert torch.allclose(resample_onto(image, affine, (4, 5, 6), flipped), image.flip(0))

    half = np.diag([1.0, 2.0, 3.0, 1.0])  # twice as fine along the first axis
    out = resample_onto(image, affine, (7, 5, 6), half)
    assert torch.allclose(out[1], 0.5 * (image[0] + image[1]))
    assert torch.allclose(out[-1], image[-1])


def test_dead_classes_are_named_per_modality() -> None:
    scores = {"ct": [0.9, 0.0, 0.8], "mr": [0.9, 0.01, 0.0]}
    assert dead_classes(scores, ["liver", "spleen", "kidney"]) == ["ct spleen", "mr kidney"]
    assert dead_classes({"ct": [0.5, 0.2, 0.1]}, ["liver", "spleen", "kidney"]) == []
