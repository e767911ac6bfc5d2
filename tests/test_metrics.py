"""Dice and HD95 against values computed by hand on simple shapes (incl. anisotropic spacing)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cmc_train.metrics import dice, hd95, per_class_metrics, surface


def _empty(shape: tuple[int, int, int] = (10, 10, 10)) -> np.ndarray:
    return np.zeros(shape, dtype=bool)


def test_dice_of_overlapping_boxes() -> None:
    pred, ref = _empty(), _empty()
    pred[0:4, 0:5, 0:5] = True  # 100 voxels
    ref[2:6, 0:5, 0:5] = True  # 100 voxels, 50 shared
    assert dice(pred, ref) == pytest.approx(2 * 50 / 200)


def test_dice_empty_conventions() -> None:
    one = _empty()
    one[3, 3, 3] = True
    assert dice(_empty(), _empty()) == 1.0
    assert dice(one, _empty()) == 0.0
    assert dice(one, one) == 1.0


def test_surface_of_a_cube_is_its_shell() -> None:
    mask = _empty()
    mask[2:5, 2:5, 2:5] = True
    assert int(surface(mask).sum()) == 26  # 27 voxels minus the centre
    border = np.ones((3, 3, 3), dtype=bool)  # the volume edge counts as outside
    assert int(surface(border).sum()) == 26


@pytest.mark.parametrize(
    ("axis", "spacing", "expected_mm"),
    [(0, (2.0, 1.0, 1.0), 6.0), (2, (1.0, 1.0, 0.5), 1.5), (1, (0.7, 3.0, 0.7), 9.0)],
)
def test_hd95_between_parallel_planes_uses_spacing(
    axis: int, spacing: tuple[float, float, float], expected_mm: float
) -> None:
    pred, ref = _empty(), _empty()
    index_pred: list[slice | int] = [slice(None)] * 3
    index_ref: list[slice | int] = [slice(None)] * 3
    index_pred[axis], index_ref[axis] = 2, 5  # three voxels apart along `axis`
    pred[tuple(index_pred)] = True
    ref[tuple(index_ref)] = True
    assert hd95(pred, ref, spacing) == pytest.approx(expected_mm)
    assert hd95(ref, pred, spacing) == pytest.approx(expected_mm)


def test_hd95_diagonal_distance_between_voxels() -> None:
    pred, ref = _empty(), _empty()
    pred[1, 1, 1] = True
    ref[4, 5, 1] = True
    assert hd95(pred, ref, (1.0, 2.0, 5.0)) == pytest.approx(math.hypot(3 * 1.0, 4 * 2.0))


def test_hd95_ignores_a_five_percent_outlier() -> None:
    ref = _empty((12, 10, 10))
    ref[0] = True  # a 10 x 10 plane: 100 surface voxels
    pred = ref.copy()
    pred[11, 0, 0] = True  # one stray voxel 11 mm away: the plain Hausdorff distance is 11
    assert hd95(pred, ref, (1.0, 1.0, 1.0)) == pytest.approx(0.0)


def test_hd95_empty_conventions() -> None:
    one = _empty()
    one[3, 3, 3] = True
    assert hd95(_empty(), _empty(), (1, 1, 1)) == 0.0
    assert math.isnan(hd95(one, _empty(), (1, 1, 1)))
    with pytest.raises(ValueError, match="spacing"):
        hd95(one, one, (1.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        hd95(one, _empty((10, 10, 9)), (1, 1, 1))


def test_per_class_metrics_on_label_volumes() -> None:
    ref = np.zeros((10, 10, 10), dtype=np.uint8)
    ref[0:4, 0:5, 0:5] = 1
    ref[6:8] = 2
    pred = ref.copy()
    pred[6] = 0  # class 2 loses one of its two planes; class 3 is absent from both
    out = per_class_metrics(pred, ref, num_classes=4, spacing=(2.0, 1.0, 1.0))
    assert out["dice"] == pytest.approx([1.0, 2 * 100 / 300, 1.0])
    assert out["hd95"][0] == pytest.approx(0.0)
    assert out["hd95"][1] == pytest.approx(2.0)  # plane 6 is one voxel (2 mm) from plane 7
    assert out["hd95"][2] == 0.0
