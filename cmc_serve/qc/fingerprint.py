"""Input fingerprint: does an image look like the images the model was trained on?

One measuring function (`measure_image`) runs on the raw image (its own units, its own
grid) both at training, over every training image of a modality (`cmc_train.qc_reference`
summarises them into the checkpoint, export carries them into cmc.json), and at segment
time on each input. It is deliberately modality-blind (no "this is CT" assumption in the
measuring), so that an MR given in CT's role is measured as what it is and can be found to
match the other role's fingerprint better.

Foreground: voxels above 10 % of the way from the image's minimum to its 99.5th
percentile (air and the zero padding of MR lie below, body tissue above, in HU and in MR
units alike). Measured: the foreground's intensity percentiles, the spacing and field of
view along each RAS axis, and the extent of the foreground (the body) along each RAS axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cmc_serve.qc.flags import QcFlag, value_range

PERCENTILES = (5, 25, 50, 75, 95)
INTENSITY_KEYS = tuple(f"p{p}" for p in PERCENTILES)
AXES = ("R", "A", "S")
_FOREGROUND_FRACTION = 0.1
_MAX_SAMPLES = 2_000_000  # percentiles of a strided sample: the same numbers, bounded time
_SLAB_VOXELS = 1 << 22  # voxels compared with the foreground threshold at once

# Tolerances around the training range, chosen to keep every training image inside with
# room for scanners the few labelled cases did not show: intensity by a quarter of the
# training foreground's spread (p95 - p5), geometry by a share of the training value.
INTENSITY_TOLERANCE = 0.25
SPACING_FACTOR = 2.0  # resampling absorbs spacing; only a gross mismatch is named
FOV_TOLERANCE = 0.2
EXTENT_TOLERANCE = 0.25
# A role's profile is "the other modality's" when its shape lies this much closer to the
# other modality's typical shape than to its own (and at least this far from its own).
ROLE_MARGIN = 0.15


def ras_axis_geometry(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(spacing_mm, fov_mm) along R, A, S: each voxel axis is attributed to the RAS axis its
    direction is closest to, so an image stored LPS or sagittally reads like any other."""
    cols = np.asarray(affine, np.float64)[:3, :3]
    spacing, fov = np.zeros(3), np.zeros(3)
    for axis in range(3):
        ras = int(np.argmax(np.abs(cols[:, axis])))
        size = float(np.linalg.norm(cols[:, axis]))
        spacing[ras], fov[ras] = size, size * int(shape[axis])
    return spacing, fov


def measure_image(array: np.ndarray, affine: np.ndarray) -> dict[str, Any]:
    """The fingerprint of one raw image: intensity percentiles of its foreground, spacing,
    field of view and body extent (mm) along R, A, S."""
    data = np.asarray(array)
    flat = data.ravel()
    sample = flat[:: max(1, flat.size // _MAX_SAMPLES)].astype(np.float64)
    sample = sample[np.isfinite(sample)]
    low, high = (np.percentile(sample, [0, 99.5]) if sample.size else (0.0, 0.0))
    threshold = low + _FOREGROUND_FRACTION * (high - low)
    foreground = sample[sample > threshold]
    values = foreground if foreground.size else sample
    intensity = dict(zip(INTENSITY_KEYS, (float(v) for v in np.percentile(
        values, PERCENTILES)) if values.size else [0.0] * len(PERCENTILES), strict=True))
    spacing, fov = ras_axis_geometry(affine, data.shape)
    extent = np.zeros(3)
    above = _above_per_axis(data, threshold)
    if above[0].any():
        for axis in range(3):
            hit = np.flatnonzero(above[axis])
            ras = int(np.argmax(np.abs(np.asarray(affine)[:3, axis])))
            extent[ras] = (hit[-1] - hit[0] + 1) * spacing[ras]
    return {"intensity": intensity, "spacing_mm": _rounded(spacing), "fov_mm": _rounded(fov),
            "body_extent_mm": _rounded(extent)}


SHAPE_KEYS = ("p5", "p25", "p75", "p95")


def relative_profile(intensity: Mapping[str, float]) -> dict[str, float]:
    """Each outer percentile's distance from the median in units of the p5-p95 spread:
    what a modality normalised by a z-score (any scale, any offset) is judged by."""
    spread = max(intensity["p95"] - intensity["p5"], 1e-6)
    return {k: (intensity[k] - intensity["p50"]) / spread for k in SHAPE_KEYS}


def _above_per_axis(data: np.ndarray, threshold: float) -> list[np.ndarray]:
    """Per axis, which indices have a voxel above `threshold`, from the first axis's slabs
    (a volume-sized mask would be 1 byte per voxel on top of the image)."""
    above = [np.zeros(n, dtype=bool) for n in data.shape]
    step = max(1, _SLAB_VOXELS // max(1, data[:1].size))
    for start in range(0, data.shape[0], step):
        mask = data[start:start + step] > threshold
        above[0][start:start + step] = mask.any(axis=(1, 2))
        above[1] |= mask.any(axis=(0, 2))
        above[2] |= mask.any(axis=(0, 1))
    return above


def summarise(measures: Sequence[Mapping[str, Any]], scale_invariant: bool = False
              ) -> dict[str, Any]:
    """The training side's record of one modality: per measured number its min, median and
    max over the training images (and how many there were). `scale_invariant`: the model
    normalises this modality by a z-score, so its intensities are judged by their relative
    profile (`relative_profile`) rather than their values."""
    if not measures:
        raise ValueError("no training images to fingerprint")

    def stats(values: Sequence[float]) -> dict[str, float]:
        arr = np.asarray(values, np.float64)
        return {"min": float(arr.min()), "median": float(np.median(arr)),
                "max": float(arr.max())}

    shapes = [relative_profile(m["intensity"]) for m in measures]
    return {
        "images": len(measures), "scale_invariant": scale_invariant,
        "intensity": {k: stats([m["intensity"][k] for m in measures]) for k in INTENSITY_KEYS},
        "relative": {k: stats([s[k] for s in shapes]) for k in SHAPE_KEYS},
        **{key: [stats([m[key][i] for m in measures]) for i in range(3)]
           for key in ("spacing_mm", "fov_mm", "body_extent_mm")},
    }


def _spread(fingerprint: Mapping[str, Any]) -> float:
    """The training foreground's intensity spread (median p95 - median p5), at least 1."""
    intensity = fingerprint["intensity"]
    return max(1.0, intensity["p95"]["median"] - intensity["p5"]["median"])


def profile_shape(intensity: Mapping[str, float]) -> np.ndarray:
    """The shape of an intensity profile, blind to the scale: each percentile's distance
    from the median and the median itself, in units of the p5-p95 spread. A CT's
    foreground is skewed towards fat (long low tail, values around 0), an MR's towards
    bright fluid; an MR of another scanner (any scale) keeps its shape."""
    spread = max(intensity["p95"] - intensity["p5"], 1e-6)
    return np.array([(intensity[k] - intensity["p50"]) / spread
                     for k in INTENSITY_KEYS if k != "p50"] + [intensity["p50"] / spread])


def profile_distance(measure: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> float:
    """Mean absolute difference between an image's profile shape and that of a modality's
    typical training image (its median percentiles); 0: the same shape."""
    typical = {k: fingerprint["intensity"][k]["median"] for k in INTENSITY_KEYS}
    return float(np.mean(np.abs(profile_shape(measure["intensity"]) - profile_shape(typical))))


def _excess(value: float, stats: Mapping[str, float], tolerance: float) -> float:
    """0 inside [min, max]; beyond it, the distance in units of `tolerance` (1: at the
    flagging edge)."""
    below, above = stats["min"] - value, value - stats["max"]
    return max(0.0, below, above) / max(tolerance, 1e-9)


def check_role(role: str, measure: Mapping[str, Any], modality: str,
               fingerprints: Mapping[str, Mapping[str, Any]]) -> tuple[list[QcFlag], float]:
    """Compare one input with its role's training fingerprint. Returns the flags and the
    largest normalised excess (0: all inside; above 1: flagged)."""
    own = fingerprints.get(modality)
    if own is None:
        return [], 0.0
    flags: list[QcFlag] = []
    if own.get("scale_invariant") and "relative" in own:
        worst = _check_relative(role, measure, modality, own, flags)
    else:
        worst = _check_absolute(role, measure, own, flags)
    role_flag, role_excess = _wrong_role(role, measure, modality, fingerprints)
    worst = max(worst, role_excess)
    flags += role_flag
    for key, code, what, tolerance in (
            ("spacing_mm", "spacing_out_of_range", "spacing", None),
            ("fov_mm", "fov_out_of_range", "field of view", FOV_TOLERANCE),
            ("body_extent_mm", "body_extent_out_of_range", "body extent", EXTENT_TOLERANCE)):
        for axis, name in enumerate(AXES):
            value = float(measure[key][axis])
            stats = own[key][axis]
            if tolerance is None:  # spacing: a factor either way
                excess = max(stats["min"] / max(value, 1e-9), value / max(stats["max"], 1e-9))
                excess = max(0.0, np.log(excess) / np.log(SPACING_FACTOR))
            else:
                excess = _excess(value, stats, tolerance * max(stats["median"], 1.0))
            worst = max(worst, excess)
            if excess > 1.0:
                flags.append(QcFlag(
                    code, f"{role}: {what} {value:.0f} mm ({name}), training "
                    f"{value_range(stats['min'], stats['max'])} mm",
                    role=role, values={"axis": name, "value": round(value, 2),
                                       "training_min": stats["min"],
                                       "training_max": stats["max"]}))
    return flags, worst


def _check_absolute(role: str, measure: Mapping[str, Any], own: Mapping[str, Any],
                    flags: list[QcFlag]) -> float:
    """Percentiles in the modality's own units (a CT in HU) against the training range,
    tolerance a quarter of the training foreground's spread."""
    worst = 0.0
    tol = INTENSITY_TOLERANCE * _spread(own)
    for key in INTENSITY_KEYS:
        value = measure["intensity"][key]
        stats = own["intensity"][key]
        excess = _excess(value, stats, tol)
        worst = max(worst, excess)
        if excess > 1.0:
            flags.append(QcFlag(
                "intensity_out_of_range",
                f"{role}: intensity {key} {value:.0f}, training "
                f"{value_range(stats['min'], stats['max'])}",
                role=role, values={"percentile": key, "value": round(value, 2),
                                   "training_min": stats["min"], "training_max": stats["max"]}))
    return worst


def _check_relative(role: str, measure: Mapping[str, Any], modality: str,
                    own: Mapping[str, Any], flags: list[QcFlag]) -> float:
    """A z-scored modality's profile (scale and offset ignored) against the training
    range, tolerance a quarter of the spread (the absolute rule's, in relative units)."""
    worst = 0.0
    shape = relative_profile(measure["intensity"])
    for key in SHAPE_KEYS:
        stats = own["relative"][key]
        excess = _excess(shape[key], stats, INTENSITY_TOLERANCE)
        worst = max(worst, excess)
        if excess > 1.0:
            flags.append(QcFlag(
                "intensity_out_of_range",
                f"{role}: intensity {key} {shape[key]:+.2f} of the p5-p95 spread from p50, "
                f"training {stats['min']:+.2f} to {stats['max']:+.2f} ({modality} is z-scored:"
                " scale ignored)",
                role=role, values={"percentile": key, "relative": round(shape[key], 4),
                                   "training_min": stats["min"], "training_max": stats["max"]}))
    return worst


def _wrong_role(role: str, measure: Mapping[str, Any], modality: str,
                fingerprints: Mapping[str, Mapping[str, Any]]) -> tuple[list[QcFlag], float]:
    """An input whose intensity profile matches another modality's training images better
    than its own role's: given in the wrong role (MR as CT, or the two swapped)."""
    own = profile_distance(measure, fingerprints[modality])
    others = {m: profile_distance(measure, fp) for m, fp in fingerprints.items() if m != modality}
    if not others:
        return [], 0.0
    other, distance = min(others.items(), key=lambda item: item[1])
    # How much closer the other modality is, in units of ROLE_MARGIN; counted only when
    # the image is no typical image of its own role and a typical one of the other's. A
    # noisy or rescaled image drifts away from both (0.3-0.36 from the other modality in
    # the QC benchmark, against 0.003-0.031 for swapped roles): its intensity flags say
    # what is wrong, a wrong role would be a misleading second reason.
    plausible = own > ROLE_MARGIN and distance <= ROLE_MARGIN
    excess = max(0.0, own - distance) / ROLE_MARGIN if plausible else 0.0
    if excess <= 1.0:
        return [], excess
    return [QcFlag(
        "modality_role",
        f"{role}: looks like {other}, not {modality} (intensity p50 "
        f"{measure['intensity']['p50']:.0f}; training {modality} "
        f"{fingerprints[modality]['intensity']['p50']['median']:.0f}, {other} "
        f"{fingerprints[other]['intensity']['p50']['median']:.0f})",
        role=role, values={"expected": modality, "closer_to": other,
                           "distance_own": round(own, 3), "distance_other": round(distance, 3)},
    )], excess


def _rounded(values: np.ndarray) -> list[float]:
    return [round(float(v), 3) for v in values]
