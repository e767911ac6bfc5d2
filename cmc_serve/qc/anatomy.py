"""Anatomy: is the answer shaped like the anatomy in the training labels?

`measure_labels` runs on a label map with its voxel -> RAS mm affine: at training on every
labelled volume (`cmc_train.qc_reference` summarises them, export carries the summary into
cmc.json), at segment time on the final labels. Per structure: volume (ml), the number of
connected components that hold at least 2 % of it (specks do not count), the centroid in
patient (RAS) coordinates, and how much of it lies on the grid's outer layer (`cut_share`:
border voxels over volume^(2/3), about 1.2 for a sphere cut through its middle, 0 for one
inside), which is how a structure cut off by the field of view shows.

Left/right pairs are found by name (`kidney_r` / `kidney_l`, `left_x` / `right_x`, ...)
and kept, with the order every training label has them in, only when all agree: in
patient coordinates the right organ lies at lower RAS x than the left, and a case the
other way round (a flipped image, a mirrored affine) is flagged. The order is taken from
the labels rather than assumed, so a dataset with its own convention (the synthetic
phantom draws the liver and kidney_r at +x) is judged by that convention; a model without
a training reference is judged by the anatomical one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from cmc_serve.qc.flags import QcFlag, value_range
from cmc_serve.volume import count_labels

MIN_COMPONENT_SHARE = 0.02
# Tolerances around the training range: a volume may reach 1.5x beyond it (or half the
# training range's own log spread, whichever is larger); a structure may have one more
# component than any training label had; cut_share may exceed the training maximum by 0.1
# and is never flagged below 0.2.
VOLUME_FACTOR = 1.5
EXTRA_COMPONENTS = 1
CUT_MARGIN = 0.1
CUT_FLOOR = 0.2
_SIDE = re.compile(r"^(?:(?P<pre>right|left|r|l)[_ -])?(?P<body>.+?)"
                   r"(?:[_ -](?P<post>right|left|r|l))?$", re.IGNORECASE)


def lateral_pairs(class_names: Sequence[str]) -> list[tuple[str, str]]:
    """(right, left) class-name pairs that differ only in a side word or letter."""
    sides: dict[str, dict[str, str]] = {}
    for name in class_names[1:]:
        match = _SIDE.match(name)
        side = match and (match["pre"] or match["post"])
        if match and side:
            sides.setdefault(match["body"].lower(), {})[side[0].lower()] = name
    return [(pair["r"], pair["l"]) for pair in sides.values() if set(pair) == {"r", "l"}]


def _mean_index(mask: np.ndarray, axis: int) -> float:
    """The mean index along `axis` of a mask's voxels, from its per-index counts (exact
    integer sums, as the mean of np.nonzero's indices, without their 24 bytes per voxel)."""
    counts = mask.sum(axis=tuple(a for a in range(mask.ndim) if a != axis), dtype=np.int64)
    return int(np.arange(mask.shape[axis]) @ counts) / int(counts.sum())


def measure_labels(labels: np.ndarray, affine: np.ndarray,
                   class_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per foreground structure: volume_ml, components, centroid_ras (None if absent) and
    cut_share."""
    aff = np.asarray(affine, np.float64)
    voxel_ml = abs(float(np.linalg.det(aff[:3, :3]))) / 1000.0
    border = np.zeros(labels.shape, bool)
    for axis in range(3):
        index: list[Any] = [slice(None)] * 3
        index[axis] = [0, labels.shape[axis] - 1]
        border[tuple(index)] = True
    out: dict[str, dict[str, Any]] = {}
    objects = ndimage.find_objects(labels, max_label=len(class_names) - 1)  # no int32 copy
    for k, name in enumerate(class_names[1:], start=1):
        box = objects[k - 1]
        if box is None:
            out[name] = {"volume_ml": 0.0, "components": 0, "centroid_ras": None,
                         "cut_share": 0.0}
            continue
        mask = labels[box] == k
        count = int(mask.sum())
        components, n = ndimage.label(mask)
        sizes = count_labels(components, n + 1)[1:]  # chunked: no int64 copy of the box
        kept = int(np.sum(sizes >= MIN_COMPONENT_SHARE * count)) if n else 0
        centre = np.array([_mean_index(mask, axis) + sl.start for axis, sl in enumerate(box)])
        centroid = aff[:3, :3] @ centre + aff[:3, 3]
        on_border = int(np.sum(mask & border[box]))
        out[name] = {"volume_ml": round(count * voxel_ml, 3), "components": kept,
                     "centroid_ras": [round(float(c), 2) for c in centroid],
                     "cut_share": round(on_border / count ** (2.0 / 3.0), 4)}
    return out


def summarise(measures: Sequence[Mapping[str, Mapping[str, Any]]],
              class_names: Sequence[str]) -> dict[str, Any]:
    """The training labels' anatomy: per structure the volume range, the most components,
    the largest cut_share and the share of labels that have it; the left/right pairs every
    label orders correctly."""
    if not measures:
        raise ValueError("no training labels to summarise")
    structures: dict[str, Any] = {}
    for name in class_names[1:]:
        rows = [m[name] for m in measures]
        present = [r for r in rows if r["volume_ml"] > 0]
        volumes = [r["volume_ml"] for r in present] or [0.0]
        structures[name] = {
            "present_share": len(present) / len(rows),
            "volume_ml": {"min": float(min(volumes)), "median": float(np.median(volumes)),
                          "max": float(max(volumes))},
            "components_max": int(max(r["components"] for r in rows)),
            "cut_share_max": float(max(r["cut_share"] for r in rows)),
        }
    pairs = []
    for right, left in lateral_pairs(class_names):
        seen = {_ordered(m, (right, left)) for m in measures} - {None}
        if len(seen) == 1:
            pairs.append({"right": right, "left": left, "right_at_lower_x": seen.pop()})
    return {"labels": len(measures), "structures": structures, "lateral_pairs": pairs}


def anatomical_pairs(class_names: Sequence[str]) -> list[dict[str, Any]]:
    """The pairs by name in patient order (right at lower RAS x), for a model whose
    training labels were not recorded."""
    return [{"right": r, "left": lt, "right_at_lower_x": True}
            for r, lt in lateral_pairs(class_names)]


def _ordered(measure: Mapping[str, Mapping[str, Any]], pair: Sequence[str]) -> bool | None:
    """Whether the right structure lies at lower RAS x than the left (None: one absent)."""
    right, left = (measure[name]["centroid_ras"] for name in pair)
    if right is None or left is None:
        return None
    return bool(right[0] < left[0])


def check_anatomy(measure: Mapping[str, Mapping[str, Any]], reference: Mapping[str, Any]
                  ) -> tuple[list[QcFlag], dict[str, float]]:
    """Compare a case's label measures with the training anatomy. Returns the flags and,
    per structure, the largest normalised excess (0: as in training; above 1: flagged).
    A structure whose reference has no `volume_ml` / `components_max` (a model without a
    training reference) is checked for the field-of-view cut only."""
    flags: list[QcFlag] = []
    excess: dict[str, float] = {}
    for name, ref in reference["structures"].items():
        got = measure.get(name)
        if got is None:
            continue
        worst = 0.0
        volume = float(got["volume_ml"])
        if volume <= 0.0:
            if ref["present_share"] >= 1.0:
                worst = 2.0
                flags.append(QcFlag("structure_missing", f"{name}: not found, present in "
                                    "every training label", structure=name,
                                    values={"volume_ml": 0.0}))
        else:
            if ref.get("volume_ml") is not None:
                worst = max(worst, _volume_check(name, volume, ref["volume_ml"], flags))
            limit = (ref["components_max"] + EXTRA_COMPONENTS
                     if ref.get("components_max") is not None else None)
            if limit is not None and got["components"] > limit:
                worst = max(worst, got["components"] / limit)
                flags.append(QcFlag("fragmented", f"{name}: {got['components']} pieces, "
                                    f"training at most {ref['components_max']}", structure=name,
                                    values={"components": got["components"],
                                            "training_max": ref["components_max"]}))
            cut_limit = max(CUT_FLOOR, ref["cut_share_max"] + CUT_MARGIN)
            worst = max(worst, got["cut_share"] / cut_limit)
            if got["cut_share"] > cut_limit:
                flags.append(QcFlag("fov_cut", f"{name}: cut off by the field of view "
                                    f"(cut share {got['cut_share']:.2f}, training at most "
                                    f"{ref['cut_share_max']:.2f})", structure=name,
                                    values={"cut_share": got["cut_share"],
                                            "training_max": ref["cut_share_max"]}))
        excess[name] = worst
    for pair in reference.get("lateral_pairs", []):
        right, left = pair["right"], pair["left"]
        if right not in measure or left not in measure:
            continue
        order = _ordered(measure, (right, left))
        if order is None or order == pair["right_at_lower_x"]:
            continue
        rx, lx = measure[right]["centroid_ras"][0], measure[left]["centroid_ras"][0]
        for name in (right, left):
            excess[name] = max(excess.get(name, 0.0), 2.0)
        expected = "lower" if pair["right_at_lower_x"] else "higher"
        flags.append(QcFlag("left_right", f"{right} at RAS x {rx:.0f} mm, {left} at {lx:.0f} "
                            f"mm: left/right swapped ({right} expected at {expected} x)",
                            structure=right,
                            values={"right_x": rx, "left_x": lx}))
    return flags, excess


def _volume_check(name: str, volume: float, stats: Mapping[str, float],
                  flags: list[QcFlag]) -> float:
    """Volume against the training range in log space; appends a flag when outside."""
    low, high = math.log(max(stats["min"], 1e-6)), math.log(max(stats["max"], 1e-6))
    tol = max(math.log(VOLUME_FACTOR), 0.5 * (high - low))
    value = math.log(volume)
    excess = max(0.0, low - value, value - high) / tol
    if excess > 1.0:
        flags.append(QcFlag("volume_out_of_range", f"{name}: {volume:.0f} ml, training "
                            f"{value_range(stats['min'], stats['max'])} ml", structure=name,
                            values={"volume_ml": round(volume, 2), "training_min": stats["min"],
                                    "training_max": stats["max"]}))
    return excess
