"""Orientation: the same phantom stored RAS, LPS, with permuted axes or a flipped axis (NIfTI),
or as DICOM series with reversed row/slice directions, segments to the same labels in world
space, and every output keeps its input's own voxel order and affine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import segment_fixtures as fx
from nibabel import orientations as nio

SHAPE = (22, 20, 12)
BASE = fx.ras_affine((2.0, 2.0, 2.0), SHAPE)
VARIANTS = {"RAS": "RAS", "LPS": "LPS", "permuted": "SRA", "flipped": "RAI"}


def _reoriented(codes: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ct, mr, affine) of the phantom on the base grid stored with axis codes `codes`."""
    ornt = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(codes))
    affine = BASE @ nio.inv_ornt_aff(ornt, SHAPE)
    images = [nio.apply_orientation(fx.phantom(SHAPE, BASE, m), ornt) for m in ("ct", "mr")]
    assert "".join(nio.aff2axcodes(affine)) == codes
    return images[0], images[1], affine


def _to_ras(labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return nio.apply_orientation(labels, nio.io_orientation(affine))


def test_nifti_storage_orders_give_the_same_world_segmentation(tmp_path: Path,
                                                               model_dir: Path) -> None:
    inputs = tmp_path / "in"
    affines = {}
    for name, codes in VARIANTS.items():
        ct, mr, affines[name] = _reoriented(codes)
        fx.write_nifti(inputs / f"{name}_0000.nii.gz", ct, affines[name])
        fx.write_nifti(inputs / f"{name}_0001.nii.gz", mr, affines[name])
    out = tmp_path / "out"
    r = fx.segment(inputs, "-o", out, "--model", model_dir, "--runtime", "onnxruntime")
    assert r.exit_code == 0, r.output
    truth = fx.expected_labels(SHAPE, BASE, "fused")
    for name in VARIANTS:
        labels, affine = fx.read_labels(out / name / "seg.nii.gz")
        np.testing.assert_allclose(affine, affines[name], atol=1e-5)  # input's own order
        in_world = _to_ras(labels, affine)
        for cls in (1, 2):
            assert fx.dice(in_world == cls, truth == cls) >= 0.99, (name, cls)
        np.testing.assert_array_equal(in_world, truth)


@pytest.mark.parametrize(("orientation", "origin"), [
    # axial, columns to the patient's left, rows to posterior (the usual LPS)
    ((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (-21.0, -19.0, -11.0)),
    # axial, rotated 180 degrees in plane
    ((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0), (21.0, 19.0, -11.0)),
    # rows to anterior: the slice normal points down, slices stack head to feet
    ((1.0, 0.0, 0.0, 0.0, -1.0, 0.0), (-21.0, 19.0, 11.0)),
])
def test_dicom_directions_give_the_same_world_segmentation(tmp_path: Path, model_dir: Path,
                                                           orientation: tuple[float, ...],
                                                           origin: tuple[float, float, float]
                                                           ) -> None:
    uid = "1.2.826.0.1.3680043.8.498.900"
    spec = fx.ct_spec(uid, orientation=orientation, origin=origin)
    fx.write_phantom_series(tmp_path / "study" / "ct", spec)
    out = tmp_path / "out"
    r = fx.segment(tmp_path / "study", "-o", out, "--model", model_dir, "--runtime",
                   "onnxruntime", "--output-type", "nifti")
    assert r.exit_code == 0, r.output
    (case,) = [p for p in out.iterdir() if p.is_dir()]
    labels, affine = fx.read_labels(case / "seg.nii.gz")
    np.testing.assert_allclose(affine, fx.dicom_affine(spec), atol=1e-4)
    truth = fx.expected_labels(labels.shape, affine, "a")  # type: ignore[arg-type]
    assert fx.dice(labels == 1, truth == 1) >= 0.99
    assert (labels == 1).sum() == (fx.expected_labels(SHAPE, BASE, "a") == 1).sum()
