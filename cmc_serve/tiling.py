"""Sliding-window tile placement, patch extraction and the gaussian blending weights.

Tile origins follow nnU-Net: along each axis the tiles are spread evenly so that the first
starts at 0 and the last ends exactly on the border, with a step of at most P*(1-overlap).
An axis shorter than the patch is padded virtually (zeros, split before/after like MONAI),
so no padded copy of the volume is ever made: tile origins may then be negative and
`extract_patch` fills what lies outside the volume with zeros.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from cmc_common.contract import check_overlap

# Blending weights below this fraction of the peak are raised to it (MONAI uses the same
# 1e-3 floor), so that voxels only seen by tile corners keep a usable weight even with
# float16 accumulators.
WEIGHT_FLOOR = 1e-3


def axis_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Tile starts along one axis of `size` voxels for a patch edge `patch`.

    For size < patch a single tile starts at -(patch - size) // 2 (virtual padding).
    """
    if size < 1 or patch < 1:
        raise ValueError(f"axis size {size} and patch {patch} must be positive")
    check_overlap(overlap)
    if size <= patch:
        return [-((patch - size) // 2)]
    target_step = max(1, round(patch * (1.0 - overlap)))
    n = math.ceil((size - patch) / target_step) + 1
    step = (size - patch) / (n - 1)
    return [int(round(step * i)) for i in range(n)]


@dataclass(frozen=True)
class TileGrid:
    """All tile origins over a [D, H, W] volume, D-major (the order the stitcher wants)."""

    shape: tuple[int, int, int]
    patch: tuple[int, int, int]
    starts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

    @classmethod
    def build(cls, shape: tuple[int, ...], patch: tuple[int, ...], overlap: float) -> TileGrid:
        if len(shape) != 3 or len(patch) != 3:
            raise ValueError(f"need 3-D shape and patch, got {shape} and {patch}")
        s = tuple(int(v) for v in shape)
        p = tuple(int(v) for v in patch)
        starts = tuple(tuple(axis_starts(s[i], p[i], overlap)) for i in range(3))
        return cls(shape=(s[0], s[1], s[2]), patch=(p[0], p[1], p[2]),
                   starts=(starts[0], starts[1], starts[2]))

    def __len__(self) -> int:
        return len(self.starts[0]) * len(self.starts[1]) * len(self.starts[2])

    def origins(self) -> Iterator[tuple[int, int, int]]:
        """Tile origins in D-major order (slowest axis first)."""
        return ((d, h, w) for d, h, w in itertools.product(*self.starts))


def clip_box(origin: int, patch: int, size: int) -> tuple[int, int, int]:
    """(volume start, volume stop, offset inside the tile) of a tile's visible part."""
    lo = max(origin, 0)
    hi = min(origin + patch, size)
    return lo, hi, lo - origin


def extract_patch(volume: np.ndarray, origin: tuple[int, int, int],
                  patch: tuple[int, int, int]) -> np.ndarray:
    """The float32 patch at `origin`, zero outside the volume (works on np.memmap)."""
    out = np.zeros(patch, dtype=np.float32)
    src = []
    dst = []
    for o, p, n in zip(origin, patch, volume.shape, strict=True):
        lo, hi, off = clip_box(o, p, n)
        src.append(slice(lo, hi))
        dst.append(slice(off, off + hi - lo))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def gaussian_importance(patch: tuple[int, int, int], sigma_scale: float = 0.125) -> np.ndarray:
    """Separable gaussian blending weights [P0, P1, P2] (float32), peak 1, floor WEIGHT_FLOOR.

    sigma = sigma_scale * P per axis, centred between the middle voxels as in MONAI
    (`compute_importance_map(mode="gaussian")`), so predictions near a tile's border, which
    see the least context, count least where tiles overlap.
    """
    weights = np.ones((), dtype=np.float64)
    for p in patch:
        x = np.arange(p, dtype=np.float64) - (p - 1) / 2.0
        g = np.exp(-(x**2) / (2.0 * (sigma_scale * p) ** 2))
        weights = np.multiply.outer(weights, g)
    weights = np.maximum(weights, WEIGHT_FLOOR)
    return (weights / weights.max()).astype(np.float32)
