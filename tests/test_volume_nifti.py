"""cmc_serve.volume and cmc_serve.nifti_io: geometry checks, clear read errors, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cmc_serve.nifti_io import NiftiError, read_nifti, sidecar_path, write_label_nifti
from cmc_serve.volume import Grid, Volume, VolumeError, axcodes

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def save(tmp_path: Path, array: np.ndarray, affine: np.ndarray | None = None,
         name: str = "img.nii.gz") -> Path:
    path = tmp_path / name
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def test_volume_geometry() -> None:
    affine = np.array([[0.0, 0.0, -2.0, 10.0], [-1.5, 0.0, 0.0, 5.0], [0.0, 3.0, 0.0, 0.0],
                       [0, 0, 0, 1.0]])
    vol = Volume(np.zeros((4, 5, 6), np.float32), affine)
    np.testing.assert_allclose(vol.spacing, [1.5, 3.0, 2.0])
    assert vol.grid.axcodes == "PSL" == axcodes(affine)
    nudged = affine.copy()
    nudged[:3] += 1e-6
    assert vol.grid.same_as(Grid((4, 5, 6), nudged))
    assert not vol.grid.same_as(Grid((4, 5, 7), affine))
    with pytest.raises(VolumeError, match="must be 3D"):
        Volume(np.zeros((4, 5)), np.eye(4))
    with pytest.raises(VolumeError, match="singular"):
        Volume(np.zeros((2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(VolumeError, match="differs from volume shape"):
        vol.with_array(np.zeros((1, 1, 1)))


def test_read_real_nifti_keeps_affine() -> None:
    path = NIBABEL_DATA / "anatomical.nii"
    vol = read_nifti(path)
    img = nib.load(str(path))
    assert vol.array.dtype == np.float32 and vol.shape == img.shape[:3]
    np.testing.assert_allclose(vol.affine, img.affine)
    np.testing.assert_allclose(vol.array, img.get_fdata(), rtol=1e-6)


def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(NiftiError, match="missing.nii.gz: no such file"):
        read_nifti(tmp_path / "missing.nii.gz")
    (tmp_path / "notes.nii").write_text("this is not an image")
    with pytest.raises(NiftiError, match="notes.nii: not a NIfTI image"):
        read_nifti(tmp_path / "notes.nii")
    with pytest.raises(NiftiError, match=r"example4d.nii.gz: expected a 3D image, got shape "
                                          r"\(128, 96, 24, 2\)"):
        read_nifti(NIBABEL_DATA / "example4d.nii.gz")
    bad = np.ones((4, 4, 4), np.float32)
    bad[1, 2, 3] = np.nan
    with pytest.raises(NiftiError, match="nan.nii.gz: image contains NaN or infinite values"):
        read_nifti(save(tmp_path, bad, name="nan.nii.gz"))
    with pytest.raises(NiftiError, match="zero.nii.gz: image is all zeros"):
        read_nifti(save(tmp_path, np.zeros((4, 4, 4), np.int16), name="zero.nii.gz"))
    gz = save(tmp_path, np.ones((20, 20, 20), np.float32), name="cut.nii.gz")
    gz.write_bytes(gz.read_bytes()[:200])
    with pytest.raises(NiftiError, match="cut.nii.gz: "):
        read_nifti(gz)


def test_singleton_fourth_axis_is_accepted(tmp_path: Path) -> None:
    vol = read_nifti(save(tmp_path, np.ones((3, 4, 5, 1), np.float32)))
    assert vol.shape == (3, 4, 5)


def test_write_label_nifti_round_trip(tmp_path: Path) -> None:
    affine = np.array([[-0.8, 0.0, 0.0, 90.0], [0.0, 0.0, 2.5, -40.0], [0.0, -0.8, 0.0, 60.0],
                       [0, 0, 0, 1.0]])
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[1:3, 2:5, 4:] = 2
    out = write_label_nifti(labels, affine, tmp_path / "out" / "case.nii.gz",
                            ["background", "liver", "spleen"])
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels)
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert json.loads(sidecar_path(out).read_text()) == {
        "labels": {"0": "background", "1": "liver", "2": "spleen"}}
    assert sorted(p.name for p in out.parent.iterdir()) == ["case.json", "case.nii.gz"]


def test_write_label_nifti_refusals(tmp_path: Path) -> None:
    labels = np.full((2, 2, 2), 3, np.uint8)
    with pytest.raises(NiftiError, match="label 3 has no class name"):
        write_label_nifti(labels, np.eye(4), tmp_path / "a.nii.gz", ["bg", "x"])
    with pytest.raises(NiftiError, match="must end in .nii or .nii.gz"):
        write_label_nifti(labels, np.eye(4), tmp_path / "a.mha", ["bg", "x", "y", "z"])
    assert list(tmp_path.iterdir()) == []
