"""Synthetic phantom study: determinism, geometry, labels, misalignment, DICOM and CLI."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from cmc_cli.main import app
from scipy import ndimage
from typer.testing import CliRunner

from cmc_train.data.datalist import Datalist
from cmc_train.synth import CLASSES, case_rng, make_pair, write_synthetic_study
from cmc_train.synth.phantom import PhantomPair


def _pair(seed: int = 3, size: int = 32, **kwargs: float) -> PhantomPair:
    return make_pair(case_rng(seed, 0), size=size, **kwargs)


def test_same_seed_same_phantom_and_different_seed_differs() -> None:
    first, again, other = _pair(3), _pair(3), _pair(4)
    for name in ("image_a", "label_a", "image_b", "label_b"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.image_a, other.image_a)
    assert not np.array_equal(first.label_b, other.label_b)


def test_grids_shapes_dtypes_and_intensity_ranges() -> None:
    pair = _pair()
    assert pair.image_a.shape == pair.label_a.shape == (32, 32, 32)
    assert pair.image_b.shape == pair.label_b.shape == pair.grid_b.shape
    np.testing.assert_allclose(np.diag(pair.grid_a.affine)[:3], [1.5, 1.5, 1.5])
    # b: 2 x 2 x 3 mm, stored L-P-S (flipped axes) with a different field of view.
    np.testing.assert_allclose(np.diag(pair.grid_b.affine)[:3], [-2.0, -2.0, 3.0])
    assert nib.aff2axcodes(pair.grid_b.affine) == ("L", "P", "S")
    assert pair.image_a.dtype == np.int16 and pair.image_b.dtype == np.uint16
    assert pair.image_a.min() < -900 and pair.image_a.max() > 150  # air and enhanced organs
    assert abs(float(np.median(pair.image_a[pair.label_a == 1])) - 95) < 25  # liver HU


def test_at_least_four_labelled_structures_in_both_modalities() -> None:
    pair = _pair()
    assert CLASSES[0] == "background" and len(CLASSES) >= 5
    for label in (pair.label_a, pair.label_b):
        present = set(np.unique(label)) - {0}
        assert present == set(range(1, len(CLASSES)))
        for cls in present:  # each organ is one connected blob
            assert ndimage.label(label == cls)[1] >= 1
    # Liver is the largest organ, as in real abdomens.
    counts = np.bincount(pair.label_a.ravel(), minlength=len(CLASSES))
    assert counts[1] == counts[1:].max()


def _world_dice(pair: PhantomPair) -> float:
    """Mean foreground Dice of label b resampled (nearest, world space) onto grid a."""
    to_b = np.linalg.inv(pair.grid_b.affine) @ pair.grid_a.affine
    idx = np.indices(pair.label_a.shape).reshape(3, -1)
    coords = to_b[:3, :3] @ idx + to_b[:3, 3:4]
    b_on_a = ndimage.map_coordinates(pair.label_b, coords, order=0, mode="constant")
    b_on_a = b_on_a.reshape(pair.label_a.shape)
    dice = []
    for cls in range(1, len(CLASSES)):
        a, b = pair.label_a == cls, b_on_a == cls
        dice.append(2 * np.sum(a & b) / (a.sum() + b.sum()))
    return float(np.mean(dice))


def test_misalignment_is_present_and_controllable() -> None:
    # 48 voxels: organs large enough that 1.5 mm vs 2 x 2 x 3 mm voxels do not dominate.
    aligned = _world_dice(_pair(size=48, offset_mm=0.0, rotation_deg=0.0, elastic_mm=0.0))
    mild = _world_dice(_pair(size=48, offset_mm=0.0, rotation_deg=0.0, elastic_mm=2.0))
    shifted = _world_dice(_pair(size=48, offset_mm=20.0, rotation_deg=0.0, elastic_mm=0.0))
    assert aligned > 0.88, aligned
    assert 0.7 < mild < aligned, mild
    assert shifted < 0.4, shifted


def test_unpaired_b_is_another_subject() -> None:
    paired = make_pair(case_rng(5, 0), size=32, offset_mm=0, rotation_deg=0, elastic_mm=0)
    unpaired = make_pair(case_rng(5, 0), size=32, offset_mm=0, rotation_deg=0, elastic_mm=0,
                         unpaired_rng=case_rng(5, 0, 1))
    np.testing.assert_array_equal(paired.label_a, unpaired.label_a)
    assert _world_dice(unpaired) < _world_dice(paired) - 0.05


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "study"
    write_synthetic_study(out, cases=4, seed=7, size=32, labelled_ratio=0.25, val_cases=1,
                          test_cases=1, dicom=True)
    return out


def test_study_datalist_and_nifti_geometry(study: Path) -> None:
    datalist = Datalist.load(study / "datalist.json")
    assert datalist.modalities == ("ct", "mr") and datalist.classes == CLASSES
    assert [len(datalist.split(s)) for s in ("labelled", "unlabelled", "validation", "test")] \
        == [1, 3, 1, 1]
    assert not list((study / "labels").glob(f"{datalist.unlabelled[0].id}_*"))
    entry = datalist.labelled[0]
    index = int(entry.id.split("_")[1])
    pair = make_pair(case_rng(7, index), size=32)
    for modality, grid, image in (("ct", pair.grid_a, pair.image_a),
                                  ("mr", pair.grid_b, pair.image_b)):
        nii = nib.load(entry.image[modality])
        np.testing.assert_allclose(nii.affine, grid.affine, atol=1e-4)
        assert int(nii.header["qform_code"]) == int(nii.header["sform_code"]) == 1
        np.testing.assert_array_equal(np.asarray(nii.dataobj), image)
        label = nib.load(entry.label[modality])
        np.testing.assert_allclose(label.affine, nii.affine)
        assert label.shape == nii.shape


def assert_series_matches_nifti(study: Path, case: str, modality: str) -> None:
    """The case's DICOM series, read with SimpleITK (LPS -> RAS), has the voxels and the
    geometry of its NIfTI image (both brought to the closest canonical orientation)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(study / "dicom" / case / modality)))
    image = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32)
    from_dicom = nib.as_closest_canonical(nib.Nifti1Image(array, np.diag([-1, -1, 1, 1]) @ lps))
    from_nifti = nib.as_closest_canonical(nib.load(study / "images" / f"{case}_{modality}.nii.gz"))
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-3)
    np.testing.assert_array_equal(from_dicom.get_fdata(), from_nifti.get_fdata())


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_dicom_series_round_trip_geometry(study: Path, modality: str) -> None:
    assert_series_matches_nifti(study, "case_0004", modality)  # a validation case


def test_dicom_series_identity(study: Path) -> None:
    ct = pydicom.dcmread(next((study / "dicom" / "case_0004" / "ct").iterdir()))
    mr = pydicom.dcmread(next((study / "dicom" / "case_0004" / "mr").iterdir()))
    assert (ct.Modality, mr.Modality) == ("CT", "MR")
    assert ct.SOPClassUID.name == "CT Image Storage" and mr.SOPClassUID.name == "MR Image Storage"
    assert ct.StudyInstanceUID == mr.StudyInstanceUID
    assert ct.SeriesInstanceUID != mr.SeriesInstanceUID
    assert (float(ct.RescaleSlope), float(ct.RescaleIntercept)) == (1.0, -1024.0)
    assert ct.SeriesDescription and mr.SeriesDescription
    other = pydicom.dcmread(next((study / "dicom" / "case_0005" / "ct").iterdir()))
    assert other.StudyInstanceUID != ct.StudyInstanceUID


def test_dicom_passes_dciodvfy(study: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (make system-deps installs dicom3tools)")
    for modality in ("ct", "mr"):
        files = sorted((study / "dicom" / "case_0004" / modality).iterdir())
        for path in (files[0], files[len(files) // 2], files[-1]):
            result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True,
                                    check=False)
            errors = [line for line in (result.stdout + result.stderr).splitlines()
                      if line.startswith("Error")]
            assert not errors, f"{path}: {errors}"


def test_calibration_cases_come_last_labelled_and_change_no_other_case(
        tmp_path: Path) -> None:
    """Quality control's held-out cases are appended: the training, validation and test
    cases (and so a trained model) are the ones the same seed gives without them."""
    kwargs: dict[str, Any] = dict(cases=2, seed=3, size=24, val_cases=1, test_cases=1)
    without = Datalist.load(write_synthetic_study(tmp_path / "without", **kwargs))
    study = write_synthetic_study(tmp_path / "with", **kwargs, calibration_cases=2)
    datalist = Datalist.load(study)
    assert [e.id for e in datalist.calibration] == ["case_0004", "case_0005"]
    assert all(set(e.image) == set(e.label) == {"ct", "mr"} for e in datalist.calibration)
    for split in ("labelled", "unlabelled", "validation", "test"):
        for old, new in zip(without.split(split), datalist.split(split), strict=True):
            assert old.id == new.id
            for modality, path in old.image.items():
                np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj),
                                              np.asarray(nib.load(new.image[modality]).dataobj))


def test_cli_writes_study_and_refuses_non_empty_folder(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["synth", str(out), "--cases", "2", "--size", "24",
                                 "--val-cases", "1", "--test-cases", "0", "--seed", "1",
                                 "--calibration-cases", "1"])
    assert result.exit_code == 0, result.output
    assert "1 validation, 0 test, 1 calibration cases" in result.output
    datalist = Datalist.load(out / "datalist.json")
    assert len(datalist.labelled) == 1 and len(datalist.unlabelled) == 1
    assert len(datalist.calibration) == 1
    again = runner.invoke(app, ["synth", str(out), "--cases", "2"])
    assert again.exit_code == 2 and "not an empty folder" in again.output
