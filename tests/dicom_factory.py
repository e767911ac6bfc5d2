"""Write small, valid synthetic CT series with pydicom, and broken variants of them.

Tests need DICOM with known geometry and specific defects (a missing slice, duplicate
positions, gantry tilt, ...); real scanner data has only a few fixed cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT_UID = "1.2.826.0.1.3680043.8.498."


@dataclass
class SeriesSpec:
    """Geometry and content of a synthetic series (defaults: an axial 12x10 CT of 6 slices)."""

    rows: int = 10
    cols: int = 12
    n_slices: int = 6
    pixel_spacing: tuple[float, float] = (0.8, 0.7)  # (between rows, between columns)
    slice_spacing: float = 2.5
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    origin: tuple[float, float, float] = (-20.0, -30.0, 40.0)
    slope: float = 1.0
    intercept: float = -1024.0
    photometric: str = "MONOCHROME2"
    modality: str = "CT"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    description: str = "synthetic abdomen"
    series_number: int = 2
    series_uid: str = field(default_factory=lambda: generate_uid(ROOT_UID))
    study_uid: str = "1.2.826.0.1.3680043.8.498.1"
    seed: int = 0

    def normal(self) -> np.ndarray:
        o = np.asarray(self.orientation)
        return np.cross(o[:3], o[3:])

    def positions(self) -> list[np.ndarray]:
        """Slice origins along the normal (as a scanner writes them)."""
        return [np.asarray(self.origin) + k * self.slice_spacing * self.normal()
                for k in range(self.n_slices)]

    def stored_values(self) -> np.ndarray:
        """Stored pixel values [slice, row, column], uint16, varying along every axis."""
        rng = np.random.default_rng(self.seed)
        k, r, c = np.indices((self.n_slices, self.rows, self.cols))
        base = 1000 + 40 * k + 7 * r + 3 * c + rng.integers(0, 5, size=k.shape)
        return base.astype(np.uint16)


def make_dataset(spec: SeriesSpec, index: int, position: Sequence[float],
                 pixels: np.ndarray) -> Dataset:
    """One CT slice (a complete, valid CT Image Storage instance)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(ROOT_UID)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = "PHANTOM-1"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = spec.study_uid
    ds.StudyID = "1"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "A1"
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = spec.series_uid
    ds.SeriesNumber = spec.series_number
    ds.SeriesDescription = spec.description
    ds.Modality = spec.modality
    ds.Manufacturer = "cmc-tests"
    ds.FrameOfReferenceUID = spec.study_uid + ".9"
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = spec.n_slices - index  # reversed: loaders must not sort by it
    ds.ImageType = list(spec.image_type)
    ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6g}" for v in spec.orientation]
    ds.PixelSpacing = [f"{v:.6g}" for v in spec.pixel_spacing]
    ds.SliceThickness = f"{spec.slice_spacing:.6g}"
    ds.KVP = "120"
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = spec.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = f"{spec.slope:.6g}"
    ds.RescaleIntercept = f"{spec.intercept:.6g}"
    ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    return ds


def write_series(folder: Path, spec: SeriesSpec | None = None,
                 positions: Sequence[Sequence[float]] | None = None,
                 shuffle: bool = True, prefix: str = "IM") -> list[Path]:
    """Write the series as one file per slice; file order shuffled so sorting is tested."""
    spec = spec or SeriesSpec()
    folder.mkdir(parents=True, exist_ok=True)
    positions = list(positions) if positions is not None else spec.positions()
    values = spec.stored_values()
    order = np.random.default_rng(spec.seed + 1).permutation(len(positions)) if shuffle \
        else np.arange(len(positions))
    paths = []
    for file_no, k in enumerate(order):
        ds = make_dataset(spec, int(k), positions[k], values[k % len(values)])
        path = folder / f"{prefix}{file_no:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
