"""Quality-control signals on phantom cases: every flag fires on the failure it names and
stays quiet on a clean case and on a mild variant of its failure.

The reference is measured from phantom subjects with the same functions training uses
(`cmc_serve.qc.fingerprint` / `anatomy`); the branch calibration is a validation record
written out, as `cmc_train.qc_reference.calibrate` stores it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from cmc_serve.qc import anatomy, fingerprint
from cmc_serve.qc.flags import review_text, score_text, value_range
from cmc_serve.qc.inputs import BranchOutputs, QcInputs, RoleImage
from cmc_serve.qc.verdict import assess_case, calibrated_floor
from cmc_train.synth.phantom import CLASSES, PhantomPair, make_pair

SIZE = 32


def _stats(mean: float, std: float) -> dict[str, float]:
    return {"mean": mean, "std": std, "min": mean - 2 * std, "max": mean + 2 * std}


CALIBRATION = {
    "cases": 4, "validation_mean_dice": 0.8,
    "signals": {"mean_dice": _stats(0.85, 0.03), "mean_margin": _stats(0.8, 0.03),
                "cross_a": _stats(0.85, 0.03), "cross_b": _stats(0.85, 0.03)},
    "structures": {name: {"dice": _stats(0.85, 0.03)} for name in CLASSES[1:]},
}


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    pairs = [make_pair(np.random.default_rng(seed), size=SIZE) for seed in range(8)]
    return {
        "version": 1,
        "fingerprint": {
            "ct": fingerprint.summarise([fingerprint.measure_image(p.image_a, p.grid_a.affine)
                                         for p in pairs]),
            "mr": fingerprint.summarise([fingerprint.measure_image(p.image_b, p.grid_b.affine)
                                         for p in pairs], scale_invariant=True)},
        "anatomy": anatomy.summarise(
            [anatomy.measure_labels(p.label_a, p.grid_a.affine, CLASSES) for p in pairs]
            + [anatomy.measure_labels(p.label_b, p.grid_b.affine, CLASSES) for p in pairs],
            CLASSES),
        "calibration": CALIBRATION,
    }


@pytest.fixture(scope="module")
def case() -> PhantomPair:
    return make_pair(np.random.default_rng(100), size=SIZE)


def _branches(labels_a: np.ndarray, labels_b: np.ndarray, margin: float = 0.9) -> BranchOutputs:
    counts = np.bincount(labels_a.ravel(), minlength=len(CLASSES)).astype(np.float64)
    return BranchOutputs(labels_a=labels_a, labels_b=labels_b, margin_sum=counts * margin,
                         voxel_count=counts)


def _inputs(case: PhantomPair, **change: Any) -> QcInputs:
    """The clean case: CT in a, MR in b, the true labels as the answer, two branches that
    agree, single-modality answers equal to the fused one (the answer's, when `change`
    gives other labels)."""
    labels = change.get("labels", case.label_a)
    clean = QcInputs(
        class_names=CLASSES, mode="fused", labels=labels, affine=case.grid_a.affine,
        images={"a": RoleImage("ct", case.image_a, case.grid_a.affine),
                "b": RoleImage("mr", case.image_b, case.grid_b.affine)},
        branches=_branches(labels, labels),
        single_modality={"a": labels, "b": labels})
    return replace(clean, **change)


def _image(case: PhantomPair, role: str, array: np.ndarray | None = None,
           affine: np.ndarray | None = None, modality: str | None = None) -> dict[str, RoleImage]:
    images = dict(_inputs(case).images)
    old = images[role]
    images[role] = RoleImage(modality or old.modality,
                             old.array if array is None else array,
                             old.affine if affine is None else affine)
    return images


def _shifted(labels: np.ndarray, voxels: int) -> np.ndarray:
    return np.roll(labels, voxels, axis=1)


def _without(labels: np.ndarray, name: str) -> np.ndarray:
    out = labels.copy()
    out[out == CLASSES.index(name)] = 0
    return out


def _fragmented(labels: np.ndarray, name: str) -> np.ndarray:
    """Cut a structure into slabs with background planes every other voxel along S."""
    out = labels.copy()
    k = CLASSES.index(name)
    cut = np.zeros_like(out, bool)
    cut[:, :, ::2] = True
    out[(out == k) & cut] = 0
    return out


def _scaled_spacing(case: PhantomPair, factor: float) -> np.ndarray:
    affine = case.grid_a.affine.copy()
    affine[:3, :3] *= factor
    return affine


def _cut_liver(case: PhantomPair) -> tuple[np.ndarray, np.ndarray]:
    """Labels and affine of a field of view that ends in the middle of the liver (along
    R/L), as a truncated scan gives them."""
    labels = case.label_a
    centre = int(round(ndimage.center_of_mass(labels == CLASSES.index("liver"))[0]))
    affine = case.grid_a.affine.copy()
    if affine[0, 0] > 0:  # keep the voxels on the side away from the liver's centre
        return labels[:centre + 1], affine
    affine[:3, 3] = affine[:3, :3] @ np.array([centre, 0, 0]) + affine[:3, 3]
    return labels[centre:], affine


def _half_body(case: PhantomPair) -> np.ndarray:
    """The CT with everything outside a small central box replaced by air (same FOV)."""
    out = np.full_like(case.image_a, -1000)
    c = SIZE // 2
    box = (slice(c - 5, c + 5),) * 3
    out[box] = case.image_a[box]
    return out


# Each flag: a change that makes it fire, and a milder one of the same kind that must not.
FIRE: dict[str, Callable[[PhantomPair], dict[str, Any]]] = {
    "branch_disagreement": lambda c: {"branches": _branches(c.label_a, _shifted(c.label_a, 6))},
    "cross_modal_disagreement": lambda c: {
        "single_modality": {"a": c.label_a, "b": _shifted(c.label_a, 6)}},
    "intensity_out_of_range": lambda c: {
        "images": _image(c, "a", (c.image_a * 0.5).astype(np.int16))},
    "modality_role": lambda c: {"images": {
        "a": RoleImage("ct", c.image_b, c.grid_b.affine),
        "b": RoleImage("mr", c.image_a, c.grid_a.affine)}},
    "spacing_out_of_range": lambda c: {"images": _image(c, "a", affine=_scaled_spacing(c, 3.5))},
    "fov_out_of_range": lambda c: {"images": _image(c, "a", c.image_a[:, :, :12])},
    "body_extent_out_of_range": lambda c: {"images": _image(c, "a", _half_body(c))},
    "structure_missing": lambda c: {"labels": _without(c.label_a, "kidney_l")},
    "volume_out_of_range": lambda c: {"labels": np.where(
        ndimage.binary_dilation(c.label_a == 1, iterations=4) & (c.label_a == 0), 1, c.label_a
    ).astype(np.uint8)},
    "fragmented": lambda c: {"labels": _fragmented(c.label_a, "liver")},
    "fov_cut": lambda c: dict(zip(("labels", "affine"), _cut_liver(c), strict=True)),
    "left_right": lambda c: {"labels": c.label_a[::-1].copy()},
}
INPUT_CODES = {"intensity_out_of_range", "modality_role", "spacing_out_of_range",
               "fov_out_of_range", "body_extent_out_of_range"}  # the fingerprint's flags
QUIET: dict[str, Callable[[PhantomPair], dict[str, Any]]] = {
    "branch_disagreement": lambda c: {"branches": _branches(c.label_a, _shifted(c.label_a, 1))},
    "cross_modal_disagreement": lambda c: {
        "single_modality": {"a": c.label_a, "b": c.label_a}},
    "intensity_out_of_range": lambda c: {
        "images": _image(c, "a", (c.image_a + 5).astype(np.int16))},
    # An MR of another scanner (4x the scale) keeps its shape: out of range, not another role.
    "modality_role": lambda c: {"images": _image(c, "b", c.image_b.astype(np.float32) * 4)},
    "spacing_out_of_range": lambda c: {"images": _image(c, "a", affine=_scaled_spacing(c, 1.2))},
    "fov_out_of_range": lambda c: {"images": _image(c, "a", c.image_a[:, :, 1:])},
    "body_extent_out_of_range": lambda c: {"images": _image(c, "a", c.image_a[1:-1])},
    "structure_missing": lambda c: {"labels": c.label_a},
    "volume_out_of_range": lambda c: {"labels": np.where(
        ndimage.binary_dilation(c.label_a == 1) & (c.label_a == 0), 1, c.label_a
    ).astype(np.uint8)},
    "fragmented": lambda c: {"labels": c.label_a},
    "fov_cut": lambda c: {"labels": c.label_a},
    "left_right": lambda c: {"labels": c.label_a.copy()},
}


def test_clean_case_is_not_flagged(reference: dict[str, Any], case: PhantomPair) -> None:
    qc = assess_case(reference, _inputs(case))
    assert not qc.flags and not qc.flagged
    assert qc.score >= 0.5 and all(v >= 0.5 for v in qc.structures.values())
    assert set(qc.structures) == set(CLASSES[1:])
    assert qc.signals["reference"] == "present"


@pytest.mark.parametrize("code", sorted(FIRE))
def test_each_flag_fires_on_its_failure(code: str, reference: dict[str, Any],
                                        case: PhantomPair) -> None:
    qc = assess_case(reference, _inputs(case, **FIRE[code](case)))
    codes = [f.code for f in qc.flags]
    assert code in codes, [f.message for f in qc.flags]
    assert qc.flagged
    if code in INPUT_CODES:  # the input needs review; the score stays the answer's
        assert qc.score == assess_case(reference, _inputs(case)).score >= 0.5
    else:
        assert qc.score < 0.5
    flag = next(f for f in qc.flags if f.code == code)
    assert flag.message and flag.values
    assert review_text(qc.flags).startswith("needs review: ")
    if flag.structure is not None:
        assert qc.structures[flag.structure] < 0.5


@pytest.mark.parametrize("code", sorted(QUIET))
def test_each_flag_stays_quiet_on_a_mild_variant(code: str, reference: dict[str, Any],
                                                 case: PhantomPair) -> None:
    qc = assess_case(reference, _inputs(case, **QUIET[code](case)))
    assert code not in [f.code for f in qc.flags], [f.message for f in qc.flags]


def test_structure_agreement_and_margin_score_without_flagging(
        reference: dict[str, Any], case: PhantomPair) -> None:
    """One structure the decoders disagree on lowers that structure's score (too rough a
    number to flag with few validation cases); a low margin is reported, not judged."""
    qc = assess_case(reference, _inputs(case, branches=_branches(
        case.label_a, _without(case.label_a, "spleen"), margin=0.2)))
    assert not qc.flags and not qc.flagged
    assert qc.structures["spleen"] < 0.5 and qc.structures["liver"] == 1.0
    assert qc.score >= 0.5
    assert qc.signals["branches"]["mean_margin"] == pytest.approx(0.2)


def test_validation_answers_widen_the_anatomy(reference: dict[str, Any],
                                              case: PhantomPair) -> None:
    """A model that segments the spleen at a third of its labelled volume on the
    validation cases is not flagged for doing so on a case; without that record it is."""
    spleen = CLASSES.index("spleen")
    small = case.label_a.copy()
    small[(small == spleen) & ~ndimage.binary_erosion(small == spleen, iterations=2)] = 0
    measured = anatomy.measure_labels(small, case.grid_a.affine, CLASSES)
    seen = anatomy.summarise([measured], CLASSES)
    plain = assess_case(reference, _inputs(case, labels=small))
    assert "volume_out_of_range" in [f.code for f in plain.flags]
    widened = {**reference, "calibration": {**CALIBRATION, "anatomy": seen}}
    assert not assess_case(widened, _inputs(case, labels=small)).flags


def test_every_flag_code_has_both_cases() -> None:
    assert set(FIRE) == set(QUIET)


def test_a_z_scored_modality_is_judged_by_its_profile_not_its_scale(
        reference: dict[str, Any], case: PhantomPair) -> None:
    """The MR is z-scored by the model: four times its intensities is the same input to the
    network and stays quiet; an inverted contrast changes its profile and is flagged. CT
    (windowed in HU) is judged by its values."""
    scaled = assess_case(reference, _inputs(case, images=_image(
        case, "b", case.image_b.astype(np.float32) * 4)))
    assert not scaled.flags
    mr = case.image_b.astype(np.float32)
    inverted = assess_case(reference, _inputs(case, images=_image(  # another contrast
        case, "b", np.where(mr > 0, 700.0 - mr, 0.0))))
    flags = [f for f in inverted.flags if f.code == "intensity_out_of_range"]
    assert flags and flags[0].role == "b" and "z-scored" in flags[0].message
    shifted_ct = assess_case(reference, _inputs(case, images=_image(
        case, "a", (case.image_a + 300).astype(np.int16))))
    assert "intensity_out_of_range" in [f.code for f in shifted_ct.flags]


def test_messages_name_the_numbers(reference: dict[str, Any], case: PhantomPair) -> None:
    qc = assess_case(reference, _inputs(case, **FIRE["modality_role"](case)))
    by_role = {f.role: f for f in qc.flags if f.code == "modality_role"}
    assert set(by_role) == {"a", "b"}
    assert by_role["b"].message.startswith("b: looks like ct, not mr")
    intensity = next(f for f in qc.flags if f.code == "intensity_out_of_range" and f.role == "b")
    assert intensity.message.startswith("b: intensity p")
    assert "training" in intensity.message
    # a CT's HU range below zero reads "-757 to -420", not "-757--420"
    ct = [f for f in qc.flags if f.code == "intensity_out_of_range" and f.role == "a"
          and f.values["training_min"] < 0]
    assert ct and all(" to -" in f.message and "--" not in f.message for f in ct)


def test_a_doubtful_answer_never_reads_as_the_floor_score() -> None:
    # the verdict puts such an answer at most at 0.499; shown rounded, it would read 0.50
    assert [score_text(s) for s in (0.499, 0.5, 0.57, 0.29, 1.0, 0.0)] == [
        "0.49", "0.50", "0.57", "0.29", "1.00", "0.00"]


def test_ranges_read_plainly_whatever_their_sign() -> None:
    assert value_range(140.2, 259.7) == "140-260"
    assert value_range(-757.4, -420.0) == "-757 to -420"
    assert value_range(-30.0, 80.0) == "-30 to 80"


def test_score_orders_worse_disagreement_lower(reference: dict[str, Any],
                                              case: PhantomPair) -> None:
    scores = [assess_case(reference, _inputs(case, branches=_branches(
        case.label_a, _shifted(case.label_a, shift)))).score for shift in (0, 1, 2, 4)]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]


def test_a_doubtful_answer_ranks_below_every_other_by_its_agreement(
        reference: dict[str, Any], case: PhantomPair) -> None:
    """A flag on the answer (here a kidney missing) puts a case below every case without
    one, even one whose branches agree less; among such cases the agreement keeps the
    order. A flag on the input alone (CT intensities halved) flags, but the score stays
    the answer's agreement."""
    missing = _without(case.label_a, "kidney_l")
    agree = assess_case(reference, _inputs(case, labels=missing))
    worse = assess_case(reference, _inputs(case, labels=missing, branches=_branches(
        case.label_a, _shifted(case.label_a, 2))))
    unflagged = assess_case(reference, _inputs(case, branches=_branches(
        case.label_a, _shifted(case.label_a, 1))))
    halved = (case.image_a * 0.5).astype(np.int16)
    odd_input = assess_case(reference, _inputs(case, images=_image(case, "a", halved),
                                               branches=_branches(case.label_a,
                                                                  _shifted(case.label_a, 1))))
    assert agree.flagged and worse.flagged and not unflagged.flagged and odd_input.flagged
    assert worse.score < agree.score < 0.5 <= unflagged.score == odd_input.score


def test_floor_is_set_by_the_validation_cases() -> None:
    wide, narrow = _stats(0.6, 0.1), _stats(0.6, 0.01)
    assert calibrated_floor(wide) == pytest.approx(0.3)
    assert calibrated_floor(narrow) == pytest.approx(narrow["min"] - 0.05)


def test_single_modality_mode_without_branches(reference: dict[str, Any],
                                               case: PhantomPair) -> None:
    qc = assess_case(reference, _inputs(case, mode="a", branches=None, single_modality={},
                                        images={"a": _inputs(case).images["a"]}))
    assert not qc.flagged and "branches" not in qc.signals


def test_without_reference_only_reference_free_checks_run(case: PhantomPair) -> None:
    """An old model directory: the case is still assessed, the record says the reference
    is missing, and the anatomical left/right order (right organ at lower RAS x) applies;
    the phantom draws kidney_r at +x, so its mirror image is the anatomical one."""
    mirrored = case.label_a[::-1].copy()
    qc = assess_case(None, _inputs(case, labels=mirrored))
    assert qc.signals["reference"].startswith("missing")
    assert not qc.flagged and "fingerprint" not in qc.signals
    assert "branches" in qc.signals  # measured, not judged
    flipped = assess_case(None, _inputs(case))
    assert [f.code for f in flipped.flags] == ["left_right"]


def test_lateral_pairs_by_name() -> None:
    names = ("background", "kidney_r", "kidney_l", "left_lung", "right_lung", "liver")
    assert sorted(anatomy.lateral_pairs(names)) == [("kidney_r", "kidney_l"),
                                                    ("right_lung", "left_lung")]


def test_qc_json_is_serialisable(reference: dict[str, Any], case: PhantomPair) -> None:
    import json

    qc = assess_case(reference, _inputs(case, **FIRE["branch_disagreement"](case)))
    text = json.dumps(qc.to_json(), allow_nan=False)
    assert "branch_disagreement" in text


def test_noisy_ct_is_out_of_range_not_another_role(reference: dict[str, Any],
                                                   case: PhantomPair) -> None:
    """Heavy noise moves a CT's profile away from both modalities: its intensity flags
    name the problem; "looks like mr" would be a misleading second reason."""
    rng = np.random.default_rng(0)
    noisy = case.image_a + rng.normal(0.0, 100.0, case.image_a.shape)
    qc = assess_case(reference, _inputs(case, images=_image(case, "a", noisy)))
    codes = [f.code for f in qc.flags]
    assert "intensity_out_of_range" in codes and "modality_role" not in codes, codes
