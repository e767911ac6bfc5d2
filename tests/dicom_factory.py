"""Write small, valid synthetic CT series with pydicom, and broken variants of them.

Tests need DICOM with known geometry and specific defects (a missing slice, duplicate
positions, gantry tilt, ...); real scanner data has only a few fixed cases.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.data
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from cmc_serve.dicom import LoadedSeries, load_series, scan_folder

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
    bits_allocated: int = 16  # 8: stored as uint8 (what JPEG Baseline can hold)
    bits_stored: int | None = None  # None: bits_allocated (12: a 12-bit CT in 16-bit words)
    signed: bool = False  # PixelRepresentation 1 (stored values may be negative)
    position_format: str = ".6g"  # how ImagePositionPatient is written (".2f": two decimals)
    orientation_format: str = ".6g"
    echo_time: float | None = None

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
    ds.ImagePositionPatient = [f"{v:{spec.position_format}}" for v in position]
    ds.ImageOrientationPatient = [f"{v:{spec.orientation_format}}" for v in spec.orientation]
    if spec.echo_time is not None:
        ds.EchoTime = f"{spec.echo_time:g}"
    ds.PixelSpacing = [f"{v:.6g}" for v in spec.pixel_spacing]
    ds.SliceThickness = f"{spec.slice_spacing:.6g}"
    ds.KVP = "120"
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = spec.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = spec.bits_allocated
    ds.BitsStored = spec.bits_stored or spec.bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(spec.signed)
    ds.RescaleSlope = f"{spec.slope:.6g}"
    ds.RescaleIntercept = f"{spec.intercept:.6g}"
    ds.RescaleType = "HU"
    dtype = np.dtype(f"{'i' if spec.signed else 'u'}{spec.bits_allocated // 8}")
    bits = int(ds.BitsStored)
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if spec.signed else (0, (1 << bits) - 1)
    if pixels.min() < low or pixels.max() > high:
        raise ValueError(f"stored values {pixels.min()}..{pixels.max()} do not fit {bits} "
                         f"{'signed' if spec.signed else 'unsigned'} bits")
    ds.PixelData = np.ascontiguousarray(pixels).astype(dtype).tobytes()
    return ds


def write_series(folder: Path, spec: SeriesSpec | None = None,
                 positions: Sequence[Sequence[float]] | None = None,
                 shuffle: bool = True, prefix: str = "IM") -> list[Path]:
    """Write the series as one file per slice; file order shuffled so sorting is tested."""
    spec = spec or SeriesSpec()
    folder.mkdir(parents=True, exist_ok=True)
    origins = list(positions) if positions is not None else spec.positions()
    values = spec.stored_values()
    order = np.random.default_rng(spec.seed + 1).permutation(len(origins)) if shuffle \
        else np.arange(len(origins))
    paths = []
    for file_no, k in enumerate(order):
        ds = make_dataset(spec, int(k), origins[k], values[k % len(values)])
        path = folder / f"{prefix}{file_no:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- other transfer syntaxes

# dcmtk's command per target syntax; dcmcjpeg's default true-lossless codec writes SV1.
DCMTK_ENCODERS: dict[str, tuple[str, ...]] = {
    uid.JPEGLosslessSV1: ("dcmcjpeg", "+e1"),
    uid.JPEGLossless: ("dcmcjpeg", "+el"),
    uid.JPEGBaseline8Bit: ("dcmcjpeg", "+eb", "+sr", "+q", "95"),  # +sr: values kept
    uid.JPEGLSLossless: ("dcmcjpls", "+el"),
    uid.JPEGLSNearLossless: ("dcmcjpls", "+en", "+md", "2"),
    uid.RLELossless: ("dcmcrle",),
    uid.DeflatedExplicitVRLittleEndian: ("dcmconv", "+td"),
}


def recode_dcmtk(paths: Sequence[Path], folder: Path, syntax: str) -> list[Path]:
    """Copies of `paths` in `folder`, written by dcmtk in transfer syntax `syntax`."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        target = folder / path.name
        subprocess.run([*DCMTK_ENCODERS[syntax], str(path), str(target)], check=True,
                       capture_output=True, timeout=60)
        out.append(target)
    return out


def recode_pydicom(paths: Sequence[Path], folder: Path, syntax: str,
                   **encoder_options: Any) -> list[Path]:
    """Copies of `paths` in `folder`, encoded by pydicom's own encoders (JPEG 2000 through
    pylibjpeg-openjpeg, JPEG-LS through pyjpegls, RLE; Deflated is written, not encoded)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        ds = pydicom.dcmread(path)
        if syntax == uid.DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = uid.UID(syntax)
        else:
            ds.compress(syntax, **encoder_options)
        target = folder / path.name
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


def write_enhanced_ct(folder: Path, sources: Sequence[Path], series_number: int = 9) -> Path:
    """One Legacy Converted Enhanced CT instance of the single-frame CT files `sources`
    (highdicom's conversion: per-frame positions, shared orientation, pixel measures and
    rescale)."""
    import highdicom as hd

    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in sources], series_instance_uid=generate_uid(ROOT_UID),
        series_number=series_number, sop_instance_uid=generate_uid(ROOT_UID),
        instance_number=1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    return path


# pydicom's real 5-slice CT series (16 x 16 pixels): the source the DICOM writers' tests use.
CT5N = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


def load_only_series(folder: Path) -> LoadedSeries:
    """The one series `folder` holds, loaded as `cmc segment` loads it."""
    (series,) = scan_folder(folder).series
    return load_series(series)
