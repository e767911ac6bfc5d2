"""NIfTI in and out: read an image into a `Volume`, write a uint8 label map beside its source.

Reading refuses anything that would give silently wrong output later (4D series, NaN/inf
voxels, an all-zero image) with a one-line `NiftiError` naming the file. Writing is atomic
(`cmc_common.files.atomic_write`: temporary name + rename) so a crashed or interrupted run
never leaves a half-written file that a batch restart would take for a finished case.

Geometry is taken from the header only when the header states it unambiguously:
- the sform when sform_code > 0, else the qform when qform_code > 0;
- neither (qform_code = sform_code = 0): the file states no orientation, and readers
  disagree about one (nibabel's fallback flips left and right), so it is refused unless the
  caller supplies the axis codes (`assume_orientation`, `--assume-orientation`); the
  origin is then the volume centre, and the label map is written back with codes 0 like its
  input, so both overlay in any viewer and neither claims an orientation;
- zero, negative or non-finite pixdims, or a singular or non-finite sform/qform: refused;
- sform and qform both stated but pointing their axes differently (a mirror or rotation
  between the two): refused, since which one a tool reads decides left from right; both
  stated with the same axis directions but placing the volume corners more than
  SFORM_QFORM_TOL_MM apart: the sform is used (as nibabel and MONAI, the training loader, do)
  and a warning goes to the case's report.

A BIDS-style JSON sidecar beside the image (`case.nii.gz` -> `case.json`) may say whose the
image is: the DICOM keywords IDENTITY_KEYS are read (other keys are ignored) and used by
`cmc_serve.compatibility` to refuse combining images of different patients or frames of
reference.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

from cmc_common.errors import CmcError
from cmc_common.files import atomic_write
from cmc_serve.compatibility import parse_axis_codes
from cmc_serve.volume import Volume, axcodes

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# sform and qform placing a volume corner further apart than this disagree (mm); float32
# storage of the two forms differs by ~1e-4 mm on a 500 mm field of view.
SFORM_QFORM_TOL_MM = 0.01
# Keys of the identity sidecar (DICOM keywords), see the module docstring.
IDENTITY_KEYS = ("PatientID", "IssuerOfPatientID", "FrameOfReferenceUID")
# World axis and sign of each axis code letter (RAS world).
_CODE_AXES = {"L": (0, -1.0), "R": (0, 1.0), "P": (1, -1.0), "A": (1, 1.0), "I": (2, -1.0),
              "S": (2, 1.0)}


class NiftiError(CmcError, ValueError):
    """A NIfTI file that cannot be used as a segmentation input or output."""


def is_nifti_path(path: Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


@dataclass(frozen=True)
class NiftiImage:
    """A NIfTI image as read: the volume, which header field its affine came from
    ("sform", "qform", or "assumed" from the caller's axis codes), and geometry warnings."""

    volume: Volume
    affine_source: str
    warnings: tuple[str, ...] = ()

    @property
    def orientation_stated(self) -> bool:
        return self.affine_source != "assumed"


def read_nifti(path: str | Path, assume_orientation: str | None = None) -> Volume:
    """Read a 3D NIfTI image as float32 with its RAS affine (see the module docstring)."""
    return load_nifti(path, assume_orientation).volume


def load_nifti(path: str | Path, assume_orientation: str | None = None) -> NiftiImage:
    """Read a 3D NIfTI image, its affine's origin and the header's geometry warnings.

    `assume_orientation` (axis codes such as "LPS") is used only when the header states no
    orientation at all; a stated orientation is never overridden.
    """
    path = Path(path)
    if assume_orientation is not None:
        assume_orientation = parse_axis_codes(assume_orientation)
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
    _check_voxel_sizes(img, path)
    _check_declared_size(path, img, shape)
    affine, source, warnings = _header_affine(img.header, shape, path, assume_orientation)
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
    return NiftiImage(Volume(array, affine), source, warnings)


def _check_voxel_sizes(img: Any, path: Path) -> None:
    """Refuse zero, negative or non-finite pixdim[1:4] as stored: nibabel's loader silently
    replaces them (abs, 1), which would hide a header that contradicts itself."""
    with ImageOpener(str(path)) as f:
        stored = type(img.header).from_fileobj(f, check=False)
    zooms = np.asarray(stored["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise NiftiError(f"{path}: header voxel sizes (pixdim) {zooms.tolist()} are zero, "
                         "negative or not finite: its geometry cannot be trusted")


def _header_affine(header: Any, shape: tuple[int, ...], path: Path,
                   assume_orientation: str | None) -> tuple[np.ndarray, str, tuple[str, ...]]:
    """(affine, "sform" | "qform" | "assumed", warnings) by the rules of the module docstring."""
    zooms = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    stated = {}
    for name in ("sform", "qform"):
        code = int(header[f"{name}_code"])
        if code > 0:
            affine = np.asarray(getattr(header, f"get_{name}")(), dtype=np.float64)
            if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
                raise NiftiError(f"{path}: the header's {name} (code {code}) is singular or not "
                                 "finite: no usable voxel-to-world affine")
            stated[name] = affine
    if not stated:
        if assume_orientation is None:
            raise NiftiError(f"{path}: the header states no orientation (qform_code = "
                             "sform_code = 0); readers disagree on left and right for such a "
                             "file, so it would be segmented mirrored; pass "
                             "--assume-orientation with its axis codes (e.g. LPS, RAS) if "
                             "you know them")
        return _assumed_affine(assume_orientation, zooms, shape), "assumed", ()
    if len(stated) == 1:
        ((name, affine),) = stated.items()
        return affine, name, ()
    sform, qform = stated["sform"], stated["qform"]
    if axcodes(sform) != axcodes(qform):
        raise NiftiError(f"{path}: the header's sform ({axcodes(sform)}) and qform "
                         f"({axcodes(qform)}) point the axes in different directions: a tool "
                         "reading one sees the image mirrored or rotated against a tool "
                         "reading the other; fix the header")
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)])
    apart = float(np.max(np.linalg.norm((corners @ (sform - qform).T)[:, :3], axis=1)))
    if apart <= SFORM_QFORM_TOL_MM:
        return sform, "sform", ()
    return sform, "sform", (f"{path}: the header's sform and qform place the volume up to "
                            f"{apart:.2f} mm apart; the sform is used (as nibabel and MONAI, "
                            "the training loader, read it); a tool that prefers the qform "
                            "places the image elsewhere",)


def _assumed_affine(codes: str, zooms: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Axis codes and voxel sizes -> RAS affine centred on the world origin."""
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for i, code in enumerate(codes):
        axis, sign = _CODE_AXES[code]
        affine[axis, i] = sign * zooms[i]
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape[:3], dtype=np.float64) - 1) / 2)
    return affine


def read_identity(path: Path) -> dict[str, str]:
    """IDENTITY_KEYS from the image's JSON sidecar ({} when there is none)."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return {}
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        raise NiftiError(f"{sidecar}: the sidecar of {path.name} is not readable JSON "
                         f"({exc})") from exc
    if not isinstance(data, dict):
        raise NiftiError(f"{sidecar}: the sidecar of {path.name} must be a JSON object")
    identity = {}
    for key in IDENTITY_KEYS:
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise NiftiError(f"{sidecar}: {key} must be a string, got {value!r}")
        identity[key] = str(value)
    return identity


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
                      class_names: Sequence[str], orientation_stated: bool = True) -> Path:
    """Write uint8 labels with the source affine, plus a JSON sidecar {index: class name}.

    Returns the image path. The sidecar is written first so that a present image always has
    its class names next to it. `orientation_stated=False` (the input stated none) writes
    qform_code = sform_code = 0 and the voxel sizes only, like the input.
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
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.asarray(labels, dtype=np.uint8), affine if orientation_stated
                          else None)
    img.set_data_dtype(np.uint8)
    img.header.set_xyzt_units("mm")
    if orientation_stated:
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
    else:
        img.header.set_zooms(tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(0))))
    sidecar = {"labels": {str(i): name for i, name in enumerate(class_names)}}
    atomic_write(sidecar_path(path),
                  lambda tmp: tmp.write_text(json.dumps(sidecar, indent=2) + "\n"))
    atomic_write(path, lambda tmp: nib.save(img, str(tmp)))
    return path
