"""The frames of an image file as slices: classic single-frame files and Enhanced multi-frame.

Current scanners export Enhanced (multi-frame) CT and MR: one instance holds every slice, and
what a classic file says once per slice (ImagePositionPatient, ImageOrientationPatient,
PixelSpacing, RescaleSlope/Intercept) lives in functional groups: the Shared Functional
Groups Sequence for what all frames share, the Per-Frame Functional Groups Sequence for what
differs (a per-frame value wins over a shared one). `frame_slices` turns either kind of file
into `FrameSlice`s, so the series loader checks and stacks slices without knowing where they
came from, and `sorted_frames` gives a multi-frame instance's frames in the loader's slice
order, so the SEG writer can put its frames back in the source's frame order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from cmc_serve.dicom.errors import DicomSeriesError


@dataclass(frozen=True)
class FrameSlice:
    """One 2D slice with its geometry as written (strings kept for their written precision)."""

    name: str  # file name, with " frame N" (1-based, as DICOM counts) for a multi-frame file
    path: Path
    source: int  # index of the dataset the slice came from
    frame: int  # 0-based frame index within that dataset
    orientation: Any  # ImageOrientationPatient values as read (None when absent)
    position: Any  # ImagePositionPatient values as read
    pixel_spacing: Any
    rows: int
    columns: int
    echo_time: str  # "" when the header gives none


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames (1 when absent); a bad value is a clear error, not a crash later."""
    value = ds.get("NumberOfFrames")
    try:
        return 1 if value in (None, "") else int(value)
    except (TypeError, ValueError) as exc:
        raise DicomSeriesError(f"invalid NumberOfFrames {value!r}") from exc


def is_multiframe(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or number_of_frames(ds) > 1


def _group_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """The first item of functional group `sequence` for `frame`: per-frame over shared."""
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        items = ds.get(groups)
        if not items:
            continue
        group = items[frame] if groups.startswith("PerFrame") else items[0]
        value = group.get(sequence)
        if value:
            return value[0]
    return None


def frame_value(ds: Dataset, frame: int, sequence: str, keyword: str) -> Any:
    """`keyword` of functional group `sequence` for `frame` (0-based), or None."""
    item = _group_item(ds, frame, sequence)
    return item.get(keyword) if item is not None else None


def _required(ds: Dataset, frame: int, sequence: str, keyword: str, path: Path) -> Any:
    value = frame_value(ds, frame, sequence, keyword)
    if value is None:
        raise DicomSeriesError(f"{path}: frame {frame + 1} has no {keyword} in its functional "
                               f"groups ({sequence})")
    return value


def _echo_time(ds: Dataset, frame: int) -> str:
    if not is_multiframe(ds):
        value = ds.get("EchoTime")
    else:
        value = frame_value(ds, frame, "MREchoSequence", "EffectiveEchoTime")
    return "" if value in (None, "") else f"{float(value):g}"


def frame_slices(ds: Dataset, path: Path, source: int) -> list[FrameSlice]:
    """The slices of one file, with the geometry values exactly as written."""
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if not is_multiframe(ds):
        return [FrameSlice(path.name, path, source, 0, ds.get("ImageOrientationPatient"),
                           ds.get("ImagePositionPatient"), ds.get("PixelSpacing"),
                           rows, columns, _echo_time(ds, 0))]
    n = number_of_frames(ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != n:
        raise DicomSeriesError(f"{path}: {len(per_frame)} per-frame functional groups for "
                               f"NumberOfFrames {n}")
    return [FrameSlice(
        f"{path.name} frame {k + 1}", path, source, k,
        _required(ds, k, "PlaneOrientationSequence", "ImageOrientationPatient", path),
        _required(ds, k, "PlanePositionSequence", "ImagePositionPatient", path),
        _required(ds, k, "PixelMeasuresSequence", "PixelSpacing", path),
        rows, columns, _echo_time(ds, k)) for k in range(n)]


def modality_values(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """Stored values -> modality values [frame, row, column] (one frame: [row, column]).

    A multi-frame file rescales each frame with its own Pixel Value Transformation (the
    shared one when a frame has none; identity when neither exists, as in most Enhanced MR).
    """
    if not is_multiframe(ds):
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    frames = stored.reshape((-1, *stored.shape[-2:])).astype(np.float32)
    for k in range(frames.shape[0]):
        item = _group_item(ds, k, "PixelValueTransformationSequence")
        slope = float(item.get("RescaleSlope", 1.0)) if item is not None else 1.0
        intercept = float(item.get("RescaleIntercept", 0.0)) if item is not None else 0.0
        frames[k] = frames[k] * slope + intercept
    return frames


def sorted_frames(ds: Dataset) -> list[int]:
    """A multi-frame instance's 0-based frame indices in slice order along the normal (the
    order `load_series` stacks them in); identity order for a single-frame file."""
    n = number_of_frames(ds)
    if not is_multiframe(ds):
        return list(range(n))
    path = Path(str(ds.get("SOPInstanceUID", "multi-frame instance")))
    slices = frame_slices(ds, path, 0)
    iop = np.array([float(v) for v in slices[0].orientation])
    normal = np.cross(iop[:3], iop[3:])
    depths = [float(np.array([float(v) for v in s.position]) @ normal) for s in slices]
    return [int(i) for i in np.argsort(depths, kind="stable")]


def slice_count(datasets: Sequence[Dataset]) -> int:
    """Slices the datasets hold: their frames (one per single-frame file)."""
    return sum(number_of_frames(ds) for ds in datasets)


def source_frame_order(datasets: Sequence[Dataset]) -> list[int] | None:
    """For one multi-frame source, its frame indices in slice order (label slice k belongs to
    frame order[k]); None for single-frame files, which are already in slice order."""
    if len(datasets) == 1 and is_multiframe(datasets[0]):
        return sorted_frames(datasets[0])
    return None
