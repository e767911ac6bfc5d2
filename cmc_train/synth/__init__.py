"""Synthetic two-modality studies: phantom NIfTI volumes, optional DICOM series, datalist.

`write_synthetic_study` is what `cmc synth` runs. Every case is a pure function of
(seed, case index), so a study can be regenerated bit for bit, and adding cases never
changes existing ones.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from cmc_train.data.datalist import Datalist, Entry
from cmc_train.errors import ConfigError
from cmc_train.synth.dicom_series import StudyInfo, deterministic_uid, write_dicom_series
from cmc_train.synth.hard_study import make_hard_pair
from cmc_train.synth.phantom import CLASSES, Grid, PhantomPair, make_pair

MODALITIES: tuple[str, str] = ("ct", "mr")
# `difficulty` -> the function that renders one case. "easy": the demo's and the tests'
# phantom (a few labelled volumes cover it); "hard": subjects, scanners and contrast vary so
# much that they do not (cmc_train.synth.hard_anatomy, hard_study).
PAIR_MAKERS = {"easy": make_pair, "hard": make_hard_pair}


def case_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of case `index` (stream 1 draws the other subject of unpaired cases)."""
    return np.random.default_rng([seed, index, stream])


def save_nifti(array: np.ndarray, grid: Grid, path: Path) -> Path:
    """Write a NIfTI with the grid's RAS affine as both qform and sform (scanner space, mm)."""
    image = nib.Nifti1Image(array, grid.affine)
    image.set_qform(grid.affine, code=1)
    image.set_sform(grid.affine, code=1)
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def _write_case(out: Path, case_id: str, pair: PhantomPair, with_label: bool) -> Entry:
    images, labels = {}, {}
    for modality, image, label, grid in (("ct", pair.image_a, pair.label_a, pair.grid_a),
                                         ("mr", pair.image_b, pair.label_b, pair.grid_b)):
        images[modality] = save_nifti(image, grid, out / "images" / f"{case_id}_{modality}.nii.gz")
        if with_label:
            labels[modality] = save_nifti(label, grid,
                                          out / "labels" / f"{case_id}_{modality}.nii.gz")
    return Entry(id=case_id, image=images, label=labels)


def _write_case_dicom(out: Path, case_id: str, pair: PhantomPair, seed: int) -> None:
    study_uid = deterministic_uid(seed, case_id, "study")
    study = StudyInfo(patient_id=case_id, patient_name=f"Phantom^{case_id}", study_uid=study_uid,
                      frame_of_reference_uid=deterministic_uid(study_uid, "frame"))
    write_dicom_series(pair.image_a, pair.grid_a.affine, out / "dicom" / case_id / "ct", "CT",
                       study, series_number=1, description="CT abdomen portal venous")
    write_dicom_series(pair.image_b, pair.grid_b.affine, out / "dicom" / case_id / "mr", "MR",
                       study, series_number=2, description="MR abdomen T2w")


def write_synthetic_study(out: Path | str, cases: int, seed: int = 0, *, size: int = 64,
                          labelled_ratio: float = 0.1, val_cases: int = 4, test_cases: int = 4,
                          calibration_cases: int = 0, dicom: bool = False,
                          unpaired: bool = False, offset_mm: float = 10.0,
                          rotation_deg: float = 5.0, elastic_mm: float = 2.0,
                          difficulty: str = "easy") -> Path:
    """Write `cases` training cases plus validation, test and calibration cases; return the
    datalist path.

    Training cases are split into labelled (`labelled_ratio` of them, at least one, chosen
    with the seed) and unlabelled; unlabelled cases get no label files at all. Each case
    has a CT-like volume (modality "ct", 1.5 mm, RAS grid) and an MR-like one ("mr",
    2 x 2 x 3 mm, LPS grid, different field of view) whose anatomy is moved by a random
    rigid transform (translation in [0.5, 1] x `offset_mm`, rotation in
    [0.5, 1] x `rotation_deg`) plus an elastic field of about `elastic_mm`.
    `difficulty` "hard" draws every subject's anatomy, lesions, scanner (grid, contrast,
    noise, field of view) from wide ranges instead (`hard_study.make_hard_pair`); "easy",
    the default, is the phantom described above. Calibration cases (quality control's
    held-out set, `cmc_train.data.datalist`) come last, so adding them leaves every other
    case unchanged, and labelled: the fused answer's mean Dice on held-out cases is what a
    failed case is measured from, and the validation cases alone overrate it (they chose
    the checkpoint).
    """
    if difficulty not in PAIR_MAKERS:
        raise ConfigError(f"difficulty must be one of {', '.join(PAIR_MAKERS)}, got "
                          f"{difficulty!r}")
    make = PAIR_MAKERS[difficulty]
    if cases < 1:
        raise ConfigError(f"need at least one training case, got {cases}")
    if not 0.0 < labelled_ratio <= 1.0:
        raise ConfigError(f"labelled ratio must be in (0, 1], got {labelled_ratio}")
    if min(val_cases, test_cases, calibration_cases) < 0:
        raise ConfigError("validation, test and calibration case counts must be >= 0")
    out = Path(out)
    n_labelled = max(1, int(round(labelled_ratio * cases)))
    labelled_idx = set(np.random.default_rng([seed, 2**31]).permutation(cases)[:n_labelled])
    splits: dict[str, list[Entry]] = {"labelled": [], "unlabelled": [], "validation": [],
                                      "test": [], "calibration": []}
    for index in range(cases + val_cases + test_cases + calibration_cases):
        case_id = f"case_{index:04d}"
        if index < cases:
            split = "labelled" if index in labelled_idx else "unlabelled"
        elif index < cases + val_cases:
            split = "validation"
        else:
            split = "test" if index < cases + val_cases + test_cases else "calibration"
        pair = make(case_rng(seed, index), size=size, offset_mm=offset_mm,
                    rotation_deg=rotation_deg, elastic_mm=elastic_mm,
                    unpaired_rng=case_rng(seed, index, 1) if unpaired else None)
        splits[split].append(_write_case(out, case_id, pair, with_label=split != "unlabelled"))
        if dicom:
            _write_case_dicom(out, case_id, pair, seed)
    datalist = Datalist(modalities=MODALITIES, classes=CLASSES,
                        **{k: tuple(v) for k, v in splits.items()})
    path = out / "datalist.json"
    datalist.save(path)
    return path


__all__ = ["CLASSES", "MODALITIES", "PAIR_MAKERS", "case_rng", "make_hard_pair", "make_pair",
           "write_synthetic_study"]
