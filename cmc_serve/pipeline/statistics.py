"""`--statistics`: volume and intensity of every class, measured on the source grid.

Measured on the user's own voxels (not the network's resampled grid), so the volumes agree
with what a viewer shows for seg.nii.gz / seg.dcm. Intensities are raw scanner values (HU for
CT); modality b is read on modality a's grid, where the labels are. With quality control on,
each class also carries its QC score and the flags that concern it, and the file the case's
verdict (`qc`: score, flagged, the case-level flags).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cmc_serve.qc.flags import CaseQc
from cmc_serve.volume import count_labels, release_free_memory


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in millilitres (|det| of the affine's 3x3 part, mm^3 / 1000)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def _intensity(image: np.ndarray, mask: np.ndarray | None) -> dict[str, float] | None:
    """Mean and median of the image inside one class's mask (None: the class is empty);
    only that class's voxels are copied, in the image's voxel order."""
    if mask is None:
        return None
    values = image[mask].astype(np.float64)
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
        mask = labels == label if counts[label] else None
        for modality, image in images.items():
            if image.shape != labels.shape:
                raise ValueError(f"{modality} image shape {image.shape} differs from the "
                                 f"labels {labels.shape}")
            intensity[modality] = _intensity(image, mask)
        classes[class_names[label]] = {"label": label, "voxels": int(counts[label]),
                                       "volume_ml": round(float(counts[label]) * ml, 4),
                                       "intensity": intensity}
    release_free_memory()  # the per-class masks and values
    if qc is None:
        return {"voxel_volume_ml": ml, "classes": classes}
    for name, row in classes.items():
        row["qc"] = {"score": round(float(qc.structures.get(name, 1.0)), 4),
                     "flags": [f.to_json() for f in qc.flags if f.structure == name]}
    return {"voxel_volume_ml": ml, "classes": classes,
            "qc": {"score": round(float(qc.score), 4), "flagged": qc.flagged,
                   "flags": [f.to_json() for f in qc.flags if f.structure is None]}}
