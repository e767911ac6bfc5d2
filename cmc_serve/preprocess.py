"""Checkpoint pre-processing in numpy/scipy, matching the MONAI transforms used in training.

Training runs `Orientationd("RAS")`, `Spacingd(pixdim=spacing, mode="bilinear")` (border
padding, align_corners=False) and then `ScaleIntensityRanged(low, high, 0, 1, clip=True)`
(kind `ct_window`), `NormalizeIntensityd(nonzero=True)` (kind `zscore_nonzero`) or
cmc_train's `PercentileZScored` (kind `percentile_zscore`). Serving
must reproduce them exactly without torch, so this module ports MONAI's grid arithmetic
(`zoom_affine`, `compute_shape_offset`, the 1e-3 "unchanged" tolerances) and performs the
resampling itself; `tests/test_preprocess.py` compares both on random permuted/flipped grids.

Resampling is world-coordinate based: a destination voxel is mapped to the source voxel that
lies at the same RAS position. When that map only scales, flips and permutes axes (always the
case between a grid and its RAS re-orientation, whatever the obliquity) it is applied axis by
axis, which is exact for (tri)linear and nearest interpolation and needs no 3 x N coordinate
arrays; otherwise (e.g. an oblique MR resampled into an axial CT grid) scipy's
`map_coordinates` runs slab by slab so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from nibabel import orientations as nio
from scipy import ndimage

from cmc_common.errors import CmcError
from cmc_serve.volume import Grid, Volume, release_free_memory

# MONAI's tolerance for "same spacing" and "affine unchanged" (monai.data.utils.AFFINE_TOL).
AFFINE_TOL = 1e-3
# Off-axis entries of a voxel->voxel map below this are treated as zero (separable map).
_AXIS_TOL = 1e-6
# Voxels per slab in the general (non-separable) resampling path.
_SLAB_VOXELS = 1 << 22


class PreprocessError(CmcError, ValueError):
    """Pre-processing settings or inputs that cannot be honoured."""


@dataclass(frozen=True)
class PreparedVolume:
    """A network-ready image on the RAS grid at the checkpoint spacing.

    `source_grid` is the grid the image came from; `labels_to_source` uses it to return
    labels made on this grid to the input geometry.
    """

    array: np.ndarray
    affine: np.ndarray
    source_grid: Grid

    @property
    def grid(self) -> Grid:
        return Grid(tuple(self.array.shape), self.affine)


# --- settings -------------------------------------------------------------------------------

def _settings(prep: Mapping[str, Any], modality: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Validate cmc.json's "preprocessing" dict; return (spacing, normalisation of modality)."""
    if prep.get("orientation", "RAS") != "RAS":
        raise PreprocessError(f"unsupported orientation {prep.get('orientation')!r} (only RAS)")
    spacing = np.asarray(prep.get("spacing", ()), dtype=np.float64)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise PreprocessError(f"spacing must be 3 positive numbers, got {prep.get('spacing')!r}")
    norms = prep.get("normalisation", {})
    if modality not in norms:
        raise PreprocessError(f"no normalisation for modality {modality!r} "
                              f"(checkpoint has {sorted(norms)})")
    norm = dict(norms[modality])
    bounds = {"ct_window": ("low", "high"), "percentile_zscore": ("lower", "upper")}
    if norm.get("kind") in bounds:
        low, high = bounds[norm["kind"]]
        if not float(norm[high]) > float(norm[low]):
            raise PreprocessError(f"{norm['kind']} for {modality!r} needs {high} > {low}, "
                                  f"got {norm}")
    elif norm.get("kind") != "zscore_nonzero":
        raise PreprocessError(f"unknown normalisation {norm!r} for modality {modality!r}")
    return spacing, norm


# --- MONAI's grid arithmetic ----------------------------------------------------------------

def orient_ras(volume: Volume) -> Volume:
    """Flip/permute axes so they point to R, A, S (MONAI `Orientation("RAS")`, no resampling)."""
    array, affine = _ras_view(volume)
    return Volume(np.ascontiguousarray(array), affine)


def _ras_view(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """`orient_ras` as a view of the volume's array (flips and transposes only, no copy) and
    its affine: resampling reads the view, so the source is never copied just to turn it."""
    ornt = nio.ornt_transform(nio.io_orientation(volume.affine), nio.axcodes2ornt("RAS"))
    array = nio.apply_orientation(volume.array, ornt)
    return array, volume.affine @ nio.inv_ornt_aff(ornt, volume.array.shape)


def _zoom_affine(affine: np.ndarray, pixdim: np.ndarray) -> np.ndarray:
    """monai.data.utils.zoom_affine(diagonal=False): keep the rotation, set the voxel size."""
    rzs = affine[:3, :3]
    zs = np.linalg.cholesky(rzs.T @ rzs).T
    rotation = rzs @ np.linalg.inv(zs)
    new = np.eye(4)
    new[:3, :3] = rotation @ np.diag(np.sign(np.diag(zs)) * np.abs(pixdim))
    return new


def _shape_offset(shape: tuple[int, ...], in_affine: np.ndarray,
                  out_affine: np.ndarray) -> tuple[tuple[int, int, int], np.ndarray]:
    """monai.data.utils.compute_shape_offset(scale_extent=False): output shape and origin."""
    dims = np.asarray(shape, dtype=float)
    corners = np.asarray(np.meshgrid(*[(0.0, d - 1.0) for d in dims], indexing="ij")).reshape(3, -1)
    corners = np.concatenate((corners, np.ones_like(corners[:1])))
    corners_out = np.linalg.solve(out_affine, in_affine) @ corners
    world = in_affine @ corners
    all_dist = corners_out[:-1].copy()
    corners_out = corners_out[:-1] / corners_out[-1]
    out_shape = np.round(np.ptp(corners_out, axis=1) + 1.0)
    for i in range(world.shape[1]):
        if np.allclose(np.min(all_dist - all_dist[:, i: i + 1], 1), 0.0, rtol=AFFINE_TOL):
            offset = world[:-1, i]
            break
    else:  # no corner is smallest on every axis: centre the output on the input
        offset = (in_affine[:-1, :-1] @ (dims / 2.0) + in_affine[:-1, -1]
                  - out_affine[:-1, :-1] @ (out_shape / 2.0))
    return tuple(int(s) for s in out_shape), offset  # type: ignore[return-value]


def spacing_grid(grid: Grid, pixdim: np.ndarray) -> Grid:
    """The grid MONAI's `Spacing(pixdim)` resamples `grid` onto (same rotation, new voxel size).

    As in MONAI, an axis whose spacing is within 1e-3 mm of the target keeps its spacing, and
    a result within 1e-3 of the input grid is the input grid itself (no resampling).
    """
    orig = grid.spacing
    out_d = np.where(np.abs(orig - pixdim) <= AFFINE_TOL, orig, pixdim)
    new_affine = _zoom_affine(grid.affine, out_d)
    shape, offset = _shape_offset(grid.shape, grid.affine, new_affine)
    new_affine[:3, 3] = offset
    xform = np.linalg.solve(grid.affine, new_affine)
    if shape == grid.shape and (np.allclose(grid.affine, new_affine, atol=AFFINE_TOL)
                                or np.allclose(xform, np.eye(4), atol=AFFINE_TOL)):
        return grid
    return Grid(shape, new_affine)


# --- resampling -----------------------------------------------------------------------------

def _axis_permutation(xform: np.ndarray) -> list[int] | None:
    """For a dst-voxel -> src-voxel map, src axis i depends only on dst axis perm[i], or None."""
    lin = xform[:3, :3]
    perm = [int(np.argmax(np.abs(row))) for row in lin]
    if sorted(perm) != [0, 1, 2]:
        return None
    off_axis = lin.copy()
    off_axis[range(3), perm] = 0.0
    scale = np.abs(lin[range(3), perm])
    return perm if np.all(np.abs(off_axis) <= _AXIS_TOL * scale[:, None]) else None


def _axis_taps(coords: np.ndarray, n: int, order: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Source indices (and linear weights, None for nearest) of continuous indices `coords`
    along an axis of length `n`, clamped to the border."""
    c = np.clip(coords, 0.0, n - 1.0)
    if order == 0:
        return np.floor(c + 0.5).astype(np.intp), None
    if n == 1:
        return np.zeros(len(c), dtype=np.intp), None
    i0 = np.minimum(np.floor(c).astype(np.intp), n - 2)
    return i0, c - i0


def _sample_axis(array: np.ndarray, index: np.ndarray, weight: np.ndarray | None,
                 axis: int) -> np.ndarray:
    """1D interpolation along `axis` with `_axis_taps`' indices (relative to `array`)."""
    if weight is None:
        return np.take(array, index, axis=axis)
    w_shape = [1] * array.ndim
    w_shape[axis] = len(index)
    w = weight.astype(array.dtype).reshape(w_shape)
    lo = np.take(array, index, axis=axis)
    return lo + (np.take(array, index + 1, axis=axis) - lo) * w


def _outside(coords: np.ndarray, n: int) -> np.ndarray:
    """Continuous indices farther than half a voxel outside the array."""
    return (coords < -0.5) | (coords > n - 0.5)


def resample(array: np.ndarray, src_affine: np.ndarray, dst: Grid, order: int,
             fill: float | None = None) -> np.ndarray:
    """Resample `array` (voxel->world `src_affine`) onto `dst` by world position.

    order 1 is trilinear, order 0 nearest neighbour. Destination voxels beyond the source are
    clamped to the border value (MONAI's `padding_mode="border"`) when `fill` is None, else
    those more than half a voxel outside get `fill`. Float input is resampled in float32.
    """
    if order not in (0, 1):
        raise PreprocessError(f"interpolation order must be 0 or 1, got {order}")
    work = array if order == 0 else np.asarray(array, dtype=np.float32)
    xform = np.linalg.solve(np.asarray(src_affine, dtype=np.float64), dst.affine)
    perm = _axis_permutation(xform)
    if perm is None:
        return _resample_general(work, xform, dst.shape, order, fill)
    # src axis i follows dst axis perm[i]: bring src axes into dst order, then go axis by axis.
    src_axis_of = np.argsort(perm)
    view = np.transpose(work, src_axis_of)
    coords = []
    for d in range(3):
        i = int(src_axis_of[d])
        coords.append(xform[i, d] * np.arange(dst.shape[d]) + xform[i, 3])
    taps = [_axis_taps(coords[d], view.shape[d], order) for d in range(3)]
    # shrinking axes first keeps the intermediate arrays small
    axes = sorted(range(3), key=lambda d: dst.shape[d] / view.shape[d])
    masks = ([_outside(coords[d], view.shape[d]) for d in range(3)] if fill is not None
             else None)
    out = np.empty(dst.shape, dtype=work.dtype)
    for start, stop in _slabs(view.shape, dst.shape):
        index0, weight0 = taps[0]
        lo = int(index0[start:stop].min())
        hi = int(index0[start:stop].max()) + (1 if weight0 is None else 2)
        slab_taps = [(index0[start:stop] - lo,
                      None if weight0 is None else weight0[start:stop]), taps[1], taps[2]]
        block = view[lo:hi]
        for d in axes:
            block = _sample_axis(block, *slab_taps[d], axis=d)
        if masks is not None:
            outside = (masks[0][start:stop, None, None] | masks[1][None, :, None]
                       | masks[2][None, None, :])
            block = np.where(outside, np.asarray(fill, dtype=block.dtype), block)
        out[start:stop] = block
    return out


def _slabs(src_shape: tuple[int, ...], dst_shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Ranges of the first destination axis resampled at once: about `_SLAB_VOXELS` source
    or destination voxels each, so the temporaries of the axis-by-axis interpolation stay
    a few slab-sized arrays instead of several volume-sized ones."""
    per_row = max(int(np.prod(dst_shape[1:])),
                  int(np.prod(src_shape[1:])) * max(1, -(-src_shape[0] // dst_shape[0])))
    rows = max(1, _SLAB_VOXELS // per_row)
    return [(a, min(a + rows, dst_shape[0])) for a in range(0, dst_shape[0], rows)]


def _resample_general(array: np.ndarray, xform: np.ndarray, shape: tuple[int, int, int],
                      order: int, fill: float | None) -> np.ndarray:
    """map_coordinates slab by slab along the first destination axis (bounded memory)."""
    out = np.empty(shape, dtype=array.dtype)
    rows = max(1, _SLAB_VOXELS // (shape[1] * shape[2]))
    jk = np.stack(np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij"))
    jk = jk.reshape(2, -1).astype(np.float64)
    for start in range(0, shape[0], rows):
        i = np.arange(start, min(start + rows, shape[0]), dtype=np.float64)
        idx = np.concatenate([np.repeat(i, jk.shape[1])[None], np.tile(jk, len(i))])
        coords = xform[:3, :3] @ idx + xform[:3, 3:4]
        vals = ndimage.map_coordinates(array, coords, order=order, mode="nearest",
                                       prefilter=False)
        if fill is not None:
            outside = np.zeros(coords.shape[1], dtype=bool)
            for a in range(3):
                outside |= _outside(coords[a], array.shape[a])
            vals[outside] = fill
        out[start:start + len(i)] = vals.reshape(len(i), shape[1], shape[2])
    return out


# --- intensity ------------------------------------------------------------------------------

def normalise(array: np.ndarray, norm: Mapping[str, Any]) -> np.ndarray:
    """`ct_window`: clip to [low, high] scaled to [0, 1]; `zscore_nonzero`: z-score of the
    non-zero voxels, zeros stay 0 (MONAI `NormalizeIntensity(nonzero=True)`);
    `percentile_zscore`: the non-zero voxels clipped to their `lower`/`upper` percentiles
    first (cmc_train's `PercentileZScored`)."""
    x = np.asarray(array, dtype=np.float32)
    if norm["kind"] == "ct_window":
        low, high = float(norm["low"]), float(norm["high"])
        out = np.empty(x.shape, dtype=np.float32)  # one new array, the steps in place
        np.subtract(x, low, out=out)
        np.divide(out, high - low, out=out)
        return np.clip(out, 0.0, 1.0, out=out)
    out = x.copy()
    nonzero = x != 0
    if not nonzero.any():
        return out
    values = x[nonzero].astype(np.float64)
    if norm["kind"] == "percentile_zscore":
        low, high = np.percentile(values, [float(norm["lower"]), float(norm["upper"])])
        values = np.clip(values, low, high)
    std = float(values.std())
    out[nonzero] = ((values - values.mean()) / (std if std != 0.0 else 1.0)).astype(np.float32)
    return out


# --- public steps ---------------------------------------------------------------------------

def preprocess(volume: Volume, modality: str, prep: Mapping[str, Any]) -> PreparedVolume:
    """Orient to RAS, resample to the checkpoint spacing (trilinear), normalise."""
    spacing, norm = _settings(prep, modality)
    oriented, affine = _ras_view(volume)
    oriented_grid = Grid(oriented.shape, affine)
    target = spacing_grid(oriented_grid, spacing)
    data = oriented if target is oriented_grid else resample(oriented, affine, target, order=1)
    prepared = PreparedVolume(normalise(data, norm), target.affine, volume.grid)
    del data
    release_free_memory()  # the slabs' temporaries: not resident through inference
    return prepared


def resample_to_reference(volume: Volume, reference: Grid) -> Volume:
    """Modality b's raw intensities on another grid (e.g. modality a's), trilinear, by world
    position. Voxels beyond b's field of view get b's minimum (air/background), not a border
    copy; a volume that does not overlap the reference at all is an error (not co-registered).
    """
    lo_a, hi_a = _world_box(volume.grid)
    lo_b, hi_b = _world_box(reference)
    if np.any(np.minimum(hi_a, hi_b) < np.maximum(lo_a, lo_b)):
        raise PreprocessError("the two images do not overlap in world space "
                              "(different patients, or not in the same scanner frame)")
    out = resample(volume.array, volume.affine, reference, order=1,
                   fill=float(np.min(volume.array)))
    return Volume(out, reference.affine)


def _world_box(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world bounding box of a grid's voxel extents (centres +- half a voxel)."""
    edges = [(-0.5, n - 0.5) for n in grid.shape]
    corners = np.asarray(np.meshgrid(*edges, indexing="ij")).reshape(3, -1)
    world = grid.affine[:3, :3] @ corners + grid.affine[:3, 3:4]
    return world.min(axis=1), world.max(axis=1)


def labels_to_source(labels: np.ndarray, prepared: PreparedVolume,
                     source: Volume | Grid | None = None) -> np.ndarray:
    """uint8 labels on the prepared grid -> the source grid (nearest neighbour, by world
    position; default: the grid `prepared` came from). Labels are resampled, never per-class
    probabilities: one uint8 volume of the source size is the only large allocation."""
    if labels.shape != prepared.array.shape:
        raise PreprocessError(f"labels shape {labels.shape} differs from the prepared grid "
                              f"{prepared.array.shape}")
    grid = source.grid if isinstance(source, Volume) else source or prepared.source_grid
    if labels.dtype != np.uint8:
        if not np.issubdtype(labels.dtype, np.integer) or \
                (labels.size and (labels.min() < 0 or labels.max() > 255)):
            raise PreprocessError(f"labels must be integers in [0, 255], got {labels.dtype}")
        labels = labels.astype(np.uint8)
    on_source = resample(labels, prepared.affine, grid, order=0, fill=0)
    release_free_memory()
    return on_source
