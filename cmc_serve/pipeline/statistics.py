"""`--statistics`: volume and intensity of every class, measured on the source grid.

Measured on the user's own voxels (not the network's resampled grid), so the volumes agree
with what a viewer shows for seg.nii.gz / seg.dcm. Intensities are raw scanner values (HU for
CT); modality b is read on modality a's grid, where the labels are. With quality control on,
each class also carries its QC score and the flags that concern it, and the file the case's
verdict (`qc`: score, flagged, the case-level flags).

Outlier volumes: within a batch, per class, a case is flagged when its volume is far from
the others' by the modified z-score of Iglewicz and Hoaglin, |x - median| / (1.4826 MAD)
> 3.5, computed only with at least `MIN_CASES_FOR_OUTLIERS` cases (a MAD of fewer is
noise). The scale has a floor of 5 % of the median so that near-identical volumes do not
turn a 1 % difference into an outlier. A flag asks for a look, it is not a verdict.
(`outliers`, marked in report.html, over `class_volumes` of each case.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cmc_serve.qc.flags import CaseQc
from cmc_serve.volume import count_labels, release_free_memory

MIN_CASES_FOR_OUTLIERS = 5
OUTLIER_Z = 3.5
_SLAB_VOXELS = 1 << 22  # label voxels compared with a class at once


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in millilitres (|det| of the affine's 3x3 part, mm^3 / 1000)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def _intensity(image: np.ndarray, labels: np.ndarray, label: int,
               count: int) -> dict[str, float] | None:
    """Mean and median of the image over one class's `count` voxels (None: the class is
    empty). The class's values are gathered as float64 in the image's voxel order, slab by
    slab along the first axis: no volume-sized mask and no float32 copy beside them."""
    if not count:
        return None
    values = np.empty(count, dtype=np.float64)
    filled = 0
    step = max(1, _SLAB_VOXELS // max(1, labels[:1].size))
    for start in range(0, labels.shape[0], step):
        slab = image[start:start + step][labels[start:start + step] == label]
        values[filled:filled + slab.size] = slab
        filled += slab.size
    mean = round(float(values.mean()), 4)
    return {"mean": mean, "median": round(float(np.median(values, overwrite_input=True)), 4)}


def class_statistics(labels: np.ndarray, class_names: Sequence[str], affine: np.ndarray,
                     images: Mapping[str, np.ndarray], qc: CaseQc | None = None
                     ) -> dict[str, Any]:
    """{class name: {label, voxels, volume_ml, intensity: {modality: {mean, median}}}}, and
    with `qc` per class {qc: {score, flags}} and the case's {qc: {score, flagged, flags}}.

    The background (label 0) is left out; an empty class has volume 0 and no intensities.
    """
    counts = count_labels(labels, len(class_names))
    ml = voxel_volume_ml(affine)
    classes: dict[str, Any] = {}
    for label in range(1, len(class_names)):
        intensity: dict[str, Any] = {}
        for modality, image in images.items():
            if image.shape != labels.shape:
                raise ValueError(f"{modality} image shape {image.shape} differs from the "
                                 f"labels {labels.shape}")
            intensity[modality] = _intensity(image, labels, label, int(counts[label]))
        classes[class_names[label]] = {"label": label, "voxels": int(counts[label]),
                                       "volume_ml": round(float(counts[label]) * ml, 4),
                                       "intensity": intensity}
    release_free_memory()  # the per-class values
    if qc is None:
        return {"voxel_volume_ml": ml, "classes": classes}
    for name, row in classes.items():
        row["qc"] = {"score": round(float(qc.structures.get(name, 1.0)), 4),
                     "flags": [f.to_json() for f in qc.flags if f.structure == name]}
    return {"voxel_volume_ml": ml, "classes": classes,
            "qc": {"score": round(float(qc.score), 4), "flagged": qc.flagged,
                   "flags": [f.to_json() for f in qc.flags if f.structure is None]}}


# ------------------------------------------------------------ volumes across a batch

def class_volumes(case_folder: Path, class_names: Sequence[str]) -> dict[str, float] | None:
    """Volume (ml) per foreground class: statistics.json when written, else counted from
    seg.nii.gz; None when the case has neither."""
    from cmc_serve.pipeline import outputs

    stats = case_folder / outputs.STATISTICS
    if stats.is_file():
        try:
            classes = json.loads(stats.read_text())["classes"]
            return {name: float(c["volume_ml"]) for name, c in classes.items()}
        except (OSError, ValueError, KeyError, TypeError):
            pass
    seg = case_folder / outputs.SEG_NIFTI
    if not seg.is_file():
        return None
    import nibabel as nib

    img = nib.load(str(seg))
    assert isinstance(img, nib.Nifti1Image)  # written by nifti_io.write_label_nifti
    counts = count_labels(np.asarray(img.dataobj, dtype=np.uint8), len(class_names))
    ml = voxel_volume_ml(img.affine)
    return {name: round(float(counts[i]) * ml, 4) for i, name in enumerate(class_names) if i}


def outliers(volumes: Mapping[str, Mapping[str, float]]) -> set[tuple[str, str]]:
    """(case, class) pairs whose volume is an outlier of the batch (module docstring)."""
    flagged: set[tuple[str, str]] = set()
    if len(volumes) < MIN_CASES_FOR_OUTLIERS:
        return flagged
    classes = sorted({c for v in volumes.values() for c in v})
    for cls in classes:
        cases = [k for k, v in volumes.items() if cls in v]
        x = np.array([volumes[k][cls] for k in cases], dtype=np.float64)
        median = float(np.median(x))
        scale = max(1.4826 * float(np.median(np.abs(x - median))), 0.05 * abs(median), 1e-6)
        for case, value in zip(cases, x, strict=True):
            if abs(value - median) / scale > OUTLIER_Z:
                flagged.add((case, cls))
    return flagged
