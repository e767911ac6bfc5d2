"""Post-processing of label volumes: per-class connected-component clean-up (numpy/scipy).

The one implementation behind all three places that must agree: `cmc evaluate` scores and
chooses it on validation data (cmc_train, with torch), `cmc segment` and the Triton volume
model apply it at serving (no torch). What nnU-Net users know as "remove all but the largest
component": a prediction often carries small islands far from the organ, which cost little
Dice but dominate HD95.

Operations, per foreground class (removed voxels become background, 0):
- `largest_component`: keep the largest 26-connected component of the class;
- `remove_small` {min_mm3}: drop components smaller than `min_mm3` cubic millimetres.
A class's operation touches only that class's voxels, so classes are independent.

The choice is a JSON object, recorded in the checkpoint's metadata and copied into the
exported model directory's cmc.json (key "postprocessing"):

    {"chosen_on": "...", "spacing_mm": [x, y, z],
     "modes": {"fused": [{"class": 1, "name": "liver", "op": "largest_component"},
                         {"class": 3, "name": "kidney_r", "op": "remove_small",
                          "min_mm3": 250.0}],
               "a": [...], "b": [...]}}

Predictions are cleaned on the grid they are made on (the checkpoint's spacing), before
labels return to the input geometry, so `min_mm3` means the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from cmc_common.contract import MODES
from cmc_common.errors import CmcError

OPS = ("largest_component", "remove_small")


class PostprocessError(CmcError, ValueError):
    """A post-processing record that cannot be applied (the message says which entry)."""


def component_sizes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """26-connected components of a boolean mask: (component index per voxel, voxel counts,
    index 0 = outside the mask).

    scipy is imported here, not with the module: the Triton volume model imports this
    module, and a server Python without scipy must still load a model with no record."""
    from scipy import ndimage

    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    return components, np.bincount(components.ravel(), minlength=count + 1)


def clean_class(labels: np.ndarray, cls: int, op: Mapping[str, Any],
                voxel_mm3: float) -> np.ndarray:
    """`labels` with one class's operation applied (a new array; the input is untouched)."""
    mask = labels == cls
    out = labels.copy()
    if not mask.any():
        return out
    components, sizes = component_sizes(mask)
    sizes[0] = 0
    if op["op"] == "largest_component":
        keep = np.zeros(len(sizes), dtype=bool)
        keep[int(np.argmax(sizes))] = True
    else:
        keep = sizes * voxel_mm3 >= float(op["min_mm3"])
    out[mask & ~keep[components]] = 0
    return out


def check_record(record: Mapping[str, Any], num_classes: int,
                 fail: Callable[[str], Exception] = PostprocessError) -> None:
    """Raise `fail(problem)` unless `record` is a valid choice for `num_classes` classes;
    the reader of a file holding the record passes its own error, naming the file."""
    spacing = record.get("spacing_mm")
    if not isinstance(spacing, Sequence) or len(spacing) != 3 or \
            not all(isinstance(s, int | float) and s > 0 for s in spacing):
        raise fail(f"postprocessing: spacing_mm must be 3 positive numbers, got {spacing!r}")
    modes = record.get("modes")
    if not isinstance(modes, Mapping):
        raise fail("postprocessing: 'modes' must map a mode to its operations")
    for mode, ops in modes.items():
        if mode not in MODES or not isinstance(ops, Sequence):
            raise fail(f"postprocessing: {mode!r} is not a mode with a list of operations")
        for op in ops:
            if not isinstance(op, Mapping) or op.get("op") not in OPS or \
                    not isinstance(op.get("class"), int) or not 0 < op["class"] < num_classes:
                raise fail(f"postprocessing[{mode}]: {op!r} is not an operation on a "
                           f"foreground class 1..{num_classes - 1}")
            if op["op"] == "remove_small" and not (
                    isinstance(op.get("min_mm3"), int | float) and op["min_mm3"] >= 0):
                raise fail(f"postprocessing[{mode}]: {op!r} needs min_mm3 >= 0")


def apply_operations(labels: np.ndarray, ops: Sequence[Mapping[str, Any]],
                     spacing_mm: Sequence[float]) -> np.ndarray:
    """`ops` (one mode's list) applied in turn to labels on a grid of `spacing_mm`."""
    voxel_mm3 = float(np.prod(spacing_mm))
    for op in ops:
        labels = clean_class(labels, int(op["class"]), op, voxel_mm3)
    return labels


def apply(labels: np.ndarray, record: Mapping[str, Any] | None, mode: str) -> np.ndarray:
    """The recorded operations of `mode` applied to uint8 labels on the checkpoint's grid
    (no record or no operation for the mode: the labels as they are)."""
    if not record:
        return labels
    return apply_operations(labels, record.get("modes", {}).get(mode, []), record["spacing_mm"])


def describe(ops: Sequence[Mapping[str, Any]]) -> str:
    """One mode's operations in words (for tables and logs)."""
    if not ops:
        return "none"
    return "; ".join(
        f"{op.get('name', op['class'])}: largest component" if op["op"] == "largest_component"
        else f"{op.get('name', op['class'])}: components < {op['min_mm3']:g} mm3 removed"
        for op in ops)
