"""Reference arms (cmc_train.baselines): multi-level Otsu thresholds and a label atlas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cmc_train.baselines import ThresholdModel, atlas_labels, multi_otsu, reference_arm
from cmc_train.config import preset_run_config
from cmc_train.data.loaders import EvalVolume
from cmc_train.synth import CLASSES, write_synthetic_study


def _volume(image: np.ndarray, label: np.ndarray, origin: tuple[float, float, float] = (0, 0, 0),
            spacing: float = 2.0) -> EvalVolume:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = origin
    return EvalVolume("case", "ct", torch.from_numpy(image[None].astype(np.float32)),
                      torch.from_numpy(label[None].astype(np.int64)), affine)


def test_multi_otsu_finds_the_gaps_between_intensity_modes() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(m, 0.3, 4000) for m in (0.0, 5.0, 9.0)])
    cuts = multi_otsu(values, 3)
    assert cuts.shape == (2,)
    assert 1.0 < cuts[0] < 4.0 and 6.0 < cuts[1] < 8.0, cuts
    with pytest.raises(ValueError, match="finite"):
        multi_otsu(np.array([1.0, np.nan]), 3)


def test_thresholds_give_each_class_its_intensity_region() -> None:
    rng = np.random.default_rng(1)
    label = rng.integers(0, 3, size=(12, 12, 12))
    image = np.choose(label, [0.0, 0.5, 1.0]) + rng.normal(0, 0.03, label.shape)
    model = ThresholdModel.fit([_volume(image, label)], num_classes=3, levels=3)
    np.testing.assert_array_equal(model.predict(image), label)
    # Two classes of one intensity: one region, given to one of them; the other gets none.
    image_overlap = np.where(label == 2, 0.5, image)
    model = ThresholdModel.fit([_volume(image_overlap, label)], num_classes=3, levels=2)
    assert sorted(model.region_class.tolist()) in ([0, 1], [0, 2])


def test_atlas_majority_vote_superposes_field_of_view_centres() -> None:
    label = np.zeros((10, 10, 10), np.uint8)
    label[3:7, 3:7, 3:7] = 1
    other = np.zeros_like(label)
    other[0:2, 0:2, 0:2] = 2
    # Two atlases agree on class 1 (one stored with another origin: the centres are
    # superposed, not the world positions); the third disagrees and is outvoted.
    atlas = [_volume(np.zeros((10, 10, 10)), label),
             _volume(np.zeros((10, 10, 10)), label, origin=(40.0, -30.0, 7.0)),
             _volume(np.zeros((10, 10, 10)), other)]
    target = np.diag([2.0, 2.0, 2.0, 1.0])
    target[:3, 3] = (100.0, 0.0, 0.0)
    np.testing.assert_array_equal(atlas_labels(atlas, (10, 10, 10), target, 3), label)
    # A target grid with half the spacing: the cube doubles in voxels.
    fine = np.diag([1.0, 1.0, 1.0, 1.0])
    voted = atlas_labels(atlas, (20, 20, 20), fine, 3)
    assert abs(int((voted == 1).sum()) - 8 * 64) <= 8 * 64 * 0.3


@pytest.fixture(scope="module")
def datalist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_study(tmp_path_factory.mktemp("base") / "study", cases=2, seed=3,
                                 size=28, labelled_ratio=1.0, val_cases=0, test_cases=2)


@pytest.mark.parametrize("arm", ["thresholds", "atlas"])
def test_reference_arm_scores_test_cases_like_cmc_evaluate(datalist: Path, arm: str) -> None:
    preprocess = preset_run_config("tiny", len(CLASSES), ("ct", "mr")).preprocess
    result = reference_arm(arm, datalist, preprocess, "test")
    assert result["arm"] == arm and set(result["modes"]) == {"a", "b"}
    for mode in result["modes"].values():
        assert mode["num_cases"] == 2
        assert set(mode["dice"]) == set(CLASSES[1:])
        assert all(0.0 <= d <= 1.0 for d in mode["dice"].values())
    # On the easy phantom the liver is large and bright on CT: both floors find part of it.
    assert result["modes"]["a"]["dice"]["liver"] > 0.3, result["modes"]["a"]["dice"]
    with pytest.raises(ValueError, match="unknown reference arm"):
        reference_arm("median", datalist, preprocess)
