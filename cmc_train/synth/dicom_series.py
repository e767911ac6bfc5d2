"""Write a volume as a DICOM series (one CT or MR Image Storage file per slice).

Why: the serving side ingests DICOM, so the synthetic study must also exist as scanner-like
series with exactly the geometry of its NIfTI files. NIfTI affines are RAS, DICOM patient
coordinates LPS: the volume is reoriented to L-P-S voxel axes (the usual axial layout:
rows run left, columns run posterior, slices superior), and the LPS affine
diag(-1, -1, 1) @ A_ras gives ImageOrientationPatient, PixelSpacing and one
ImagePositionPatient per slice. Stored pixel values are integers so that a series read
back reproduces the NIfTI voxels exactly (CT through RescaleSlope 1 / Intercept -1024).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
CT_INTERCEPT = -1024


def deterministic_uid(*parts: object) -> str:
    """A UID derived from `parts` (same study seed and case -> same UIDs on every run)."""
    return str(generate_uid(entropy_srcs=["cmc-synth", *map(str, parts)]))


@dataclass(frozen=True)
class StudyInfo:
    """What the series of one case share: patient, study and frame of reference."""

    patient_id: str
    patient_name: str
    study_uid: str
    frame_of_reference_uid: str
    study_date: str = "20240101"
    study_time: str = "120000"
    study_description: str = "cmc synthetic abdominal phantom"


def _ds(value: float) -> str:
    """A decimal string that fits DICOM's 16-character DS limit."""
    return str(format_number_as_ds(float(value)))


def to_lps_axes(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient (volume, RAS affine) so voxel axes point L, P, S; the world is unchanged."""
    current = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(("L", "P", "S"))
    transform = nib.orientations.ornt_transform(current, target)
    data = nib.orientations.apply_orientation(volume, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, volume.shape)
    return np.ascontiguousarray(data), new_affine


def _modality_attributes(ds: Dataset, modality: str, pixels: np.ndarray) -> np.ndarray:
    """Set the CT or MR Image module and return the stored (unsigned integer) pixels."""
    if modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = "120"
        ds.RescaleIntercept = str(CT_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        stored = np.clip(pixels.astype(np.int32) - CT_INTERCEPT, 0, 4095)
        ds.BitsStored, ds.HighBit = 12, 11
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "4000"
        ds.EchoTime = "90"
        ds.EchoTrainLength = "16"
        ds.ImagedNucleus = "1H"
        ds.MagneticFieldStrength = "1.5"
        stored = np.clip(pixels.astype(np.int64), 0, 65535)
        ds.BitsStored, ds.HighBit = 16, 15
    return stored.astype(np.uint16)


def write_dicom_series(volume: np.ndarray, affine: np.ndarray, out_dir: Path, modality: str,
                       study: StudyInfo, series_number: int, description: str) -> list[Path]:
    """Write `volume` (integer HU for CT, non-negative integers for MR) with RAS `affine`.

    Returns the written files (one per slice, IM_0001.dcm, ...). UIDs derive from the
    study UID, the series number and the slice index, so reruns give identical files.
    """
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be CT or MR, got {modality!r}")
    if volume.ndim != 3:
        raise ValueError(f"need a 3D volume, got shape {volume.shape}")
    data, ras = to_lps_axes(volume, affine)
    lps = _RAS_TO_LPS @ ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    normal = np.cross(row_dir, col_dir)
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    series_uid = deterministic_uid(study.study_uid, series_number)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(data.shape[2]):
        position = lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + lps[:3, 3]
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = deterministic_uid(series_uid, k)
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.study_date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = study.study_time
        ds.AccessionNumber = ""
        ds.Modality = modality
        ds.Manufacturer = "cmc"
        ds.ManufacturerModelName = "synthetic phantom"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study.study_description
        ds.SeriesDescription = description
        ds.PatientName = study.patient_name
        ds.PatientID = study.patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "ABDOMEN"
        ds.SliceThickness = _ds(spacing[2])
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study.study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = str(series_number)
        ds.AcquisitionNumber = "1"
        ds.InstanceNumber = str(k + 1)
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
        ds.FrameOfReferenceUID = study.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(position @ normal))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        # Slice k: rows follow voxel axis j (column direction), columns axis i (row direction).
        pixels = data[:, :, k].T
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
        ds.BitsAllocated = 16
        ds.PixelRepresentation = 0
        stored = _modality_attributes(ds, modality, pixels)
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = out_dir / f"IM_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
