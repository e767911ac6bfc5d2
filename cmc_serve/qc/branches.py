"""Branch agreement: how far CMC's own predictions of one case agree with each other.

The fused pass already runs two decoders (one per modality branch) and averages their
softmaxes; where the case is one the model knows, the two place the organs alike, and where
it is not (a contrast never seen, a misregistered pair, the wrong body region) they part.
This costs no extra network time: the engine hands each decoder's argmax labels and the
fused margin sums over (`BranchOutputs`). When the a-only and b-only modes were run too
(the opt-in cross-modal opinion), each is compared with the fused answer the same way.

Agreement alone is not a verdict: on clean cases of a misaligned pair the decoders agree
only partly, so `cmc_serve.qc.verdict` judges these numbers against the same numbers
measured on the held-out cases (`cmc_train.qc_reference`), never against a fixed value.
Training measures them with these same functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cmc_serve.qc.inputs import BranchOutputs


def confusion(labels_x: np.ndarray, labels_y: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, K] voxel counts: row = class in x, column = class in y (one pass, no masks)."""
    if labels_x.shape != labels_y.shape:
        raise ValueError(f"label grids differ: {labels_x.shape} vs {labels_y.shape}")
    joint = labels_x.astype(np.int64).ravel() * num_classes + labels_y.astype(np.int64).ravel()
    return np.bincount(joint, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def dice_per_class(matrix: np.ndarray) -> list[float | None]:
    """Dice of every foreground class from a confusion matrix; None where neither side has
    the class (nothing to agree or disagree on)."""
    out: list[float | None] = []
    for k in range(1, matrix.shape[0]):
        total = int(matrix[k, :].sum() + matrix[:, k].sum())
        out.append(None if total == 0 else 2.0 * float(matrix[k, k]) / total)
    return out


def mean_defined(values: Sequence[float | None]) -> float | None:
    """Mean of the defined values (None when none is)."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def branch_agreement(branches: BranchOutputs, class_names: Sequence[str]) -> dict[str, Any]:
    """Per structure: Dice between the two decoders' labels, the smaller volume over the
    larger, the mean fused margin over the voxels the fused answer gives the structure; and
    the case means (`mean_dice`, `mean_margin` weighted by voxels)."""
    k = len(class_names)
    matrix = confusion(branches.labels_a, branches.labels_b, k)
    dice = dice_per_class(matrix)
    rows: dict[str, dict[str, float | None]] = {}
    for c in range(1, k):
        vol_a, vol_b = float(matrix[c, :].sum()), float(matrix[:, c].sum())
        count = float(branches.voxel_count[c])
        rows[class_names[c]] = {
            "dice": dice[c - 1],
            "volume_ratio": (min(vol_a, vol_b) / max(vol_a, vol_b)) if max(vol_a, vol_b) else None,
            "margin": float(branches.margin_sum[c]) / count if count else None,
        }
    fg_count = float(np.sum(branches.voxel_count[1:k]))
    mean_margin = float(np.sum(branches.margin_sum[1:k])) / fg_count if fg_count else None
    return {"structures": rows, "mean_dice": _or_zero(mean_defined(dice)),
            "mean_margin": mean_margin}


def cross_modal_agreement(single: Mapping[str, np.ndarray], fused: np.ndarray,
                          class_names: Sequence[str]) -> dict[str, Any]:
    """Per role given (a, b): Dice of that single-modality answer against the fused one,
    per structure and as a foreground mean."""
    out: dict[str, Any] = {}
    for role in sorted(single):
        dice = dice_per_class(confusion(single[role], fused, len(class_names)))
        out[role] = {"structures": dict(zip(class_names[1:], dice, strict=True)),
                     "mean_dice": _or_zero(mean_defined(dice))}
    return out


def _or_zero(value: float | None) -> float:
    """A case where no structure was found by either side agrees on nothing: 0."""
    return 0.0 if value is None else value
