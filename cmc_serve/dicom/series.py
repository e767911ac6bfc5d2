"""Assemble a DICOM series into a `Volume` (RAS affine), refusing any geometry we cannot trust.

Slices (files, or the frames of Enhanced multi-frame instances: `multiframe`) are ordered
along the slice normal computed from ImageOrientationPatient and ImagePositionPatient, never by
InstanceNumber, with tolerances derived from the precision the header wrote (`geometry`).
Everything that would make the volume silently
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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from cmc_common.errors import one_line
from cmc_serve.dicom.decoders import syntax_label, undecodable_reason
from cmc_serve.dicom.errors import DicomSeriesError
from cmc_serve.dicom.geometry import stack_geometry
from cmc_serve.dicom.multiframe import FrameSlice, frame_slices, modality_values
from cmc_serve.dicom.scan import DERIVED, VOLUME, SeriesInfo
from cmc_serve.volume import LPS_TO_RAS, Volume, release_free_memory

# `_assemble` writes the volume (slice axis fastest) in blocks of _BLOCK_SLICES slices and
# _TILE_ROWS rows: each run it writes is 64 bytes (a cache line) and the tile it transposes
# (256 KiB for 512 columns) stays in cache; slice by slice, every value written was a cache
# miss (3x slower). Freed memory goes back to the system after each block.
_BLOCK_SLICES = 16
_TILE_ROWS = 16


@dataclass(frozen=True)
class LoadedSeries:
    """The volume and the source headers (pixel data dropped) for SEG referencing: the files
    in slice order, or the multi-frame instance(s) whose frames make the slices."""

    volume: Volume
    datasets: tuple[Dataset, ...]
    info: SeriesInfo
    skipped: tuple[tuple[Path, str], ...] = ()  # unreadable files left out (skip_unreadable)


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
    """The stored pixel values as decoded, once checked to convert to modality values
    (`_values`) of the header's frames x Rows x Columns. The series is held as stored (2
    bytes per voxel for 16-bit data) until its slices are ordered; `_assemble` converts them
    again file by file into the volume, so the float32 values never exist twice."""
    if "PixelData" not in ds:
        raise DicomSeriesError(f"{path}: no pixel data")
    if _int(ds, "SamplesPerPixel", path, default=1) != 1:
        raise DicomSeriesError(f"{path}: colour images are not supported")
    frames = _int(ds, "NumberOfFrames", path, default=1)
    shape = (frames, _int(ds, "Rows", path), _int(ds, "Columns", path))
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "")).strip()
    refusal = undecodable_reason(syntax) if syntax else None
    if refusal:
        raise DicomSeriesError(f"{path}: {refusal}")
    try:
        stored = ds.pixel_array
        values = _values(ds, stored)
    except Exception as exc:  # truncated data, inconsistent header, a plugin's own failure
        raise DicomSeriesError(f"{path}: cannot decode pixel data "
                               f"({syntax_label(syntax) if syntax else 'no transfer syntax'}): "
                               f"{one_line(exc)}") from exc
    if values.shape != shape:
        raise DicomSeriesError(f"{path}: pixel data shape {values.shape} != frames x Rows x "
                               f"Columns {shape}")
    return stored


def _values(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """Modality values (RescaleSlope/Intercept, Modality LUT or per-frame Pixel Value
    Transformation), float32, [frame, row, column]."""
    values = modality_values(ds, stored)
    return values.reshape((-1, *values.shape[-2:]))


def _names(files: Sequence[tuple[Path, str]], folder: Path) -> str:
    return ", ".join(f"{p.relative_to(folder) if p.is_relative_to(folder) else p} ({why})"
                     for p, why in files)


def _readable_files(info: SeriesInfo, skip_unreadable: bool
                    ) -> tuple[list[Dataset], list[Path], list[np.ndarray | None],
                               list[tuple[Path, str]]]:
    """Datasets, paths and pixels ([frame, row, column]) of the files that read, plus the
    unreadable ones; an unreadable file raises unless `skip_unreadable`."""
    unreadable = list(info.unreadable)
    if unreadable and not skip_unreadable:
        raise DicomSeriesError(
            f"{info.folder}: {len(unreadable)} file(s) of series {info.series_number} "
            f"'{info.description}' cannot be read: {_names(unreadable, info.folder)}; "
            "--skip-unreadable segments the series without them")
    datasets: list[Dataset] = []
    paths: list[Path] = []
    pixels: list[np.ndarray | None] = []
    for path in info.paths:
        try:
            ds = _read(path)
            values = _pixels(ds, path)
            del ds.PixelData  # and pydicom's cached array: `values` holds the decoded pixels
        except DicomSeriesError as exc:
            if not skip_unreadable:
                raise
            unreadable.append((path, str(exc).removeprefix(f"{path}: ")))
            continue
        datasets.append(ds)
        paths.append(path)
        pixels.append(values)
    return datasets, paths, pixels, unreadable


def _slices(datasets: Sequence[Dataset], paths: Sequence[Path]) -> list[FrameSlice]:
    return [s for i, (ds, path) in enumerate(zip(datasets, paths, strict=True))
            for s in frame_slices(ds, path, i)]


def _assemble(datasets: Sequence[Dataset], pixels: list[np.ndarray | None],
              ordered: Sequence[FrameSlice]) -> np.ndarray:
    """The slices, in `ordered` order, as one float32 array [column, row, slice] of modality
    values, written into one allocation while each file's stored pixels are released after
    its last frame. Writing the first block already makes every page of the array resident
    (the slice axis is the fastest), so the stored pixels (`_pixels`) and the array are held
    together: 6 bytes per voxel for 16-bit data plus one block of _BLOCK_SLICES float32
    slices, never a list of float slices plus their stack; the released pixels go back to
    the system (`release_free_memory`)."""
    rows, columns = next(p for p in pixels if p is not None).shape[-2:]
    array = np.empty((columns, rows, len(ordered)), dtype=np.float32)
    block = np.empty((min(_BLOCK_SLICES, len(ordered)), rows, columns), dtype=np.float32)
    left = Counter(s.source for s in ordered)
    converted: dict[int, np.ndarray] = {}  # a multi-frame file's values until its last frame
    for start in range(0, len(ordered), _BLOCK_SLICES):
        chunk = ordered[start:start + _BLOCK_SLICES]
        for j, s in enumerate(chunk):
            if s.source not in converted:
                stored = pixels[s.source]
                assert stored is not None  # released only after its last frame
                converted[s.source] = _values(datasets[s.source], stored)
                pixels[s.source] = None
            block[j] = converted[s.source][s.frame]
            left[s.source] -= 1
            if not left[s.source]:
                del converted[s.source]
        stop = start + len(chunk)
        for row in range(0, rows, _TILE_ROWS):
            array[:, row:row + _TILE_ROWS, start:stop] = \
                block[:len(chunk), row:row + _TILE_ROWS].transpose(2, 1, 0)
        release_free_memory()
    return array


def load_series(info: SeriesInfo, skip_unreadable: bool = False) -> LoadedSeries:
    """Read, validate and stack a series: array[i=column, j=row, k=slice], RAS affine.

    A series of single-frame files and one of Enhanced multi-frame instances load alike:
    every frame is a slice with its own position (`cmc_serve.dicom.multiframe`)."""
    folder = info.folder
    datasets, paths, pixels, skipped = _readable_files(info, skip_unreadable)
    slices = _slices(datasets, paths)
    if len(slices) < 2:
        detail = f" (unreadable: {_names(skipped, folder)})" if skipped else ""
        raise DicomSeriesError(f"{folder}: {len(slices)} readable slice(s) in series "
                               f"{info.uid}; a volume needs at least 2 slices{detail}")
    try:
        order, affine_lps = stack_geometry(slices, folder)
    except DicomSeriesError as exc:
        if not skipped:
            raise
        raise DicomSeriesError(f"{exc} (unreadable files skipped: {_names(skipped, folder)})"
                               ) from exc
    array = _assemble(datasets, pixels, [slices[i] for i in order])
    if any(str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1" for ds in datasets):
        # MONOCHROME1 displays low values bright; invert so that high means bright, as in CT/MR
        np.subtract(array.max() + array.min(), array, out=array)
    sources = list(dict.fromkeys(slices[i].source for i in order))  # first-slice order
    # headers only (pixel data dropped when read): a SEG references, it does not copy, images
    headers = [datasets[i] for i in sources]
    return LoadedSeries(Volume(array, LPS_TO_RAS @ affine_lps), tuple(headers), info,
                        tuple(skipped))


@dataclass(frozen=True)
class SelectionRules:
    """How to pick a series: filters, then the one with most slices (frames of a multi-frame
    series count as slices; ties: lowest number)."""

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
    candidates.sort(key=lambda s: (-s.n_slices, s.series_number or 0, s.uid))
    best = candidates[0]
    reason = f"chose {best.summary()}"
    if len(candidates) > 1:
        others = ", ".join(f"{s.uid} ({s.n_slices})" for s in candidates[1:])
        reason += f"; most slices among {len(candidates)} candidates (others: {others})"
    skipped = len(series) - len(candidates)
    if skipped:
        reason += f"; {skipped} series excluded"
    return best, reason
