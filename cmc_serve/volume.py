"""An image volume in RAS world space: a voxel array plus its voxel -> world affine.

Every reader in `cmc_serve` (NIfTI, DICOM) produces a `Volume` whose affine maps voxel indices
(i, j, k) to RAS millimetres, so that pre-processing, resampling and writing never have to
guess a convention (orientation and flip errors are the most reported bug class in the tools
our users know). `Grid` is the geometry alone; it is what resampling steps pass around.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cmc_common.errors import CmcError

# Flips the x and y axes: DICOM/ITK world is LPS, NIfTI/MONAI world is RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Voxels counted at once by `count_labels`.
_COUNT_CHUNK = 1 << 22


class VolumeError(CmcError, ValueError):
    """A volume whose array or affine cannot describe a 3D image."""


def _check_affine(affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise VolumeError(f"affine must be 4x4, got {affine.shape}")
    if not np.all(np.isfinite(affine)):
        raise VolumeError("affine has non-finite entries")
    if not np.allclose(affine[3], [0.0, 0.0, 0.0, 1.0]):
        raise VolumeError(f"affine last row must be [0, 0, 0, 1], got {affine[3].tolist()}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError("affine is singular (zero voxel size or collinear axes)")
    return affine


@dataclass(frozen=True)
class Grid:
    """Voxel grid geometry: array shape and voxel -> RAS world (mm) affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise VolumeError(f"grid shape must be 3 positive ints, got {self.shape}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "affine", _check_affine(self.affine))

    @property
    def spacing(self) -> np.ndarray:
        """Voxel edge lengths in mm, in array axis order."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def axcodes(self) -> str:
        """Closest anatomical direction of each array axis, e.g. 'RAS' or 'LPS'."""
        return axcodes(self.affine)

    def world_to_voxel(self) -> np.ndarray:
        """The inverse affine: RAS world (mm) -> continuous voxel index."""
        return np.linalg.inv(self.affine)

    def same_as(self, other: Grid, atol: float = 1e-4) -> bool:
        """True when both grids place every voxel at the same world position."""
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol)


def axcodes(affine: np.ndarray) -> str:
    """Closest RAS axis code of each voxel axis (nibabel's convention, without the import)."""
    letters = (("L", "R"), ("P", "A"), ("I", "S"))
    out = []
    for col in np.asarray(affine, dtype=np.float64)[:3, :3].T:
        world_axis = int(np.argmax(np.abs(col)))
        out.append(letters[world_axis][int(col[world_axis] > 0)])
    return "".join(out)


@dataclass(frozen=True)
class Volume:
    """A 3D image: `array[i, j, k]` with `affine @ [i, j, k, 1]` = RAS world position (mm)."""

    array: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise VolumeError(f"volume array must be 3D, got shape {self.array.shape}")
        object.__setattr__(self, "affine", _check_affine(self.affine))

    @property
    def grid(self) -> Grid:
        return Grid(tuple(self.array.shape), self.affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid.shape

    @property
    def spacing(self) -> np.ndarray:
        return self.grid.spacing

    def with_array(self, array: np.ndarray) -> Volume:
        """The same geometry holding another array (e.g. labels for this image)."""
        if array.shape != self.array.shape:
            raise VolumeError(f"array shape {array.shape} differs from volume shape {self.shape}")
        return Volume(array, self.affine)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def release_free_memory() -> None:
    """Give the pages of freed memory back to the operating system now.

    Slice-sized arrays (a 512 x 512 float32 slice is 1 MiB) are below glibc's dynamic mmap
    threshold once a larger block has been freed, so they come from the heap, and freeing
    them one by one (as a series is assembled into its volume) leaves their pages resident:
    the peak RSS would hold the slices and the volume at once. glibc's malloc_trim(0) returns
    every whole free page of every arena; elsewhere this does nothing.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def count_labels(labels: np.ndarray, length: int) -> np.ndarray:
    """Voxels of each value 0..length-1 of a non-negative integer array (larger values are
    not counted), in chunks: np.bincount widens its whole input to int64, 8 bytes per
    voxel of a uint8 label map."""
    flat = labels.reshape(-1)
    counts = np.zeros(length, dtype=np.int64)
    for start in range(0, flat.size, _COUNT_CHUNK):
        counts += np.bincount(flat[start:start + _COUNT_CHUNK], minlength=length)[:length]
    return counts
