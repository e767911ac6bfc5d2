"""Slab-wise stitching equals a naive full-volume accumulation and keeps memory bounded."""

from __future__ import annotations

import numpy as np
import pytest

from cmc_serve.stitching import SlabStitcher
from cmc_serve.tiling import TileGrid, clip_box, gaussian_importance


def naive_stitch(grid: TileGrid, tiles: list[np.ndarray], weights: np.ndarray,
                 k: int) -> np.ndarray:
    """Reference: one full-volume accumulator, same tile order, same arithmetic."""
    acc = np.zeros((k, *grid.shape), np.float32)
    wsum = np.zeros(grid.shape, np.float32)
    for origin, tile in zip(grid.origins(), tiles, strict=True):
        boxes = [clip_box(o, p, n) for o, p, n in zip(origin, grid.patch, grid.shape,
                                                      strict=True)]
        vol = tuple(slice(lo, hi) for lo, hi, _ in boxes)
        loc = tuple(slice(off, off + hi - lo) for lo, hi, off in boxes)
        acc[(slice(None), *vol)] += tile[(slice(None), *loc)] * weights[loc]
        wsum[vol] += weights[loc]
    return acc / wsum


def random_tiles(grid: TileGrid, k: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(len(grid)):
        logits = rng.normal(size=(k, *grid.patch)).astype(np.float32)
        e = np.exp(logits)
        tiles.append(e / e.sum(0, keepdims=True))
    return tiles


CASES = [
    ((77, 93, 61), (32, 32, 32), 2),
    ((77, 93, 61), (32, 32, 32), 14),
    ((1, 40, 37), (16, 16, 16), 3),  # one voxel thick
    ((9, 7, 5), (16, 16, 16), 4),  # smaller than the patch on every axis
    ((50, 12, 70), (24, 16, 8), 5),  # anisotropic patch, one axis shorter than it
]


@pytest.mark.parametrize(("shape", "patch", "k"), CASES)
def test_stitching_equals_naive_accumulation(shape: tuple[int, int, int],
                                             patch: tuple[int, int, int], k: int) -> None:
    grid = TileGrid.build(shape, patch, 0.5)
    weights = gaussian_importance(patch)
    tiles = random_tiles(grid, k, seed=sum(shape) + k)
    stitcher = SlabStitcher(grid, k, weights, keep_probs=True)
    for origin, tile in zip(grid.origins(), tiles, strict=True):
        stitcher.add(origin, tile)
    labels, probs = stitcher.result()
    ref = naive_stitch(grid, tiles, weights, k)
    assert labels.dtype == np.uint8 and labels.shape == shape
    assert probs is not None and probs.shape == (k, *shape)
    np.testing.assert_array_equal(probs, ref)
    np.testing.assert_array_equal(labels, ref.argmax(0))
    assert stitcher.live_bytes == 0  # everything finalised and freed


@pytest.mark.parametrize(("shape", "patch", "k"), CASES)
def test_labels_only_stitching_keeps_no_weight_sum(shape: tuple[int, int, int],
                                                   patch: tuple[int, int, int], k: int) -> None:
    grid = TileGrid.build(shape, patch, 0.5)
    weights = gaussian_importance(patch)
    tiles = random_tiles(grid, k, seed=sum(shape) + k)
    stitchers = [SlabStitcher(grid, k, weights, keep_probs=keep) for keep in (False, True)]
    for stitcher in stitchers:
        for origin, tile in zip(grid.origins(), tiles, strict=True):
            stitcher.add(origin, tile)
    labels, probs = stitchers[0].result()
    assert probs is None
    np.testing.assert_array_equal(labels, naive_stitch(grid, tiles, weights, k).argmax(0))
    # the weight sum is 1 of the K + 1 float32 values per live voxel
    assert stitchers[0].peak_bytes * (k + 1) == stitchers[1].peak_bytes * k


def test_float16_accumulators_agree_closely() -> None:
    grid = TileGrid.build((40, 30, 20), (16, 16, 16), 0.5)
    weights = gaussian_importance(grid.patch)
    tiles = random_tiles(grid, 3, seed=1)
    half = SlabStitcher(grid, 3, weights, accumulator_dtype=np.float16, keep_probs=True)
    for origin, tile in zip(grid.origins(), tiles, strict=True):
        half.add(origin, tile)
    _, probs = half.result()
    np.testing.assert_allclose(probs, naive_stitch(grid, tiles, weights, 3), atol=2e-3)


def peak_bytes(depth: int) -> int:
    grid = TileGrid.build((depth, 40, 40), (16, 16, 16), 0.5)
    weights = gaussian_importance(grid.patch)
    stitcher = SlabStitcher(grid, 4, weights)
    tile = np.full((4, 16, 16, 16), 0.25, np.float32)
    for origin in grid.origins():
        stitcher.add(origin, tile)
    stitcher.result()
    return stitcher.peak_bytes


def test_accumulator_memory_does_not_grow_with_depth() -> None:
    shallow, deep = peak_bytes(64), peak_bytes(512)
    assert deep == shallow
    # about one patch depth of K-class float32 accumulators (labels only: no weight sum)
    assert deep <= 16 * 40 * 40 * 4 * 4 * 1.5


def test_accumulators_hold_about_half_a_patch_depth_of_the_plane() -> None:
    """Blocks are freed strip by strip: the slab a tile row finishes goes as the row moves
    down H while the next one fills behind it, so one step (half a patch) of the plane plus
    two strips of it are alive, not the two whole slabs (one patch depth) that freeing whole
    slabs kept."""
    shape, patch, k = (64, 128, 40), (16, 16, 16), 4
    grid = TileGrid.build(shape, patch, 0.5)
    stitcher = SlabStitcher(grid, k, gaussian_importance(patch))
    tile = np.full((k, *patch), 0.25, np.float32)
    for origin in grid.origins():
        stitcher.add(origin, tile)
    stitcher.result()
    plane_slice = k * shape[1] * shape[2] * 4  # float32, labels only: no weight sum
    step = patch[0] // 2
    assert stitcher.peak_bytes == plane_slice * (step + step * 2 * step // shape[1])
    assert stitcher.peak_bytes < plane_slice * patch[0] * 0.6


def test_tiles_in_any_order_give_the_same_labels() -> None:
    """Triton's volume model may blend tiles as they come back: blocks are allocated and
    finalised by count, so the order changes memory, never the labels (float32 sums of two
    or more terms may round differently, so the tiles are dyadic: every order is exact)."""
    grid = TileGrid.build((40, 50, 30), (16, 16, 16), 0.5)
    weights = np.full(grid.patch, 0.5, np.float32)
    rng = np.random.default_rng(3)
    tiles = [rng.integers(0, 8, size=(3, *grid.patch)).astype(np.float32) / 8
             for _ in range(len(grid))]
    expected = naive_stitch(grid, tiles, weights, 3)
    stitcher = SlabStitcher(grid, 3, weights, keep_probs=True)
    for index in rng.permutation(len(grid)):
        stitcher.add(list(grid.origins())[index], tiles[index])
    labels, probs = stitcher.result()
    np.testing.assert_array_equal(probs, expected)
    np.testing.assert_array_equal(labels, expected.argmax(0))
    assert stitcher.live_bytes == 0


def test_incomplete_or_repeated_tiles_are_errors() -> None:
    grid = TileGrid.build((20, 20, 20), (16, 16, 16), 0.5)
    stitcher = SlabStitcher(grid, 2, gaussian_importance(grid.patch))
    tile = np.full((2, 16, 16, 16), 0.5, np.float32)
    origins = list(grid.origins())
    for origin in origins[:-1]:
        stitcher.add(origin, tile)
    with pytest.raises(ValueError, match="1 of 8 tiles missing"):
        stitcher.result()
    stitcher.add(origins[-1], tile)
    with pytest.raises(ValueError, match="added twice"):
        stitcher.add(origins[-1], tile)
    with pytest.raises(ValueError, match="tile shape"):
        SlabStitcher(grid, 2, gaussian_importance(grid.patch)).add(origins[0], tile[:1])
