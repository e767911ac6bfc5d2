"""Assemble a DICOM series into a `Volume` (RAS affine), refusing any geometry we cannot trust.

Slices are ordered along the slice normal computed from ImageOrientationPatient and
ImagePositionPatient, never by InstanceNumber. Everything that would make the volume silently
wrong (a missing slice, duplicate positions, uneven spacing, gantry tilt, non-orthogonal
orientation, mixed sizes, undecodable or truncated pixel data) raises a one-line
`DicomSeriesError` naming the folder or file. `choose_series` picks one series among several
candidates by explicit rules and says why.

A file of the series that cannot be read (attributed by the scan, or failing here) fails the
series by name, whichever slice it is: dropping the first or last slice would silently give a
shorter volume. `skip_unreadable=True` (`--skip-unreadable`) segments the readable files
instead and lists the skipped ones in `LoadedSeries.skipped`; a skipped file inside the stack
still fails, as a gap naming it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from cmc_serve.dicom.decoders import syntax_label, undecodable_reason
from cmc_serve.dicom.errors import DicomSeriesError, one_line
from cmc_serve.dicom.scan import DERIVED, VOLUME, SeriesInfo
from cmc_serve.volume import LPS_TO_RAS, Volume

# Relative tolerance on slice spacing (1% of the median, at least 1e-3 mm): scanners write
# positions rounded to ~1e-4 mm, real gaps and uneven stacks are far larger.
SPACING_RTOL = 0.01
SPACING_ATOL_MM = 1e-3
# Orientation cosines must be unit and orthogonal within this.
ORIENTATION_TOL = 1e-3
# Largest in-plane drift of slice origins (mm) still read as "no gantry tilt".
TILT_TOL_MM = 1e-2


@dataclass(frozen=True)
class LoadedSeries:
    """The volume and the sorted source headers (pixel data dropped) for SEG referencing."""

    volume: Volume
    datasets: tuple[Dataset, ...]
    info: SeriesInfo
    skipped: tuple[tuple[Path, str], ...] = ()  # unreadable files left out (skip_unreadable)


def _floats(ds: Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    if value is None:
        raise DicomSeriesError(f"{path}: missing {keyword}")
    try:
        values = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DicomSeriesError(f"{path}: invalid {keyword} {value!r}") from exc
    if values.shape != (n,) or not np.all(np.isfinite(values)):
        raise DicomSeriesError(f"{path}: {keyword} needs {n} finite numbers, got {value!r}")
    return values


def _int(ds: Dataset, keyword: str, path: Path, default: int | None = None) -> int:
    """A positive integer header value (Rows, Columns, ...), or a clear error."""
    try:
        value = ds.get(keyword)
        number = default if value in (None, "") and default is not None else int(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DicomSeriesError(f"{path}: missing or invalid {keyword} {ds.get(keyword)!r}"
                               ) from exc
    if number is None or number < 1:
        raise DicomSeriesError(f"{path}: invalid {keyword} {number!r}")
    return number


def _read(path: Path) -> Dataset:
    """Read a whole file and decode every top-level element now: pydicom converts values
    lazily, and a corrupt element would otherwise raise anywhere later (any exception type)."""
    try:
        ds = pydicom.dcmread(path, force=False)
        for _ in ds:
            pass
    except Exception as exc:  # truncated/corrupt files raise many pydicom/OS error types
        raise DicomSeriesError(f"{path}: unreadable or truncated DICOM ({type(exc).__name__}: "
                               f"{one_line(exc)})") from exc
    return ds


def _pixels(ds: Dataset, path: Path) -> np.ndarray:
    """Stored values -> modality values (RescaleSlope/Intercept or Modality LUT), float32."""
    if "PixelData" not in ds:
        raise DicomSeriesError(f"{path}: no pixel data")
    if _int(ds, "SamplesPerPixel", path, default=1) != 1:
        raise DicomSeriesError(f"{path}: colour images are not supported")
    if _int(ds, "NumberOfFrames", path, default=1) != 1:
        raise DicomSeriesError(f"{path}: multi-frame images are not supported")
    shape = (_int(ds, "Rows", path), _int(ds, "Columns", path))
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "")).strip()
    refusal = undecodable_reason(syntax) if syntax else None
    if refusal:
        raise DicomSeriesError(f"{path}: {refusal}")
    try:
        stored = ds.pixel_array
        values = apply_modality_lut(stored, ds)
    except Exception as exc:  # truncated data, inconsistent header, a plugin's own failure
        raise DicomSeriesError(f"{path}: cannot decode pixel data "
                               f"({syntax_label(syntax) if syntax else 'no transfer syntax'}): "
                               f"{one_line(exc)}") from exc
    values = np.asarray(values, dtype=np.float32)
    if values.shape != shape:
        raise DicomSeriesError(f"{path}: pixel data shape {values.shape} != Rows x Columns "
                               f"{shape}")
    return values


def _check_orientation(iop: np.ndarray, path: Path) -> np.ndarray:
    row, col = iop[:3], iop[3:]
    if (abs(np.linalg.norm(row) - 1) > ORIENTATION_TOL or abs(np.linalg.norm(col) - 1) >
            ORIENTATION_TOL or abs(row @ col) > ORIENTATION_TOL):
        raise DicomSeriesError(f"{path}: ImageOrientationPatient {iop.tolist()} is not two "
                               "orthogonal unit vectors")
    return np.cross(row, col)


def _slice_spacing(depths: np.ndarray, paths: Sequence[Path], folder: Path) -> float:
    """Uniform slice spacing of sorted depths, or the error that describes the stack."""
    steps = np.diff(depths)
    duplicates = np.flatnonzero(steps < SPACING_ATOL_MM)
    if duplicates.size:
        i = int(duplicates[0])
        raise DicomSeriesError(f"{folder}: duplicate slice position {depths[i]:.3f} mm in "
                               f"{paths[i].name} and {paths[i + 1].name}")
    step = float(np.median(steps))
    tol = max(SPACING_ATOL_MM, SPACING_RTOL * step)
    off = np.flatnonzero(np.abs(steps - step) > tol)
    if off.size:
        i = int(off[0])
        ratio = steps[i] / step
        if ratio > 1.5 and abs(ratio - round(ratio)) * step <= tol:
            raise DicomSeriesError(
                f"{folder}: {round(ratio) - 1} missing slice(s) between {paths[i].name} and "
                f"{paths[i + 1].name} (gap {steps[i]:.3f} mm, spacing {step:.3f} mm)")
        raise DicomSeriesError(f"{folder}: uneven slice spacing: {steps[i]:.3f} mm between "
                               f"{paths[i].name} and {paths[i + 1].name}, median {step:.3f} mm")
    return step


def _geometry(datasets: Sequence[Dataset], paths: Sequence[Path], folder: Path
              ) -> tuple[list[int], np.ndarray]:
    """Slice order along the normal and the LPS voxel->world affine of the sorted stack."""
    pairs = list(zip(datasets, paths, strict=True))
    iops = [_floats(ds, "ImageOrientationPatient", 6, p) for ds, p in pairs]
    normal = _check_orientation(iops[0], paths[0])
    for iop, p in zip(iops, paths, strict=True):
        if not np.allclose(iop, iops[0], atol=ORIENTATION_TOL):
            raise DicomSeriesError(f"{p}: orientation {iop.tolist()} differs from "
                                   f"{paths[0].name} {iops[0].tolist()}")
    sizes = {(_int(ds, "Rows", p), _int(ds, "Columns", p)) for ds, p in pairs}
    if len(sizes) > 1:
        raise DicomSeriesError(f"{folder}: mixed image sizes {sorted(sizes)} (rows, columns)")
    spacings = [_floats(ds, "PixelSpacing", 2, p) for ds, p in pairs]
    if any(not np.allclose(s, spacings[0], atol=1e-4) for s in spacings) or \
            np.any(spacings[0] <= 0):
        raise DicomSeriesError(f"{folder}: PixelSpacing differs between slices or is not positive")
    positions = np.stack([_floats(ds, "ImagePositionPatient", 3, p) for ds, p in pairs])
    depths = positions @ normal
    order = [int(i) for i in np.argsort(depths, kind="stable")]
    positions, depths = positions[order], depths[order]
    sorted_paths = [paths[i] for i in order]
    step = _slice_spacing(depths, sorted_paths, folder)
    drift = positions - positions[0] - np.outer(depths - depths[0], normal)
    if np.max(np.linalg.norm(drift, axis=1)) > TILT_TOL_MM:
        tilt = np.degrees(np.arctan2(np.linalg.norm(drift[-1]), depths[-1] - depths[0]))
        raise DicomSeriesError(f"{folder}: slice origins drift off the slice normal "
                               f"(gantry tilt or sheared stack, {tilt:.2f} degrees)")
    affine = np.eye(4)
    affine[:3, 0] = iops[0][:3] * spacings[0][1]  # along a row: column index i
    affine[:3, 1] = iops[0][3:] * spacings[0][0]  # down a column: row index j
    affine[:3, 2] = normal * step
    affine[:3, 3] = positions[0]
    return order, affine


def _names(files: Sequence[tuple[Path, str]], folder: Path) -> str:
    return ", ".join(f"{p.relative_to(folder) if p.is_relative_to(folder) else p} ({why})"
                     for p, why in files)


def _readable_slices(info: SeriesInfo, skip_unreadable: bool
                     ) -> tuple[list[Dataset], list[Path], list[np.ndarray],
                                list[tuple[Path, str]]]:
    """Datasets, paths and pixels of the files that read, plus the unreadable ones; an
    unreadable file raises unless `skip_unreadable`."""
    unreadable = list(info.unreadable)
    if unreadable and not skip_unreadable:
        raise DicomSeriesError(
            f"{info.folder}: {len(unreadable)} file(s) of series {info.series_number} "
            f"'{info.description}' cannot be read: {_names(unreadable, info.folder)}; "
            "--skip-unreadable segments the series without them")
    datasets, paths, pixels = [], [], []
    for path in info.paths:
        try:
            ds = _read(path)
            values = _pixels(ds, path)
        except DicomSeriesError as exc:
            if not skip_unreadable:
                raise
            unreadable.append((path, str(exc).removeprefix(f"{path}: ")))
            continue
        datasets.append(ds)
        paths.append(path)
        pixels.append(values)
    return datasets, paths, pixels, unreadable


def load_series(info: SeriesInfo, skip_unreadable: bool = False) -> LoadedSeries:
    """Read, validate and stack a series: array[i=column, j=row, k=slice], RAS affine."""
    folder = info.folder
    if info.n_files < 2:
        raise DicomSeriesError(f"{folder}: series {info.uid} has {info.n_files} file; "
                               "a volume needs at least 2 slices")
    datasets, paths, pixels, skipped = _readable_slices(info, skip_unreadable)
    if len(datasets) < 2:
        raise DicomSeriesError(f"{folder}: {len(datasets)} readable file(s) in series "
                               f"{info.uid}; a volume needs at least 2 slices (unreadable: "
                               f"{_names(skipped, folder)})")
    try:
        order, affine_lps = _geometry(datasets, paths, folder)
    except DicomSeriesError as exc:
        if not skipped:
            raise
        raise DicomSeriesError(f"{exc} (unreadable files skipped: {_names(skipped, folder)})"
                               ) from exc
    array = np.ascontiguousarray(np.stack([pixels[i] for i in order], axis=-1).transpose(1, 0, 2))
    if any(str(datasets[i].get("PhotometricInterpretation", "")) == "MONOCHROME1" for i in order):
        # MONOCHROME1 displays low values bright; invert so that high means bright, as in CT/MR
        array = (array.max() + array.min()) - array
    headers = []
    for i in order:
        ds = datasets[i]
        del ds.PixelData  # keep headers only: a SEG references, it does not copy, the images
        headers.append(ds)
    return LoadedSeries(Volume(array, LPS_TO_RAS @ affine_lps), tuple(headers), info,
                        tuple(skipped))


@dataclass(frozen=True)
class SelectionRules:
    """How to pick a series: filters, then the one with most slices (ties: lowest number)."""

    modality: str | None = None  # e.g. "CT"
    description: str | None = None  # regular expression, searched case-insensitively
    plane: str | None = None  # axial | coronal | sagittal
    allow_derived: bool = False


def _rejection(s: SeriesInfo, rules: SelectionRules) -> str | None:
    """Why a series is not a candidate under `rules`, or None."""
    if s.kind != VOLUME and not (rules.allow_derived and s.kind == DERIVED):
        return f"{s.kind}: {s.reason}"
    if rules.modality and s.modality != rules.modality.upper():
        return f"modality {s.modality} is not {rules.modality.upper()}"
    if rules.description and not re.search(rules.description, s.description, re.IGNORECASE):
        return f"description '{s.description}' does not match /{rules.description}/"
    if rules.plane and s.plane != rules.plane:
        return f"plane {s.plane} is not {rules.plane}"
    return None


def choose_series(series: Sequence[SeriesInfo], rules: SelectionRules | None = None
                  ) -> tuple[SeriesInfo, str]:
    """The series to segment and a one-line reason; `DicomSeriesError` if none qualifies."""
    rules = rules or SelectionRules()
    rejected = {s.uid: _rejection(s, rules) for s in series}
    candidates = [s for s in series if rejected[s.uid] is None]
    if not candidates:
        detail = "; ".join(f"{s.uid}: {rejected[s.uid]}" for s in series) or "no series"
        raise DicomSeriesError(f"no series qualifies ({detail})")
    candidates.sort(key=lambda s: (-s.n_files, s.series_number or 0, s.uid))
    best = candidates[0]
    reason = f"chose {best.summary()}"
    if len(candidates) > 1:
        others = ", ".join(f"{s.uid} ({s.n_files})" for s in candidates[1:])
        reason += f"; most slices among {len(candidates)} candidates (others: {others})"
    skipped = len(series) - len(candidates)
    if skipped:
        reason += f"; {skipped} series excluded"
    return best, reason
