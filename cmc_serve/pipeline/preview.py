"""`--preview`: one PNG with three orthogonal slices through the segmentation's centroid.

Slices are cut in RAS world orientation (whatever the input's voxel order), shown in the
radiological convention (patient's right on the viewer's left, anterior/superior up) and
stretched to the voxel spacing, so a flipped or permuted result is visible at a glance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from nibabel import orientations as nio
from PIL import Image

PANEL = 256  # pixels, longest edge of each panel
_CHUNK = 1 << 22  # voxels compared with a percentile's threshold at once
_SAMPLE = 1 << 20  # voxels of the strided sample that places the thresholds
ALPHA = 0.45
# Label colours (label 1 first); repeated for models with more classes.
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
                    [210, 245, 60], [250, 190, 212]], dtype=np.float32)


def _to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The array with axes flipped/permuted to R, A, S and its voxel spacing in that order."""
    ornt = nio.io_orientation(affine)
    ras = nio.apply_orientation(array, ornt)
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return ras, spacing[ornt[:, 0].astype(int)]


def _centre(labels: np.ndarray) -> tuple[int, int, int]:
    """The foreground's centroid voxel (the volume centre when there is none), from the
    per-axis counts: no list of foreground coordinates (24 bytes per foreground voxel)."""
    mask = labels > 0
    total = int(np.count_nonzero(mask))
    if not total:
        centre = (np.asarray(labels.shape) - 1) / 2
    else:
        centre = np.array([int(np.arange(n) @ mask.sum(axis=tuple(a for a in range(3) if a != axis),
                                                       dtype=np.int64)) / total
                           for axis, n in enumerate(labels.shape)])
    x, y, z = (int(c) for c in centre.round())
    return x, y, z


def _blocks(flat: np.ndarray) -> list[np.ndarray]:
    return [flat[start:start + _CHUNK] for start in range(0, flat.size, _CHUNK)]


def _order_statistics(flat: np.ndarray, ranks: list[int], low: bool) -> dict[int, Any]:
    """The values at 0-based `ranks` of ascending order, copying only the values beyond a
    threshold placed on a strided sample (below it for `low` ranks, above it otherwise);
    values equal to it are counted, never copied (a CT's air fills whole percentiles)."""
    n = flat.size
    sample = np.sort(flat[::max(1, n // _SAMPLE)])
    depth = max((r + 1) if low else (n - r) for r in ranks)  # values needed from that end
    share = depth / n
    while True:
        at = min(sample.size - 1, int(share * 1.5 * sample.size) + 16)
        threshold = sample[at] if low else sample[sample.size - 1 - at]
        beyond = np.concatenate([b[b < threshold] if low else b[b > threshold]
                                 for b in _blocks(flat)])
        equal = sum(int(np.count_nonzero(b == threshold)) for b in _blocks(flat))
        if beyond.size + equal >= depth:
            break
        share *= 4  # the sample misplaced the threshold: reach further in
    out = {}
    for r in ranks:
        k = r if low else r - (n - beyond.size)  # the rank within `beyond`
        inside = k < beyond.size if low else k >= 0
        out[r] = np.partition(beyond, k)[k] if inside else threshold
    return out


def percentiles(image: np.ndarray, percents: list[float]) -> np.ndarray:
    """np.percentile(image, percents) (linear method, numpy's own arithmetic) without its
    sorted copy of the whole volume (4 bytes per voxel of a float32 image): the order
    statistics around each percentile come from the few voxels beyond a threshold."""
    flat = np.ascontiguousarray(image).reshape(-1)
    if flat.size == 0 or not all(np.isfinite(b).all() for b in _blocks(flat)):
        return np.asarray(np.percentile(image, percents))  # numpy's NaN and error rules
    n = flat.size
    virtual = (n - 1) * np.true_divide(percents, 100)
    previous = np.floor(virtual)
    following = previous + 1
    last = virtual >= n - 1
    previous[last] = following[last] = n - 1
    below, above = previous.astype(np.intp), following.astype(np.intp)
    ranks = sorted({int(r) for r in (*below, *above)})
    values: dict[int, Any] = {}
    for low, side in ((True, [r for r in ranks if r < n // 2]),
                      (False, [r for r in ranks if r >= n // 2])):
        if side:
            values.update(_order_statistics(flat, side, low))
    a = np.array([values[int(r)] for r in below], dtype=flat.dtype)
    b = np.array([values[int(r)] for r in above], dtype=flat.dtype)
    gamma = np.asanyarray(virtual - previous, dtype=virtual.dtype)
    diff = b - a  # numpy's _lerp: from the nearer end, so that gamma 1 gives b exactly
    lerp = np.add(a, diff * gamma)
    np.subtract(b, diff * (1 - gamma), out=lerp, where=gamma >= 0.5, casting="unsafe",
                dtype=type(lerp.dtype))
    return lerp


def _grey(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """A slice scaled to 0..255 between the volume's 1st and 99th percentiles."""
    scale = hi - lo if hi > lo else 1.0
    return np.clip((image - lo) / scale * 255.0, 0, 255).astype(np.float32)


def _panel(grey: np.ndarray, labels: np.ndarray, pixel_mm: tuple[float, float]) -> Image.Image:
    """Blend a label overlay on a 2D slice (rows, cols) and resize to physical aspect."""
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    mask = labels > 0
    colours = PALETTE[(labels[mask].astype(np.int64) - 1) % len(PALETTE)]
    rgb[mask] = (1 - ALPHA) * rgb[mask] + ALPHA * colours
    height_mm, width_mm = grey.shape[0] * pixel_mm[0], grey.shape[1] * pixel_mm[1]
    scale = PANEL / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    return Image.fromarray(rgb.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)


def render_preview(image: np.ndarray, labels: np.ndarray, affine: np.ndarray,
                   path: Path) -> None:
    """Axial, coronal and sagittal slices through the foreground centroid (the image
    centre when nothing was segmented), side by side, written as PNG to `path`."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = percentiles(image, [1, 99])
    img, spacing = _to_ras(image, affine)
    lab, _ = _to_ras(labels, affine)
    x, y, z = _centre(lab)
    sx, sy, sz = (float(s) for s in spacing)
    # (rows, cols) after .T; [::-1, ::-1] puts anterior/superior up and the patient's right
    # on the left (sagittal: anterior on the left). Only these three slices are scaled.
    views = [(_grey(img[:, :, z], lo, hi).T[::-1, ::-1], lab[:, :, z].T[::-1, ::-1], (sy, sx)),
             (_grey(img[:, y, :], lo, hi).T[::-1, ::-1], lab[:, y, :].T[::-1, ::-1], (sz, sx)),
             (_grey(img[x, :, :], lo, hi).T[::-1, ::-1], lab[x, :, :].T[::-1, ::-1], (sz, sy))]
    panels = [_panel(np.ascontiguousarray(g), np.ascontiguousarray(m), mm) for g, m, mm in views]
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1),
                              max(p.height for p in panels)))
    left = 0
    for p in panels:
        sheet.paste(p, (left, 0))
        left += p.width + 8
    sheet.save(path, format="PNG")
