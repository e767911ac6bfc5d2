"""Choosing the post-processing of each class on validation predictions (`cmc evaluate
--choose-postprocessing`); applying it is `cmc_serve.postprocess`, shared with serving.

For each foreground class, on the cases of one mode: no change, the largest component, or
removal of components below 10 %, 25 % or 50 % of the smallest reference volume of the
class (in mm3). The candidate with the highest mean Dice of that class wins; equal Dice
(to 1e-6) goes to fewer undefined HD95 values, then to the lower mean HD95, then to no
change. nnU-Net decides on Dice alone; HD95 breaks ties here because islands far from the
organ barely move Dice. Classes are chosen independently: an operation on one class never
changes another's voxels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cmc_serve.postprocess import clean_class
from cmc_train.metrics import dice, hd95

SMALL_FRACTIONS = (0.1, 0.25, 0.5)


@dataclass(frozen=True)
class CasePrediction:
    """One case's labels as predicted and as drawn, on the pre-processed grid."""

    case_id: str
    pred: np.ndarray
    ref: np.ndarray
    spacing: tuple[float, float, float]


def _candidates(cases: Sequence[CasePrediction], cls: int, voxel_mm3: float
                ) -> list[dict[str, Any] | None]:
    volumes = [float((c.ref == cls).sum()) * voxel_mm3 for c in cases]
    present = [v for v in volumes if v > 0]
    out: list[dict[str, Any] | None] = [None, {"op": "largest_component"}]
    if present:
        out += [{"op": "remove_small", "min_mm3": round(f * min(present), 1)}
                for f in SMALL_FRACTIONS]
    return out


def _score(cases: Sequence[CasePrediction], cls: int, op: dict[str, Any] | None,
           voxel_mm3: float) -> tuple[float, int, float]:
    """(mean Dice, undefined HD95 count, mean defined HD95) of class `cls` after `op`."""
    dices, hds = [], []
    for case in cases:
        pred = case.pred if op is None else clean_class(case.pred, cls, op, voxel_mm3)
        p, r = pred == cls, case.ref == cls
        dices.append(dice(p, r))
        hds.append(hd95(p, r, case.spacing))
    finite = [h for h in hds if not math.isnan(h)]
    return (float(np.mean(dices)), len(hds) - len(finite),
            float(np.mean(finite)) if finite else math.inf)


def choose_operations(cases: Sequence[CasePrediction], classes: Sequence[str]
                      ) -> list[dict[str, Any]]:
    """The chosen operations of one mode (classes without one are left out)."""
    if not cases:
        return []
    voxel_mm3 = float(np.prod(cases[0].spacing))
    chosen = []
    for cls in range(1, len(classes)):
        best_key: tuple[float, int, float, int] | None = None
        best: dict[str, Any] | None = None
        for op in _candidates(cases, cls, voxel_mm3):
            mean_dice, undefined, mean_hd = _score(cases, cls, op, voxel_mm3)
            key = (round(mean_dice, 6), -undefined, -mean_hd, int(op is None))
            if best_key is None or key > best_key:
                best_key, best = key, op
        if best is not None:
            chosen.append({"class": cls, "name": classes[cls], **best})
    return chosen
