"""Slice geometry of a series: order along the normal, uniform spacing, no tilt, the affine.

Every check compares numbers a header wrote as decimal strings, so each tolerance is derived
from the precision the header actually wrote, never from a fixed guess:

- A value written with d decimals is off by at most e = 0.5 * 10**-d. Writers drop trailing
  zeros, so d is the most decimals any value of the series shows; it sets e_pos
  (ImagePositionPatient; at least 2 decimals assumed, as whole numbers alone show no
  rounding) and e_ori (ImageOrientationPatient; whole numbers alone, the 0 and 1 of an
  axis-aligned plane, are exact: e_ori = 0).
- Orientation: each cosine vector is off by at most sqrt(3) * e_ori in length; the cosines
  must be unit and orthogonal within max(1e-3, 2 * sqrt(3) * e_ori), and are normalised
  before use. The slice normal (their cross product) is then off by at most
  e_normal = 2 * sqrt(3) * e_ori.
- Tilt: a slice origin's drift off the line through the first origin along the normal may
  reach 2 * sqrt(3) * e_pos (both origins rounded) plus e_normal times its distance from the
  first slice (the normal's own error, growing along the stack). The allowed drift is that,
  and at least 0.01 mm.
- Spacing: each step between neighbouring slices may be off by 2 * sqrt(3) * e_pos plus
  e_normal times the step; the allowed deviation from the median step is that, and at least
  1 % of the step (scanners' own jitter) and 1e-3 mm.

So a valid oblique series written with two decimals (e_pos = 0.005 mm) is read, while a real
gantry tilt (5 degrees drifts by 2.6 mm over 30 mm of stack) or a real gap (a whole step) is
still refused: the rounding allowance stays far below both for any header precision a
scanner writes (two decimals or more).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmc_serve.dicom.errors import DicomSeriesError
from cmc_serve.dicom.multiframe import FrameSlice

# Floors of the tolerances (for headers written with many decimals).
SPACING_RTOL = 0.01
SPACING_ATOL_MM = 1e-3
ORIENTATION_TOL = 1e-3
TILT_TOL_MM = 1e-2
# The fewest decimals a written value is assumed to carry (a header of whole numbers).
MIN_DECIMALS = 2
SQRT3 = math.sqrt(3.0)


def written_decimals(value: object) -> int:
    """Decimals a DS value was written with ("12.50" -> 2, "1.5e-05" -> 6, "40" -> 0)."""
    text = str(getattr(value, "original_string", None) or value).strip().lower()
    mantissa, _, exponent = text.partition("e")
    decimals = len(mantissa.partition(".")[2])
    try:
        return max(0, decimals - int(exponent)) if exponent else decimals
    except ValueError:
        return decimals


def rounding_error(values: Sequence[Sequence[object] | None], whole_is_exact: bool = False
                   ) -> float:
    """Half a unit of the last decimal the writer kept: the most decimals any value shows
    (writers drop trailing zeros, so "40" beside "42.55" was written to 2 decimals too), and
    at least MIN_DECIMALS, as whole numbers alone show no rounding; `whole_is_exact`: whole
    numbers alone are exact (cosines 0 and 1 of an axis-aligned orientation)."""
    decimals = max((written_decimals(v) for vs in values if vs is not None for v in vs),
                   default=MIN_DECIMALS)
    if decimals == 0 and whole_is_exact:
        return 0.0
    return 0.5 * 10.0 ** -max(decimals, MIN_DECIMALS)


@dataclass(frozen=True)
class Tolerances:
    """The allowances of one series, derived from its written precision (module docstring)."""

    orientation: float
    normal: float  # bound on the slice normal's error
    position: float  # bound on the difference of two rounded origins (mm)

    @classmethod
    def of(cls, slices: Sequence[FrameSlice]) -> Tolerances:
        e_ori = rounding_error([s.orientation for s in slices], whole_is_exact=True)
        e_pos = rounding_error([s.position for s in slices])
        return cls(orientation=max(ORIENTATION_TOL, 2 * SQRT3 * e_ori),
                   normal=2 * SQRT3 * e_ori, position=2 * SQRT3 * e_pos)

    def drift(self, distance: np.ndarray) -> np.ndarray:
        """Allowed drift off the normal at `distance` (mm) from the first slice."""
        return np.maximum(TILT_TOL_MM, self.position + self.normal * np.abs(distance))

    def spacing(self, step: float) -> float:
        """Allowed deviation of one step from the median step."""
        return max(SPACING_ATOL_MM, SPACING_RTOL * step, self.position + self.normal * step)


def floats(value: object, keyword: str, n: int, where: str) -> np.ndarray:
    """`n` finite numbers from a header value, or a one-line error naming `where`."""
    if value is None:
        raise DicomSeriesError(f"{where}: missing {keyword}")
    try:
        values = np.array([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise DicomSeriesError(f"{where}: invalid {keyword} {value!r}") from exc
    if values.shape != (n,) or not np.all(np.isfinite(values)):
        raise DicomSeriesError(f"{where}: {keyword} needs {n} finite numbers, got {value!r}")
    return values


def _unit_axes(iop: np.ndarray, tol: float, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Row and column cosines normalised, after checking they are unit and orthogonal."""
    row, col = iop[:3], iop[3:]
    if (abs(np.linalg.norm(row) - 1) > tol or abs(np.linalg.norm(col) - 1) > tol
            or abs(row @ col) > tol):
        raise DicomSeriesError(f"{where}: ImageOrientationPatient {iop.tolist()} is not two "
                               "orthogonal unit vectors")
    return row / np.linalg.norm(row), col / np.linalg.norm(col)


def _echo_detail(a: FrameSlice, b: FrameSlice) -> str:
    if a.echo_time and b.echo_time and a.echo_time != b.echo_time:
        return (f" (EchoTime {a.echo_time} and {b.echo_time} ms: two echoes in one series; "
                "export each echo as a series of its own)")
    return ""


def _slice_spacing(depths: np.ndarray, slices: Sequence[FrameSlice], tol: Tolerances,
                   folder: Path) -> float:
    """Uniform slice spacing of sorted depths, or the error that describes the stack."""
    steps = np.diff(depths)
    duplicates = np.flatnonzero(steps < SPACING_ATOL_MM)
    if duplicates.size:
        i = int(duplicates[0])
        raise DicomSeriesError(f"{folder}: duplicate slice position {depths[i]:.3f} mm in "
                               f"{slices[i].name} and {slices[i + 1].name}"
                               f"{_echo_detail(slices[i], slices[i + 1])}")
    step = float(np.median(steps))
    allowed = tol.spacing(step)
    off = np.flatnonzero(np.abs(steps - step) > allowed)
    if off.size:
        i = int(off[0])
        a, b = slices[i].name, slices[i + 1].name
        ratio = steps[i] / step
        if ratio > 1.5 and abs(ratio - round(ratio)) * step <= allowed:
            raise DicomSeriesError(
                f"{folder}: {round(ratio) - 1} missing slice(s) between {a} and {b} "
                f"(gap {steps[i]:.3f} mm, spacing {step:.3f} mm)")
        raise DicomSeriesError(f"{folder}: uneven slice spacing: {steps[i]:.3f} mm between "
                               f"{a} and {b}, median {step:.3f} mm")
    return step


def stack_geometry(slices: Sequence[FrameSlice], folder: Path
                   ) -> tuple[list[int], np.ndarray]:
    """Slice order along the normal and the LPS voxel->world affine of the sorted stack."""
    iops = [floats(s.orientation, "ImageOrientationPatient", 6, str(s.path)) for s in slices]
    positions = np.stack([floats(s.position, "ImagePositionPatient", 3, str(s.path))
                          for s in slices])
    tol = Tolerances.of(slices)  # the values parsed: each is a sequence of numbers
    row, col = _unit_axes(iops[0], tol.orientation, str(slices[0].path))
    normal = np.cross(row, col)
    for iop, s in zip(iops, slices, strict=True):
        if not np.allclose(iop, iops[0], atol=tol.orientation):
            raise DicomSeriesError(f"{s.path}: orientation {iop.tolist()} differs from "
                                   f"{slices[0].name} {iops[0].tolist()}")
    sizes = {(s.rows, s.columns) for s in slices}
    if len(sizes) > 1:
        raise DicomSeriesError(f"{folder}: mixed image sizes {sorted(sizes)} (rows, columns)")
    spacings = [floats(s.pixel_spacing, "PixelSpacing", 2, str(s.path)) for s in slices]
    if any(not np.allclose(s, spacings[0], atol=1e-4) for s in spacings) or \
            np.any(spacings[0] <= 0):
        raise DicomSeriesError(f"{folder}: PixelSpacing differs between slices or is not positive")
    depths = positions @ normal
    order = [int(i) for i in np.argsort(depths, kind="stable")]
    positions, depths = positions[order], depths[order]
    step = _slice_spacing(depths, [slices[i] for i in order], tol, folder)
    distance = depths - depths[0]
    drift = np.linalg.norm(positions - positions[0] - np.outer(distance, normal), axis=1)
    if np.any(drift > tol.drift(distance)):
        tilt = np.degrees(np.arctan2(drift[-1], distance[-1]))
        raise DicomSeriesError(f"{folder}: slice origins drift off the slice normal "
                               f"(gantry tilt or sheared stack, {tilt:.2f} degrees)")
    affine = np.eye(4)
    affine[:3, 0] = row * spacings[0][1]  # along a row: column index i
    affine[:3, 1] = col * spacings[0][0]  # down a column: row index j
    affine[:3, 2] = normal * step
    affine[:3, 3] = positions[0]
    return order, affine
