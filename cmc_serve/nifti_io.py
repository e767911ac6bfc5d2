"""NIfTI in and out: read an image into a `Volume`, write a uint8 label map beside its source.

Reading refuses anything that would give silently wrong output later (4D series, NaN/inf
voxels, an all-zero image) with a one-line `NiftiError` naming the file. Writing is atomic
(`cmc_common.files.atomic_write`: temporary name + rename) so a crashed or interrupted run never leaves a half-written file
that a batch restart would take for a finished case.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from cmc_common.files import atomic_write
from cmc_serve.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class NiftiError(ValueError):
    """A NIfTI file that cannot be used as a segmentation input or output."""


def is_nifti_path(path: Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: str | Path) -> Volume:
    """Read a 3D NIfTI image as float32 with its RAS affine (sform, else qform)."""
    path = Path(path)
    if not path.is_file():
        raise NiftiError(f"{path}: no such file")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many unrelated types for foreign files
        raise NiftiError(f"{path}: not a NIfTI image ({type(exc).__name__}: {exc})") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise NiftiError(f"{path}: not a NIfTI image (nibabel read it as {type(img).__name__})")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise NiftiError(f"{path}: expected a 3D image, got shape {tuple(img.shape)}")
    try:
        array = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except Exception as exc:  # truncated or corrupt data block
        raise NiftiError(f"{path}: cannot read voxel data ({type(exc).__name__}: {exc})") from exc
    if not np.all(np.isfinite(array)):
        raise NiftiError(f"{path}: image contains NaN or infinite values")
    if not np.any(array):
        raise NiftiError(f"{path}: image is all zeros")
    affine = img.affine
    if (affine is None or not np.all(np.isfinite(affine))
            or abs(np.linalg.det(affine[:3, :3])) < 1e-12):
        raise NiftiError(f"{path}: header has no usable voxel-to-world affine")
    return Volume(array, affine)


def sidecar_path(path: Path) -> Path:
    """`case.nii.gz` -> `case.json` (BIDS-style sidecar next to the label map)."""
    name = path.name
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(name + ".json")


def write_label_nifti(labels: np.ndarray, affine: np.ndarray, path: str | Path,
                      class_names: Sequence[str]) -> Path:
    """Write uint8 labels with the source affine, plus a JSON sidecar {index: class name}.

    Returns the image path. The sidecar is written first so that a present image always has
    its class names next to it.
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise NiftiError(f"{path}: output name must end in .nii or .nii.gz")
    if labels.ndim != 3:
        raise NiftiError(f"{path}: labels must be 3D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and int(labels.min()) < 0):
        raise NiftiError(f"{path}: labels must be non-negative integers, got {labels.dtype}")
    if len(class_names) > 256:
        raise NiftiError(f"{path}: {len(class_names)} classes do not fit a uint8 label map")
    if labels.size and int(labels.max()) >= len(class_names):
        raise NiftiError(f"{path}: label {int(labels.max())} has no class name "
                         f"({len(class_names)} classes)")
    img = nib.Nifti1Image(np.asarray(labels, dtype=np.uint8), np.asarray(affine, dtype=np.float64))
    img.set_data_dtype(np.uint8)
    img.header.set_xyzt_units("mm")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    sidecar = {"labels": {str(i): name for i, name in enumerate(class_names)}}
    atomic_write(sidecar_path(path),
                  lambda tmp: tmp.write_text(json.dumps(sidecar, indent=2) + "\n"))
    atomic_write(path, lambda tmp: nib.save(img, str(tmp)))
    return path
