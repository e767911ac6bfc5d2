"""Closed planar contours of a 2D mask along its pixel edges, exact under even-odd filling.

RTSTRUCT stores structures as polygons per slice. Tracing the boundary between pixels
(rather than an iso-line through pixel centres, as marching squares or OpenCV do) gives
polygons whose vertices sit on pixel corners: a pixel centre is never on an edge, so filling
the polygons again by the even-odd rule at pixel centres gives back exactly the mask, with
no area lost on thin or small structures. Holes are separate polygons inside their outer
one, and several components are several polygons: the even-odd (XOR) rule that radiotherapy
systems and viewers (e.g. Orthanc Stone's XOR filler) apply to nested CLOSED_PLANAR contours.
Pixels touching only at a corner belong to separate polygons (4-connectivity), so no polygon
crosses itself.
"""

from __future__ import annotations

import numpy as np

# Directed pixel edges, clockwise around a pixel (x right, y down), keeping the pixel on the
# same side: (neighbour offset, start corner, end corner) in corner coordinates, where pixel
# (x, y) spans the corners (x, y) .. (x + 1, y + 1).
_SIDES = (((0, -1), (0, 0), (1, 0)),   # top
          ((1, 0), (1, 0), (1, 1)),    # right
          ((0, 1), (1, 1), (0, 1)),    # bottom
          ((-1, 0), (0, 1), (0, 0)))   # left


def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """The boundary polygons of `mask` (2D bool, indexed [x, y]) as float arrays (N, 2) of
    corner coordinates (x, y) in pixel-index units, pixel centres at integers: a vertex is
    at half-integers. Collinear vertices are dropped; each polygon is closed implicitly."""
    mask = np.asarray(mask, dtype=bool)
    xs_any, ys_any = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if xs_any.size == 0:
        return []
    # traced on the bounding box (a structure is small against a 512 x 512 slice)
    x0, y0 = int(xs_any[0]), int(ys_any[0])
    inside = np.pad(mask[x0:int(xs_any[-1]) + 1, y0:int(ys_any[-1]) + 1], 1)
    width = inside.shape[1] + 1  # corner keys: x * width + y, in padded corner coordinates
    starts, ends, owners = [], [], []
    for (dx, dy), (sx, sy), (ex, ey) in _SIDES:
        neighbour = np.roll(inside, (-dx, -dy), axis=(0, 1))
        xs, ys = np.nonzero(inside & ~neighbour)
        starts.append((xs + sx) * width + ys + sy)
        ends.append((xs + ex) * width + ys + ey)
        owners.append(xs * width + ys)
    start, end, owner = (np.concatenate(v).tolist() for v in (starts, ends, owners))
    outgoing: dict[int, list[int]] = {}
    for index, vertex in enumerate(start):
        outgoing.setdefault(vertex, []).append(index)
    used = [False] * len(start)
    polygons = []
    for first in range(len(start)):
        if used[first]:
            continue
        loop, edge = [], first
        while not used[edge]:
            used[edge] = True
            loop.append(start[edge])
            choices = [e for e in outgoing[end[edge]] if not used[e]]
            if not choices:
                break
            # a corner shared by two diagonal pixels: stay with the pixel we came along
            edge = next((e for e in choices if owner[e] == owner[edge]), choices[0])
        polygons.append(_corners(np.array(loop), width, (x0, y0)))
    return polygons


def _corners(keys: np.ndarray, width: int, origin: tuple[int, int]) -> np.ndarray:
    """Vertex keys of one loop -> (x, y) pixel-index coordinates of its corners only."""
    points = np.stack([keys // width, keys % width], axis=1).astype(np.float64) - 1.5
    points += origin
    incoming = points - np.roll(points, 1, axis=0)
    outgoing = np.roll(points, -1, axis=0) - points
    turn = incoming[:, 0] * outgoing[:, 1] != incoming[:, 1] * outgoing[:, 0]
    return points[turn]
