"""Data checks that run before the first training step (and alone, as `cmc check-data`).

`Datalist.load` checks the datalist's structure and that every file exists; this module
reads the files. Problems that otherwise surface minutes later as a traceback naming no file
(a label value beyond the class list: `IndexError: Target 3 is out of bounds` in the loss; a
validation split without volumes of a trained modality: a failure after the last step and no
checkpoint) are found here and reported with the file, the modality's name and the problem:

- every image is a 3-D volume of finite values that are not all equal;
- every label has its image's shape and grid (affine within 0.01 mm) and integer values
  0..K-1 for the K classes of the datalist;
- the labelled split holds a labelled volume of each trained modality, and so does the
  validation split (training keeps the best checkpoint by it).

All problems are collected, so `cmc check-data` can list every one; training stops at the
first with a pointer to `cmc check-data`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from cmc_train.data.datalist import SPLITS, Datalist, DatalistError, Entry

_AFFINE_ATOL_MM = 1e-2


class DataCheckError(DatalistError):
    """The data cannot be trained or evaluated on; the message names the file and problem."""


@dataclass
class DataReport:
    """What the checks found: problems (empty when the data are usable) and counts."""

    datalist: Path
    classes: tuple[str, ...]
    modalities: tuple[str, str]
    problems: list[str] = field(default_factory=list)
    # (split, modality) -> [images, labels]
    volumes: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    # (split, modality) -> how many label volumes contain each class index
    class_counts: dict[tuple[str, str], Counter[int]] = field(default_factory=dict)

    def raise_first(self) -> None:
        """DataCheckError with the first problem (and how many more there are)."""
        if not self.problems:
            return
        more = len(self.problems) - 1
        tail = (f" (and {more} more problem{'s' * (more > 1)}; `cmc check-data "
                f"{self.datalist}` lists them all)") if more else ""
        raise DataCheckError(self.problems[0] + tail)


def check_data(datalist: Datalist, path: Path, splits: Sequence[str] = SPLITS,
               need_labelled: Iterable[str] = (), need_validation: Iterable[str] = ()
               ) -> DataReport:
    """Read every image and label of `splits` and check them (see the module docstring).

    `need_labelled` / `need_validation`: modality names that must have at least one labelled
    volume in the labelled / validation split (what training is about to use).
    """
    report = DataReport(Path(path), tuple(datalist.classes), datalist.modalities)
    for split in splits:
        for modality in datalist.modalities:
            report.volumes[(split, modality)] = [0, 0]
            report.class_counts[(split, modality)] = Counter()
        for entry in datalist.split(split):
            _check_entry(entry, split, report)
    for split, modalities in (("labelled", need_labelled), ("validation", need_validation)):
        for modality in modalities:
            if not report.volumes.get((split, modality), [0, 0])[1]:
                why = ("training needs one to learn from" if split == "labelled" else
                       "training scores it at each validation and keeps the best checkpoint")
                report.problems.append(
                    f"{path}: the {split} split has no labelled {modality} volume ({why})")
    return report


def _check_entry(entry: Entry, split: str, report: DataReport) -> None:
    for modality, image_path in entry.image.items():
        counts = report.volumes[(split, modality)]
        counts[0] += 1
        image = _load(image_path, f"{modality} image of {entry.id!r}", report)
        if image is None:
            continue
        _check_image(image, image_path, modality, report)
        label_path = entry.label.get(modality)
        if label_path is not None:
            counts[1] += 1
            label = _load(label_path, f"{modality} label of {entry.id!r}", report)
            if label is not None:
                present = _check_label(label, label_path, image, modality, report)
                report.class_counts[(split, modality)].update(present)


def _load(path: Path, what: str, report: DataReport) -> Any:
    """The nibabel image of `path`, or None (problem recorded) when it cannot be read."""
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for foreign or truncated files
        report.problems.append(f"{path}: cannot read the {what} ({type(exc).__name__}: {exc})")
        return None


def _array(img: Any, path: Path, report: DataReport) -> np.ndarray | None:
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        report.problems.append(f"{path}: cannot read the voxels ({type(exc).__name__}: {exc})")
        return None
    return data.reshape(data.shape[:3]) if data.ndim > 3 and all(
        s == 1 for s in data.shape[3:]) else data


def _check_image(img: Any, path: Path, modality: str,
                 report: DataReport) -> None:
    data = _array(img, path, report)
    if data is None:
        return
    if data.ndim != 3:
        report.problems.append(f"{path}: the {modality} image has shape {data.shape}, not a "
                               "3-D volume")
        return
    if not np.all(np.isfinite(data)):
        report.problems.append(f"{path}: the {modality} image contains NaN or infinite values")
    elif float(data.min()) == float(data.max()):
        report.problems.append(f"{path}: the {modality} image has one intensity value only "
                               f"({float(data.min()):g})")


def _check_label(label: Any, path: Path,
                 image: Any, modality: str,
                 report: DataReport) -> set[int]:
    """Problems of one label volume; returns the class indices it contains."""
    data = _array(label, path, report)
    if data is None:
        return set()
    shape = tuple(image.shape[:3]) if len(image.shape) >= 3 else tuple(image.shape)
    if data.shape != shape:
        report.problems.append(f"{path}: the {modality} label has shape {data.shape}, its "
                               f"image {shape}")
        return set()
    if not np.allclose(label.affine, image.affine, atol=_AFFINE_ATOL_MM):
        report.problems.append(f"{path}: the {modality} label's grid (affine) differs from "
                               "its image's; labels must be drawn on the image's voxels")
    if not np.all(np.isfinite(data)):
        report.problems.append(f"{path}: the {modality} label contains NaN or infinite values")
        return set()
    values = np.unique(data)
    k = len(report.classes)
    fractional = values[values != np.round(values)]
    outside = values[(values < 0) | (values > k - 1)]
    if fractional.size:
        report.problems.append(f"{path}: the {modality} label has non-integer values "
                               f"{_listed(fractional)}")
    if outside.size:
        report.problems.append(
            f"{path}: the {modality} label has values {_listed(outside)} beyond the datalist's "
            f"{k} classes (0..{k - 1}: {', '.join(report.classes)})")
    return {int(v) for v in values if v == round(v) and 0 <= v < k}


def _listed(values: np.ndarray, most: int = 6) -> str:
    shown = ", ".join(f"{float(v):g}" for v in values[:most])
    return f"[{shown}{', ...' if len(values) > most else ''}]"
