"""Tile placement and blending weights of the sliding window (cmc_serve.tiling)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmc_serve.tiling import (
    WEIGHT_FLOOR,
    TileGrid,
    axis_starts,
    extract_patch,
    gaussian_importance,
)


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 400), patch=st.integers(1, 96),
       overlap=st.sampled_from([0.0, 0.25, 0.5, 0.75]))
def test_axis_starts_cover_and_end_on_border(size: int, patch: int, overlap: float) -> None:
    starts = axis_starts(size, patch, overlap)
    if size <= patch:
        assert starts == [-((patch - size) // 2)]
        return
    assert starts[0] == 0
    assert starts[-1] + patch == size  # the last tile ends on the border
    assert starts == sorted(set(starts))
    steps = np.diff(starts)
    # evenly spread: steps differ by at most one voxel and never exceed the target step
    if len(steps):
        assert steps.max() - steps.min() <= 1
        assert steps.max() <= max(1, round(patch * (1 - overlap)))
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s:s + patch] = True
    assert covered.all()


def test_axis_starts_known_values() -> None:
    # nnU-Net's placement for 77 voxels, patch 32, 50% overlap: 4 tiles, step 15
    assert axis_starts(77, 32, 0.5) == [0, 15, 30, 45]
    assert axis_starts(64, 32, 0.5) == [0, 16, 32]
    assert axis_starts(32, 32, 0.5) == [0]
    assert axis_starts(5, 32, 0.5) == [-13]


@pytest.mark.parametrize("bad", [(0, 32, 0.5), (10, 0, 0.5), (10, 4, 1.0), (10, 4, -0.1)])
def test_axis_starts_rejects_bad_arguments(bad: tuple[int, int, float]) -> None:
    with pytest.raises(ValueError):
        axis_starts(*bad)


def test_grid_is_d_major_and_complete() -> None:
    grid = TileGrid.build((77, 93, 5), (32, 32, 32), 0.5)
    origins = list(grid.origins())
    assert len(origins) == len(grid) == 4 * 5 * 1
    assert origins == sorted(origins)  # D-major order
    assert {o[2] for o in origins} == {-13}


def test_extract_patch_pads_with_zeros_outside() -> None:
    vol = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    patch = extract_patch(vol, (-2, 3, 4), (8, 8, 8))
    assert patch.dtype == np.float32 and patch.shape == (8, 8, 8)
    np.testing.assert_array_equal(patch[2:7, 0:3, 0:3], vol[:, 3:6, 4:7])
    assert patch.sum() == vol[:, 3:6, 4:7].sum()


def test_gaussian_importance_shape_peak_floor_symmetry() -> None:
    w = gaussian_importance((32, 24, 16))
    assert w.shape == (32, 24, 16) and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0)
    assert w.min() > 0 and w.min() == pytest.approx(WEIGHT_FLOOR / np.exp(
        -(0.5**2) / (2 * 4.0**2) - 0.5**2 / (2 * 3.0**2) - 0.5**2 / (2 * 2.0**2)), rel=1e-5)
    np.testing.assert_array_equal(w, w[::-1, ::-1, ::-1])  # centred between middle voxels
    # sigma = P/8 = 4 along D; voxel 15 sits at -0.5 from the centre, voxel 19 at +3.5
    ratio = w[19, 11, 7] / w[15, 11, 7]
    assert ratio == pytest.approx(np.exp(-(3.5**2 - 0.5**2) / (2 * 4.0**2)), rel=1e-5)
