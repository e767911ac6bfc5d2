"""Scoring the quality-control benchmark: each case's true Dice, AUROC of the QC score for
a failed case, flag rates per kind.

A case's true Dice is the mean over foreground classes of the Dice between `cmc segment`'s
labels and the truth, on a's grid; a class absent from both counts as 1 (nothing to find,
nothing found), so a head with no organ predicted scores 1 and one with organs predicted
scores below. A failed case is one whose Dice lies more than FAILURE_MARGIN below the
model's validation mean (recorded in the reference), or below ABSOLUTE_FAILURE. A
structure is judged the same way: an in-distribution case whose mean passes may still have
one organ below the threshold, and the anatomy flags (which name a structure) are meant to
find exactly that, so the flag rate is also reported over the cases with every structure
right, and the true Dice of the structures a flag named against the others'.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

FAILURE_MARGIN = 0.15
ABSOLUTE_FAILURE = 0.5


def fg_dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> list[float]:
    """Dice of each foreground class (1: absent from both)."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    scores = []
    for k in range(1, num_classes):
        p, t = pred == k, truth == k
        total = int(p.sum() + t.sum())
        scores.append(1.0 if total == 0 else 2.0 * int((p & t).sum()) / total)
    return scores


def mean_fg_dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    return float(np.mean(fg_dice(pred, truth, num_classes)))


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Area under the ROC curve of `scores` ranking the positives first (Mann-Whitney U,
    ties counted half); None when one class is empty."""
    pos = np.asarray(positive, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return None
    ranks = rankdata(np.asarray(scores, np.float64))
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def summarise(rows: Sequence[dict[str, Any]], validation_mean: float,
              ood_kinds: Sequence[str]) -> dict[str, Any]:
    """The benchmark's figures from per-case rows {kind, dice, score, flagged}."""
    threshold = validation_mean - FAILURE_MARGIN
    doubt = [1.0 - r["score"] for r in rows]  # high: QC doubts the case
    failed_rel = [r["dice"] < threshold for r in rows]
    failed_abs = [r["dice"] < ABSOLUTE_FAILURE for r in rows]
    kinds: dict[str, Any] = {}
    for kind in sorted({r["kind"] for r in rows}):
        mine = [r for r in rows if r["kind"] == kind]
        kinds[kind] = {"cases": len(mine),
                       "flagged": sum(r["flagged"] for r in mine),
                       "failed": sum(r["dice"] < threshold for r in mine),
                       "mean_dice": round(float(np.mean([r["dice"] for r in mine])), 4),
                       "mean_score": round(float(np.mean([r["score"] for r in mine])), 4)}
    clean = [r for r in rows if r["kind"] == "in_distribution"]
    ood = [r for r in rows if r["kind"] in ood_kinds]
    flagged = [r["flagged"] for r in rows]
    return {
        "validation_mean_dice": round(validation_mean, 4),
        "failure_threshold": round(threshold, 4),
        "cases": len(rows), "failed": sum(failed_rel), "failed_absolute": sum(failed_abs),
        "auroc_failed": auroc(doubt, failed_rel),
        "auroc_dice_below_0.5": auroc(doubt, failed_abs),
        "flagged_in_distribution": _share(clean),
        "flagged_in_distribution_not_failed": _share([r for r in clean
                                                      if r["dice"] >= threshold]),
        "flagged_in_distribution_every_structure_right": _share(
            [r for r in clean if _every_structure_right(r, threshold)]),
        "structures_in_distribution": _structure_dice(clean),
        "flagged_ood": _share(ood),
        "flagged_among_failed": _share([r for r, f in zip(rows, failed_rel, strict=True) if f]),
        "flagged_among_not_failed": _share([r for r, f in zip(rows, failed_rel, strict=True)
                                            if not f]),
        "flagged_total": sum(flagged),
        "kinds": kinds,
    }


def _every_structure_right(row: dict[str, Any], threshold: float) -> bool:
    """No structure of the case below the failure threshold (a case whose mean passes can
    still have one organ wrong, which is what the anatomy flags are for)."""
    return min(row.get("structure_dice", {}).values(), default=row["dice"]) >= threshold


def _structure_dice(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """True Dice of the structures a flag named against the others', over `rows`."""
    named = [d for r in rows for name, d in r.get("structure_dice", {}).items()
             if name in r.get("flagged_structures", ())]
    other = [d for r in rows for name, d in r.get("structure_dice", {}).items()
             if name not in r.get("flagged_structures", ())]

    def median(values: list[float]) -> float | None:
        return round(float(np.median(values)), 4) if values else None

    return {"flagged": len(named), "flagged_median_dice": median(named),
            "others": len(other), "others_median_dice": median(other)}


def _share(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    flagged = sum(r["flagged"] for r in rows)
    return {"flagged": flagged, "cases": len(rows),
            "share": round(flagged / len(rows), 4) if rows else None}
