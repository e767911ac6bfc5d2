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
    _check_declared_size(path, img, shape)
    try:
        array = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except MemoryError as exc:
        raise NiftiError(f"{path}: {_declared(img, shape)}: not enough memory to read it "
                         "as float32") from exc
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


def _gib(n_bytes: int) -> str:
    """A byte count for a message: '1376 bytes', '12.5 MiB', '128 TiB'."""
    if n_bytes < 2**20:
        return f"{n_bytes} bytes"
    unit, scale = next((u, s) for u, s in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20))
                       if n_bytes >= s)
    return f"{n_bytes / scale:.3g} {unit}"


def _declared(img: nib.Nifti1Image, shape: tuple[int, ...]) -> str:
    dtype = img.header.get_data_dtype()
    n_bytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    return (f"header declares {'x'.join(str(s) for s in shape)} voxels of {dtype} "
            f"({_gib(n_bytes)})")


def available_memory() -> int | None:
    """Bytes of memory this process can still get (Linux MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_declared_size(path: Path, img: nib.Nifti1Image, shape: tuple[int, ...]) -> None:
    """Refuse a header whose declared voxel data cannot be in the file or in memory, before
    reading it: a damaged `dim` field otherwise ends in a bare MemoryError (or a memmap
    error) that names neither the header nor the size it claims."""
    voxels = int(np.prod(shape, dtype=np.float64))
    stored = voxels * img.header.get_data_dtype().itemsize
    if not str(path).lower().endswith(".gz"):
        offset = getattr(img.dataobj, "offset", None)  # the image's header copy says 0
        in_file = path.stat().st_size - int(offset or img.header.get_data_offset())
        if in_file < stored:
            raise NiftiError(f"{path}: {_declared(img, shape)} but the file holds "
                             f"{_gib(max(in_file, 0))} of voxel data (truncated file or "
                             "damaged header)")
    memory = available_memory()
    if memory is not None and voxels * 4 > memory:
        raise NiftiError(f"{path}: {_declared(img, shape)}, {_gib(voxels * 4)} as float32, "
                         f"more than the {_gib(memory)} of memory available (damaged header, "
                         "or an image too large for this machine)")


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
