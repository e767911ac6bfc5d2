"""Segmentation metrics on label volumes: Dice and HD95 in millimetres (numpy + scipy).

Conventions (stated because tools disagree on them):
- Dice of a class absent from both prediction and reference is 1.0 (nothing to find, nothing
  found); absent from exactly one of them, 0.0.
- HD95 is the symmetric 95th-percentile Hausdorff distance as MONAI computes it: the larger of
  the two directed 95th percentiles of surface-to-surface distances. Surfaces are the mask
  voxels with at least one face neighbour outside the mask; distances are Euclidean between
  voxel centres in mm, using the voxel spacing (anisotropic spacing is honoured).
  Both masks empty: 0.0. Exactly one empty: undefined, reported as NaN (callers average with
  NaN excluded and count the undefined cases).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice overlap of two boolean masks of one shape."""
    pred, ref = _check_masks(pred, ref)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a boolean mask (face connectivity); the volume border counts as outside."""
    padded = np.pad(mask, 1, constant_values=False)
    eroded = ndimage.binary_erosion(padded, structure=ndimage.generate_binary_structure(mask.ndim, 1))
    inner = eroded[tuple(slice(1, -1) for _ in range(mask.ndim))]
    return np.logical_and(mask, np.logical_not(inner))


def _directed_surface_distances(
    from_surface: np.ndarray, to_surface: np.ndarray, spacing: Sequence[float]
) -> np.ndarray:
    """Distance (mm) from every voxel of `from_surface` to the nearest voxel of `to_surface`."""
    distance_map = ndimage.distance_transform_edt(np.logical_not(to_surface), sampling=spacing)
    return np.asarray(distance_map)[from_surface]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm between two boolean masks."""
    pred, ref = _check_masks(pred, ref)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {pred.ndim}-D mask")
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return 0.0
    if has_pred != has_ref:
        return float("nan")
    surf_pred, surf_ref = surface(pred), surface(ref)
    forward = _directed_surface_distances(surf_pred, surf_ref, spacing)
    backward = _directed_surface_distances(surf_ref, surf_pred, spacing)
    return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))


def per_class_metrics(
    pred: np.ndarray, ref: np.ndarray, num_classes: int, spacing: Sequence[float]
) -> dict[str, list[float]]:
    """Dice and HD95 of every foreground class (1..K-1) of two integer label volumes."""
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference {ref.shape}")
    dices, hds = [], []
    for c in range(1, num_classes):
        p, r = pred == c, ref == c
        dices.append(dice(p, r))
        hds.append(hd95(p, r, spacing))
    return {"dice": dices, "hd95": hds}


def _check_masks(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference {ref.shape}")
    return np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
