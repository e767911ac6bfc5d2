"""The memory-bounding rewrites give the same numbers as the whole-volume operations.

`cmc segment` resamples in slabs, counts labels in chunks and assembles a DICOM series
slice by slice (BENCHMARKS.md, bench/memory_per_voxel.py measures the peak RSS); these
tests pin that the bounded forms change no value: one slab against many, chunked counts
against np.bincount, and a series whose files are read in shuffled order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_factory import SeriesSpec, write_enhanced_ct, write_series

from cmc_serve import preprocess, volume
from cmc_serve.dicom import series
from cmc_serve.dicom.scan import scan_folder
from cmc_serve.dicom.series import load_series
from cmc_serve.volume import Grid, count_labels, release_free_memory


def _random_axis_affine(rng: np.random.Generator) -> np.ndarray:
    """A voxel -> world affine that permutes and flips axes, with random spacing."""
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for i, (axis, sign) in enumerate(zip(rng.permutation(3), rng.choice([-1, 1], 3),
                                         strict=True)):
        affine[axis, i] = sign * rng.uniform(0.4, 3.0)
    affine[:3, 3] = rng.uniform(-20.0, 20.0, 3)
    return affine


@pytest.mark.parametrize("seed", range(6))
def test_slab_resampling_equals_one_slab(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(3, 25, 3))
    image = (rng.normal(size=shape) * 100).astype(np.float32)
    labels = rng.integers(0, 4, shape).astype(np.uint8)
    src, dst = _random_axis_affine(rng), _random_axis_affine(rng)
    depth, height, width = (int(n) for n in rng.integers(3, 25, 3))
    grid = Grid((depth, height, width), dst)
    cases: list[tuple[np.ndarray, int, float | None]] = [
        (np.flip(image, 0), 1, None), (image, 1, -7.0), (labels, 0, 0.0)]
    whole = [preprocess.resample(a, src, grid, order, fill) for a, order, fill in cases]
    monkeypatch.setattr(preprocess, "_SLAB_VOXELS", 50)  # one destination row per slab
    for (a, order, fill), expected in zip(cases, whole, strict=True):
        sliced = preprocess.resample(a, src, grid, order, fill)
        assert sliced.dtype == expected.dtype and sliced.flags.c_contiguous
        np.testing.assert_array_equal(sliced, expected)


def test_count_labels_equals_bincount(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(volume, "_COUNT_CHUNK", 7)
    labels = np.random.default_rng(0).integers(0, 6, (9, 8, 5)).astype(np.uint8)
    np.testing.assert_array_equal(count_labels(labels, 6), np.bincount(labels.ravel()))
    np.testing.assert_array_equal(count_labels(labels, 3), np.bincount(labels.ravel())[:3])
    np.testing.assert_array_equal(count_labels(labels[:, ::-1], 8),
                                  np.bincount(labels.ravel(), minlength=8))


@pytest.mark.parametrize("block", [None, (4, 3), (1, 1)])
@pytest.mark.parametrize("enhanced", [False, True])
def test_series_assembled_in_slice_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         block: tuple[int, int] | None, enhanced: bool) -> None:
    """Files written in shuffled order, instance numbers reversed (or their frames in one
    Enhanced CT instance): the volume is the stored values, rescaled, at [column, row,
    slice] along the slice normal, also in blocks of slices and rows that do not divide it."""
    if block is not None:
        monkeypatch.setattr(series, "_BLOCK_SLICES", block[0])
        monkeypatch.setattr(series, "_TILE_ROWS", block[1])
    spec = SeriesSpec(rows=7, cols=9, n_slices=11, slope=2.0, intercept=-1000.0)
    paths = write_series(tmp_path / "s", spec)
    if enhanced:
        write_enhanced_ct(tmp_path / "e", paths)
    loaded = load_series(scan_folder(tmp_path / ("e" if enhanced else "s")).volumes[0])
    expected = spec.stored_values().astype(np.float32) * 2.0 - 1000.0  # [slice, row, column]
    assert loaded.volume.array.dtype == np.float32 and loaded.volume.array.flags.c_contiguous
    np.testing.assert_array_equal(loaded.volume.array, expected.transpose(2, 1, 0))
    assert all("PixelData" not in ds for ds in loaded.datasets)


def test_release_free_memory_runs_anywhere() -> None:
    release_free_memory()  # glibc: malloc_trim(0); elsewhere nothing, never an error


@pytest.mark.parametrize("seed", range(4))
def test_preview_percentiles_equal_numpy(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly np.percentile's numbers, also where air ties fill whole percentiles."""
    from cmc_serve.pipeline import preview

    monkeypatch.setattr(preview, "_CHUNK", 97)
    monkeypatch.setattr(preview, "_SAMPLE", 50)
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 12)), 13, 11)
    body = rng.normal(40.0, 30.0, shape)
    image = np.where(rng.random(shape) < 0.4, -1000.0, body).astype(np.float32)
    for percents in ([1.0, 99.0], [0.0, 100.0], [50.0, 50.5]):
        got = preview.percentiles(image, percents)
        want = np.percentile(image, percents)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
