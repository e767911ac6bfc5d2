"""One verdict per case: every signal judged against the training reference, combined.

`assess_case(reference, inputs)` measures the case (branch agreement, the cross-modal
opinion when given, each input's fingerprint, the answer's anatomy) and judges each number
against what the model directory recorded about its training (`ModelInfo.qc_reference`,
written by `cmc_train.qc_reference`, docs/QC.md):

- agreement signals (the decoders' mean foreground Dice, each structure's Dice, the
  cross-modal Dice) against the same numbers on the held-out cases (the validation split and
  the datalist's calibration split), as an excess below their mean in units of
  (mean - floor). The floor is the mean minus FLOOR_SIGMAS sample standard deviations, and
  at least FLOOR_GAP below the lowest held-out case, so that no held-out case sits at the
  floor; the held-out data set the numbers, not a constant.
- range checks (fingerprint, anatomy) report a normalised excess (0 inside the range of
  the training images and labels, widened to the model's answers on the held-out cases;
  1 at the tolerance edge).
- an excess maps to a score by `excess_score`: 1 at 0, 0.5 at the edge, 0.5 / excess
  beyond it.

The case's score is the answer's agreement: the score of the decoders' mean agreement
(and of the cross-modal agreement, the lower, with `--qc full`), which measures the answer
itself and ranks cases by how likely they fail. A case is flagged when any check passes
its edge, each such check one flag: the agreement itself, the fingerprint (an input unlike
the training images), the anatomy. A flag on the answer (agreement, anatomy) multiplies
the score by FLAGGED_FACTOR, so such a case scores below 0.5 and below every case without
one, and those cases keep the order of their agreement. A structure's score is the lowest
of its anatomy and its decoders' agreement (too rough to flag with few held-out cases,
`_judge_branches`). The fused margin is reported in `signals` (its validation numbers
are in the reference) but neither flags nor scores.

A flag on the input alone leaves the score to the answer. An input unlike the training
images (noise, a scanner's other scale) is worth a look whether or not the model still
copes, but how far outside the range it lies says little about how wrong the answer is,
which the decoders' agreement measures; where they agree as on the held-out cases the
answer is more often right than one whose anatomy is off (docs/QC.md has the benchmark
runs behind both choices).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from cmc_serve.qc import anatomy, branches, fingerprint
from cmc_serve.qc.flags import CaseQc, QcFlag
from cmc_serve.qc.inputs import QcInputs

REFERENCE_VERSION = 1
FLOOR_SIGMAS = 3.0
FLOOR_GAP = 0.05
FLAGGED_FACTOR = 0.499
_MISSING = ("missing: the model directory records no training reference (exported before "
            "quality control); only the checks that need no training data ran")


def excess_score(excess: float) -> float:
    """Map a normalised excess (0: as in training, 1: at the flagging edge) to (0, 1]:
    1 - excess / 2 up to the edge (0.5), 0.5 / excess beyond it, so that cases past the
    edge are still ranked by how far past they are."""
    return float(1.0 - 0.5 * excess) if excess <= 1.0 else float(0.5 / excess)


def calibrated_floor(stats: Mapping[str, float]) -> float:
    """The lowest value still in keeping with the held-out cases (module docstring)."""
    return min(stats["mean"] - FLOOR_SIGMAS * stats["std"], stats["min"] - FLOOR_GAP)


def low_excess(value: float, stats: Mapping[str, float]) -> float:
    """How far below the held-out mean a value lies, in units of mean - floor."""
    span = max(stats["mean"] - calibrated_floor(stats), 1e-6)
    return max(0.0, (stats["mean"] - value) / span)


def assess_case(reference: Mapping[str, Any] | None, inputs: QcInputs) -> CaseQc:
    """The verdict on one segmented case (module docstring); `reference` None: the model
    records no training reference, which `signals["reference"]` says."""
    flags: list[QcFlag] = []
    agreement_excess: list[float] = [0.0]
    structure_excess: dict[str, float] = {name: 0.0 for name in inputs.class_names[1:]}
    signals: dict[str, Any] = {"reference": "present" if reference else _MISSING}
    calibration = (reference or {}).get("calibration")
    if reference and not calibration:
        signals["calibration"] = "missing: trained without held-out cases of both modalities"

    if inputs.branches is not None:
        agreement = branches.branch_agreement(inputs.branches, inputs.class_names)
        signals["branches"] = _rounded(agreement)
        if calibration:
            agreement_excess += _judge_branches(agreement, calibration, flags,
                                                structure_excess)
    if inputs.single_modality:
        cross = branches.cross_modal_agreement(inputs.single_modality, inputs.labels,
                                               inputs.class_names)
        signals["cross_modal"] = _rounded(cross)
        if calibration:
            agreement_excess += _judge_cross(cross, calibration, flags)

    input_flags = 0  # how many of `flags` are on the input rather than the answer
    if reference and "fingerprint" in reference:
        measures = {}
        for role, image in sorted(inputs.images.items()):
            measure = fingerprint.measure_image(image.array, image.affine)
            measures[role] = measure
            found, worst = fingerprint.check_role(role, measure, image.modality,
                                                  reference["fingerprint"])
            flags += found
            input_flags += len(found)
            signals.setdefault("fingerprint_excess", {})[role] = round(worst, 4)
        signals["fingerprint"] = measures

    measure = anatomy.measure_labels(inputs.labels, inputs.affine, inputs.class_names)
    signals["anatomy"] = measure
    anatomy_reference = (_widened_anatomy(reference) if reference and "anatomy" in reference
                         else _name_only_anatomy(inputs))
    found, per_structure = anatomy.check_anatomy(measure, anatomy_reference)
    flags += found
    for name, value in per_structure.items():
        structure_excess[name] = max(structure_excess.get(name, 0.0), value)

    structures = {name: excess_score(v) for name, v in structure_excess.items()}
    score = excess_score(max(agreement_excess))
    if len(flags) > input_flags:  # a doubtful answer below every other, still in order
        score *= FLAGGED_FACTOR
    return CaseQc(score=score, flagged=bool(flags), flags=tuple(flags),
                  structures=structures, signals=signals)


def _judge_branches(agreement: Mapping[str, Any], calibration: Mapping[str, Any],
                    flags: list[QcFlag], structure_excess: dict[str, float]) -> list[float]:
    """Branch agreement against the held-out cases; returns the case-level excesses.

    Only the case's mean agreement flags and sets the case score: it is the one number
    the held-out cases estimate well enough. Each structure's agreement sets that
    structure's score and the fused margin is reported in `signals`, but neither flags:
    with a handful of held-out cases their floors are rough, and one of K rough
    per-structure floors is crossed by chance far more often than one."""
    stats = calibration["signals"]
    value = agreement.get("mean_dice")
    if value is None or "mean_dice" not in stats:
        return []
    excess = low_excess(value, stats["mean_dice"])
    if excess > 1.0:
        flags.append(_low_flag("branch_disagreement", "the two branches agree", value,
                               stats["mean_dice"]))
    for name, row in agreement["structures"].items():
        ref = calibration.get("structures", {}).get(name, {}).get("dice")
        if ref is not None and row["dice"] is not None:
            structure_excess[name] = max(structure_excess.get(name, 0.0),
                                         low_excess(row["dice"], ref))
    return [excess]


def _judge_cross(cross: Mapping[str, Any], calibration: Mapping[str, Any],
                 flags: list[QcFlag]) -> list[float]:
    """Each single-modality answer against the fused one, judged by the held-out cases."""
    out: list[float] = []
    for role, row in cross.items():
        stats = calibration["signals"].get(f"cross_{role}")
        if stats is None:
            continue
        excess = low_excess(row["mean_dice"], stats)
        out.append(excess)
        if excess > 1.0:
            flags.append(_low_flag("cross_modal_disagreement", f"{role} alone agrees with fused",
                                   row["mean_dice"], stats, role=role))
    return out


def _low_flag(code: str, what: str, value: float, stats: Mapping[str, float],
              structure: str | None = None, role: str | None = None) -> QcFlag:
    floor = calibrated_floor(stats)
    return QcFlag(code, f"{what} {value:.2f}, held-out cases {stats['mean']:.2f} "
                  f"(floor {floor:.2f})", structure=structure, role=role,
                  values={"value": round(value, 4), "validation_mean": stats["mean"],
                          "validation_std": stats["std"], "floor": round(floor, 4)})


def _widened_anatomy(reference: Mapping[str, Any]) -> dict[str, Any]:
    """The training labels' anatomy, each range widened to take in the model's own answers
    on the held-out cases (calibration's `anatomy`): what the model does on every case is
    no reason to doubt one, so no held-out case is flagged by construction."""
    train = reference["anatomy"]
    seen = (reference.get("calibration") or {}).get("anatomy")
    if not seen:
        return dict(train)
    structures = {}
    for name, ref in train["structures"].items():
        val = seen["structures"].get(name)
        if val is None:
            structures[name] = ref
            continue
        volume = {"min": min(ref["volume_ml"]["min"], val["volume_ml"]["min"] or np.inf),
                  "median": ref["volume_ml"]["median"],
                  "max": max(ref["volume_ml"]["max"], val["volume_ml"]["max"])}
        structures[name] = {**ref, "volume_ml": volume,
                            "present_share": min(ref["present_share"], val["present_share"]),
                            "components_max": max(ref["components_max"], val["components_max"]),
                            "cut_share_max": max(ref["cut_share_max"], val["cut_share_max"])}
    return {**train, "structures": structures}


def _name_only_anatomy(inputs: QcInputs) -> dict[str, Any]:
    """Without a training reference: the checks that need none (left/right order by the
    class names, a structure cut by the field of view judged by CUT_FLOOR alone)."""
    return {"structures": {name: {"present_share": 0.0, "volume_ml": None,
                                  "components_max": None, "cut_share_max": 0.0}
                           for name in inputs.class_names[1:]},
            "lateral_pairs": anatomy.anatomical_pairs(inputs.class_names)}


def _rounded(value: Any) -> Any:
    """JSON-ready copy with floats to 4 decimals."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, Mapping):
        return {k: _rounded(v) for k, v in value.items()}
    return value
