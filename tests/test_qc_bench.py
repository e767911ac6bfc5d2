"""bench/qc.py's parts that need no model: the failure set and its scoring."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from qc_bench import cases as case_set
from qc_bench import scoring

from cmc_serve.qc import fingerprint
from cmc_train.synth.phantom import CLASSES


@pytest.fixture(scope="module")
def built() -> list[case_set.BenchCase]:
    counts = {kind: 1 for kind in case_set.DEFAULT_COUNTS}
    return case_set.build_cases(counts, size=32)


def test_every_kind_is_built_with_its_truth_on_a_grid(built: list[case_set.BenchCase]) -> None:
    assert {c.kind for c in built} == set(case_set.DEFAULT_COUNTS)
    for case in built:
        assert case.truth.shape == case.image_a.shape == case.grid_a.shape, case.case_id
        assert case.image_b.shape == case.grid_b.shape
    by_kind = {c.kind: c for c in built}
    assert not by_kind["non_abdominal"].truth.any()
    assert by_kind["in_distribution"].truth.max() == len(CLASSES) - 1
    # swapped: the MR is given as a, so a's intensity profile is the MR's
    swapped = by_kind["swapped_roles"]
    assert swapped.image_a.min() >= 0 and swapped.image_b.min() < -500
    assert by_kind["truncated_fov"].image_a.shape[2] < 32


def test_the_set_is_deterministic_and_new(built: list[case_set.BenchCase]) -> None:
    again = case_set.build_cases({k: 1 for k in case_set.DEFAULT_COUNTS}, size=32)
    for x, y in zip(built, again, strict=True):
        assert x.case_id == y.case_id and np.array_equal(x.image_a, y.image_a)
    other = case_set.build_cases({"in_distribution": 1}, size=32, seed=9001)
    assert not np.array_equal(other[0].image_a, built[[c.kind for c in built].index(
        "in_distribution")].image_a)


def test_damage_changes_what_it_claims(built: list[case_set.BenchCase]) -> None:
    by_kind = {c.kind: c for c in built}
    clean = fingerprint.measure_image(by_kind["in_distribution"].image_a,
                                      by_kind["in_distribution"].grid_a.affine)
    head = fingerprint.measure_image(by_kind["non_abdominal"].image_a,
                                     by_kind["non_abdominal"].grid_a.affine)
    assert head["body_extent_mm"][0] > 2 * clean["body_extent_mm"][0]
    moved = by_kind["misregistration"]
    assert not np.allclose(moved.grid_b.affine[:3, 3], moved.grid_a.affine[:3, 3])


def test_cases_write_as_one_nnunet_case_each(built: list[case_set.BenchCase],
                                             tmp_path: Path) -> None:
    built[0].write(tmp_path)
    names = sorted(p.name for p in (tmp_path / "cases").iterdir())
    assert names == [f"{built[0].case_id}_0000.nii.gz", f"{built[0].case_id}_0001.nii.gz"]
    truth: Any = nib.load(str(tmp_path / "truth" / f"{built[0].case_id}.nii.gz"))
    assert np.array_equal(np.asarray(truth.dataobj), built[0].truth)
    assert np.allclose(truth.affine, built[0].grid_a.affine)


def test_dice_counts_a_class_absent_from_both_as_found() -> None:
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[:2] = 1
    assert scoring.mean_fg_dice(truth, truth, 3) == 1.0
    pred = np.zeros_like(truth)
    assert scoring.mean_fg_dice(pred, truth, 3) == 0.5  # class 1 missed, class 2 absent
    pred[:1] = 1
    assert scoring.mean_fg_dice(pred, truth, 2) == pytest.approx(2 * 16 / (16 + 32))


def test_auroc_matches_the_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.uniform(size=40), 1)  # ties on purpose
    positive = rng.uniform(size=40) < 0.3
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0)
             for p in scores[positive] for n in scores[~positive]]
    assert scoring.auroc(list(scores), list(positive)) == pytest.approx(np.mean(pairs))
    assert scoring.auroc([0.1, 0.9], [False, True]) == 1.0
    assert scoring.auroc([0.1, 0.9], [True, True]) is None


def test_summary_counts_flags_per_kind() -> None:
    rows = [{"kind": "in_distribution", "dice": 0.8, "score": 0.9, "flagged": False},
            {"kind": "in_distribution", "dice": 0.78, "score": 0.4, "flagged": True},
            {"kind": "swapped_roles", "dice": 0.1, "score": 0.0, "flagged": True},
            {"kind": "non_abdominal", "dice": 0.2, "score": 0.3, "flagged": False}]
    s = scoring.summarise(rows, 0.8, case_set.OOD_KINDS)
    assert s["failed"] == 2 and s["failure_threshold"] == pytest.approx(0.65)
    assert s["flagged_in_distribution"] == {"flagged": 1, "cases": 2, "share": 0.5}
    assert s["flagged_in_distribution_not_failed"] == {"flagged": 1, "cases": 2, "share": 0.5}
    assert s["flagged_ood"]["share"] == 0.5
    assert s["auroc_failed"] == 1.0  # both failed cases score below both others
    assert s["kinds"]["swapped_roles"]["flagged"] == 1


def test_summary_judges_structures_of_in_distribution_cases() -> None:
    """A case whose mean passes but whose spleen failed is not counted as a false alarm,
    and the flagged structure's true Dice is reported beside the others'."""
    rows = [{"kind": "in_distribution", "dice": 0.8, "score": 0.4, "flagged": True,
             "structure_dice": {"liver": 0.95, "spleen": 0.4},
             "flagged_structures": ["spleen"]},
            {"kind": "in_distribution", "dice": 0.8, "score": 0.9, "flagged": False,
             "structure_dice": {"liver": 0.8, "spleen": 0.8}, "flagged_structures": []},
            {"kind": "in_distribution", "dice": 0.8, "score": 0.45, "flagged": True,
             "structure_dice": {"liver": 0.9, "spleen": 0.7}, "flagged_structures": []}]
    s = scoring.summarise(rows, 0.8, case_set.OOD_KINDS)
    assert s["flagged_in_distribution"] == {"flagged": 2, "cases": 3, "share": 0.6667}
    assert s["flagged_in_distribution_every_structure_right"] == {
        "flagged": 1, "cases": 2, "share": 0.5}
    assert s["structures_in_distribution"] == {
        "flagged": 1, "flagged_median_dice": 0.4, "others": 5, "others_median_dice": 0.8}
