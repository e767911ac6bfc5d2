"""The hard synthetic study (`cmc synth --difficulty hard`): determinism, variation between
subjects, the CT / MR modality gap, lesions, DICOM, CLI, and the easy study left as it was."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cmc_cli.main import app
from test_synth import assert_series_matches_nifti
from typer.testing import CliRunner

from cmc_train.data.datalist import Datalist
from cmc_train.synth import case_rng, make_hard_pair, make_pair, write_synthetic_study
from cmc_train.synth.hard_anatomy import FIRST_LESION, sample_hard_anatomy, tissue_to_label
from cmc_train.synth.hard_study import mr_protocol
from cmc_train.synth.phantom import (
    BOWEL_FLUID,
    KIDNEY_R,
    LIVER,
    MEDULLA_R,
    SOFT,
    SPLEEN,
    PhantomPair,
)

SUBJECTS = 8
LIVER_LABEL, SPLEEN_LABEL = 1, 2


def _pairs(make, size: int = 32) -> list[PhantomPair]:  # type: ignore[no-untyped-def]
    return [make(case_rng(11, i), size=size) for i in range(SUBJECTS)]


@pytest.fixture(scope="module")
def hard() -> list[PhantomPair]:
    return _pairs(make_hard_pair)


@pytest.fixture(scope="module")
def easy() -> list[PhantomPair]:
    return _pairs(make_pair)


def test_same_seed_same_case_other_seed_differs() -> None:
    first, again = make_hard_pair(case_rng(3, 0), size=24), make_hard_pair(case_rng(3, 0), size=24)
    other = make_hard_pair(case_rng(3, 1), size=24)
    for name in ("image_a", "label_a", "image_b", "label_b"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    np.testing.assert_array_equal(first.grid_b.affine, again.grid_b.affine)
    assert not np.array_equal(first.label_a, other.label_a)


def _liver_ml(pair: PhantomPair) -> float:
    voxel_mm3 = abs(np.linalg.det(pair.grid_a.affine[:3, :3]))
    return float((pair.label_a == LIVER_LABEL).sum() * voxel_mm3) / 1000


def _cv(values: list[float]) -> float:
    return float(np.std(values) / np.mean(values))


def test_subjects_vary_far_more_than_in_the_easy_study(hard: list[PhantomPair],
                                                       easy: list[PhantomPair]) -> None:
    # Anatomy: liver volume (mm^3, so grids of other spacings compare).
    hard_cv, easy_cv = _cv([_liver_ml(p) for p in hard]), _cv([_liver_ml(p) for p in easy])
    assert hard_cv > 2 * easy_cv and hard_cv > 0.2, (hard_cv, easy_cv)
    # Scanner: slice thickness and in-plane spacing differ from subject to subject.
    thickness = [abs(p.grid_a.affine[2, 2]) for p in hard]
    assert max(thickness) - min(thickness) > 1.0
    assert len({round(abs(p.grid_b.affine[0, 0]), 3) for p in hard}) == SUBJECTS
    # Contrast / calibration: the liver's median HU spreads by ~10 HU (easy: < 1).
    hard_hu = [np.median(p.image_a[p.label_a == LIVER_LABEL]) for p in hard]
    easy_hu = [np.median(p.image_a[p.label_a == LIVER_LABEL]) for p in easy]
    assert np.std(hard_hu) > 8 and np.std(hard_hu) > 4 * np.std(easy_hu), (hard_hu, easy_hu)
    # MR gain: the liver's signal varies several-fold.
    mr_liver = [np.median(p.image_b[p.label_b == LIVER_LABEL]) for p in hard]
    assert max(mr_liver) > 2 * min(mr_liver)


def test_mr_contrast_that_a_few_labelled_scans_do_not_cover() -> None:
    """Per MR scan: the kidney medulla from much darker to brighter than the cortex, the
    bowel bright (fluid) or, in about 30 % of scans, dark (negative oral contrast); the
    liver always brighter than muscle."""
    rng = np.random.default_rng(0)
    anatomy = sample_hard_anatomy(rng, np.full(3, 48.0))
    tables = [mr_protocol(rng, anatomy).table for _ in range(200)]
    medulla = np.array([table[MEDULLA_R] / table[KIDNEY_R] for table in tables])
    assert medulla.min() < 0.6 and medulla.max() > 1.2, medulla
    dark_bowel = np.array([table[BOWEL_FLUID] < table[LIVER] for table in tables])
    assert 0.2 < dark_bowel.mean() < 0.4
    assert all(table[LIVER] > table[SOFT] for table in tables)


def test_field_of_view_cuts_organs_in_some_subjects(hard: list[PhantomPair]) -> None:
    """Some organ reaches the top or bottom slice of the CT field of view."""
    def cut(label: np.ndarray) -> bool:
        return bool(label[:, :, 0].any() or label[:, :, -1].any())
    assert any(cut(p.label_a) for p in hard)


def _contrast(image: np.ndarray, label: np.ndarray) -> float:
    """|spleen - liver| median difference in units of the liver's spread (IQR)."""
    liver, spleen = image[label == LIVER_LABEL], image[label == SPLEEN_LABEL]
    spread = np.subtract(*np.percentile(liver, [75, 25]))
    return float(abs(np.median(spleen) - np.median(liver)) / max(spread, 1.0))


def test_modality_gap_spleen_hidden_in_ct_visible_in_mr(hard: list[PhantomPair]) -> None:
    ct = [_contrast(p.image_a.astype(np.float32), p.label_a) for p in hard]
    mr = [_contrast(p.image_b.astype(np.float32), p.label_b) for p in hard]
    # Measured on these 8 subjects: CT 0.0-0.6, median 0.2; MR 1.0-5.0, median 2.4.
    assert np.median(mr) > 4 * np.median(ct), (ct, mr)
    assert max(ct) < 1.0 < np.median(mr) and min(mr) > 0.6, (ct, mr)


def test_lesions_are_inside_organs_and_labelled_as_them() -> None:
    rng = case_rng(5, 0)
    anatomy = sample_hard_anatomy(rng, np.full(3, 48.0))
    assert 1 <= len(anatomy.lesions) <= 3
    table = tissue_to_label(anatomy.lesion_organs)
    organ_label = {LIVER: 1, SPLEEN: 2, KIDNEY_R: 3}
    for i, organ in enumerate(anatomy.lesion_organs):
        assert table[FIRST_LESION + i] == table[organ]
        if organ in organ_label:
            assert table[organ] == organ_label[organ]
    axes = np.linspace(-36, 36, 64, dtype=np.float32)
    pts = np.stack(np.meshgrid(axes, axes, axes, indexing="ij")).reshape(3, -1)
    tissues = anatomy.tissues(pts)
    assert (tissues >= FIRST_LESION).any()
    assert set(np.unique(table[tissues])) <= {0, 1, 2, 3, 4}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hard") / "study"
    write_synthetic_study(out, cases=2, seed=4, size=24, labelled_ratio=0.5, val_cases=1,
                          test_cases=0, dicom=True, difficulty="hard")
    return out


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_dicom_round_trip_of_a_hard_case(study: Path, modality: str) -> None:
    assert_series_matches_nifti(study, "case_0002", modality)


def test_study_holds_the_hard_cases(study: Path) -> None:
    datalist = Datalist.load(study / "datalist.json")
    pair = make_hard_pair(case_rng(4, 2), size=24)
    nii = nib.load(datalist.validation[0].image["mr"])
    np.testing.assert_allclose(nii.affine, pair.grid_b.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(nii.dataobj), pair.image_b)


# The easy phantom of case_rng(3, 0), size 32, as generated before the hard study existed:
# voxels per class of label a and b and the mean of each image. Any change to the easy
# study's random draws or rendering moves these.
EASY_LABEL_A = [30889, 1046, 283, 213, 337]
EASY_LABEL_B = [9646, 335, 83, 63, 79]
EASY_MEAN_A, EASY_MEAN_B = -569.3328857421875, 75.49637468155987


def test_default_easy_study_is_unchanged() -> None:
    pair = make_pair(case_rng(3, 0), size=32)
    np.testing.assert_allclose(np.bincount(pair.label_a.ravel(), minlength=5), EASY_LABEL_A,
                               atol=3)
    np.testing.assert_allclose(np.bincount(pair.label_b.ravel(), minlength=5), EASY_LABEL_B,
                               atol=3)
    assert pair.image_a.mean() == pytest.approx(EASY_MEAN_A, rel=1e-4)
    assert pair.image_b.mean() == pytest.approx(EASY_MEAN_B, rel=1e-4)


def test_cli_difficulty_hard_and_unknown_difficulty(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["synth", str(tmp_path / "h"), "--cases", "1", "--size", "20",
                                 "--val-cases", "0", "--test-cases", "0", "--seed", "2",
                                 "--difficulty", "hard"])
    assert result.exit_code == 0, result.output
    written = nib.load(tmp_path / "h" / "images" / "case_0000_ct.nii.gz")
    np.testing.assert_array_equal(np.asarray(written.dataobj),
                                  make_hard_pair(case_rng(2, 0), size=20).image_a)
    bad = runner.invoke(app, ["synth", str(tmp_path / "x"), "--difficulty", "extreme"])
    assert bad.exit_code == 2 and "difficulty must be one of easy, hard" in bad.output
