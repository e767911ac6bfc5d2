"""Write labels as a DICOM RT Structure Set (RTSTRUCT), what radiotherapy systems read.

Built on pydicom alone. rt-utils (the library TotalSegmentator uses) was tried on a real CT
series: its files fail dciodvfy (Contour Data values longer than the 16 characters of DS,
Type 2 attributes absent, no Frame of Reference module) and it needs OpenCV, whose
iso-contours through pixel centres lose area on small structures; highdicom and pydicom
write no RTSTRUCT. Here:
- one ROI per foreground class present, named by the class, coded (RT ROI Identification
  Code Sequence, laterality as a modifier) and coloured from `cmc_serve.dicom.codes`;
- per slice, the pixel-edge polygons of `cmc_serve.dicom.contours` in patient coordinates
  (CLOSED_PLANAR; holes and further components are further polygons, filled by the
  even-odd rule), each referencing its image (Contour Image Sequence);
- the source series referenced through Referenced Frame of Reference > RT Referenced Study >
  RT Referenced Series > Contour Image Sequence, listing every image;
- provenance as for the SEG (`derived.Provenance`): ROI generation AUTOMATIC with the
  algorithm, series number and description per mode, "needs review" when flagged.
Written under a temporary name and renamed, like every cmc output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ImplicitVRLittleEndian

from cmc_common.files import atomic_write
from cmc_serve import __version__
from cmc_serve.dicom.codes import GENERIC, ClassCode, resolve
from cmc_serve.dicom.contours import mask_contours
from cmc_serve.dicom.derived import TYPE2_ATTRIBUTES, Provenance, complete_type2
from cmc_serve.dicom.errors import DicomSegError
from cmc_serve.dicom.multiframe import frame_slices, source_frame_order
from cmc_serve.dicom.seg_writer import check_labels

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
# The Referenced SOP Class of RT Referenced Study items: Detached Study Management (retired),
# which the RT modules still name and RT systems expect.
STUDY_REFERENCE_CLASS = "1.2.840.10008.3.1.2.3.1"
CONTOUR_DATA = Tag(0x3006, 0x0050)
_COPIED = (*TYPE2_ATTRIBUTES, "IssuerOfPatientID", "StudyInstanceUID", "StudyDescription",
           "FrameOfReferenceUID", "PositionReferenceIndicator")


class RtStructError(DicomSegError):
    """Labels or source images that cannot be written as an RTSTRUCT."""


@dataclass(frozen=True)
class _SourceSlice:
    """One slice of the source, in label order: the image (and frame) it is, and its plane
    (pixel-corner coordinates -> patient coordinates, mm)."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None  # 1-based, for a frame of a multi-frame instance
    origin: np.ndarray
    axes: np.ndarray  # x: column index, along the row direction; y: row index

    def to_patient(self, corners: np.ndarray) -> np.ndarray:
        return self.origin + corners @ self.axes

    def reference(self) -> Dataset:
        """A Contour Image Sequence item naming this image (and frame)."""
        item = Dataset()
        item.ReferencedSOPClassUID = self.sop_class_uid
        item.ReferencedSOPInstanceUID = self.sop_instance_uid
        if self.frame_number is not None:
            item.ReferencedFrameNumber = self.frame_number
        return item


def _source_slices(datasets: Sequence[Dataset], where: Path) -> list[_SourceSlice]:
    """The slices in label order: single-frame files as given, or the frames of one
    Enhanced multi-frame instance in slice order (referenced by frame number)."""
    order = source_frame_order(datasets)
    slices = [s for i, ds in enumerate(datasets) for s in frame_slices(ds, where, i)]
    if order is not None:
        slices = [slices[k] for k in order]
    out = []
    for piece in slices:
        ds = datasets[piece.source]
        try:
            origin = np.array([float(v) for v in piece.position])
            iop = [float(v) for v in piece.orientation]
            row_spacing, column_spacing = (float(v) for v in piece.pixel_spacing)
        except (TypeError, ValueError) as exc:
            raise RtStructError(f"{where}: source image {piece.name} "
                                f"({ds.get('SOPInstanceUID', '?')}) has no usable plane "
                                f"geometry ({exc})") from None
        out.append(_SourceSlice(
            ds.SOPClassUID, ds.SOPInstanceUID, piece.frame + 1 if order is not None else None,
            origin, np.array([np.array(iop[:3]) * column_spacing,
                              np.array(iop[3:]) * row_spacing])))
    return out


def _contour_data(points: np.ndarray) -> RawDataElement:
    """Contour Data as one encoded DS value: numbers of at most 16 characters, micrometre
    resolution. Encoded here, not by pydicom, which converts and validates every number
    (90 % of the writing time of a large structure set)."""
    text = "\\".join(_ds(float(v)) for v in points.ravel())
    value = text.encode("ascii") + (b" " if len(text) % 2 else b"")
    return RawDataElement(CONTOUR_DATA, "DS", len(value), value, 0, True, True)


def _ds(number: float) -> str:
    text = f"{number:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _code_item(code: ClassCode) -> Dataset:
    item = hd.sr.CodedConcept.from_code(code.type)
    if code.modifier is not None:
        item.SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(code.modifier)]
    return item


def _header(source: Dataset, provenance: Provenance, review: str | None) -> Dataset:
    now = datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_SOP_CLASS, hd.UID()
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), \
        now.strftime("%H%M%S")
    for keyword in _COPIED:
        if keyword in source:
            setattr(ds, keyword, source[keyword].value)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = hd.UID()
    ds.SeriesNumber = provenance.series_number("rtstruct")
    ds.SeriesDate, ds.SeriesTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.SeriesDescription = provenance.series_description("rtstruct", review)
    ds.OperatorsName = None
    ds.InstanceNumber = 1
    ds.Manufacturer, ds.ManufacturerModelName = "cmc", provenance.algorithm_name
    ds.SoftwareVersions, ds.DeviceSerialNumber = __version__, "0"
    ds.StructureSetLabel = "CMC"
    ds.StructureSetName = ds.SeriesDescription
    ds.StructureSetDescription = ", ".join(f"{k}={v}" for k, v in
                                           provenance.parameters().items()) or None
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, \
        ds.InstanceCreationTime
    return ds


def _referenced_frame(sources: Sequence[Dataset], slices: Sequence[_SourceSlice]) -> Dataset:
    series = Dataset()
    series.SeriesInstanceUID = sources[0].SeriesInstanceUID
    series.ContourImageSequence = [piece.reference() for piece in slices]
    study = Dataset()
    study.ReferencedSOPClassUID = STUDY_REFERENCE_CLASS
    study.ReferencedSOPInstanceUID = sources[0].StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = sources[0].FrameOfReferenceUID
    frame.RTReferencedStudySequence = [study]
    return frame


def _contours(labels: np.ndarray, label: int, slices: Sequence[_SourceSlice]
              ) -> list[Dataset]:
    """The contours of `label` on every slice of `labels` ([slice, column, row])."""
    items: list[Dataset] = []
    for k in np.nonzero((labels == label).any(axis=(1, 2)))[0].tolist():
        for corners in mask_contours(labels[k] == label):
            contour = Dataset()
            contour.ContourImageSequence = [slices[k].reference()]
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(corners)
            contour.ContourNumber = len(items) + 1
            contour[CONTOUR_DATA] = _contour_data(slices[k].to_patient(corners))
            items.append(contour)
    return items


def write_rtstruct(labels: np.ndarray, source_datasets: Sequence[Dataset],
                   class_names: Sequence[str], out_path: str | Path, *,
                   codes: Mapping[str, ClassCode] | None = None,
                   provenance: Provenance | None = None,
                   review: str | None = None) -> Path:
    """Write `labels` (as for `write_dicom_seg`: [column, row, slice] on the source grid,
    slices in the order of `source_datasets`) as an RTSTRUCT; the keywords as there."""
    out_path = Path(out_path)
    present = check_labels(labels, source_datasets, class_names, out_path,
                           RtStructError)
    if "FrameOfReferenceUID" not in source_datasets[0]:
        raise RtStructError(f"{out_path}: the source series has no FrameOfReferenceUID, which "
                            "an RTSTRUCT must reference")
    codes = resolve(class_names) if codes is None else codes
    provenance = provenance or Provenance()
    sources = complete_type2(source_datasets)
    slices = _source_slices(sources, out_path)
    ds = _header(sources[0], provenance, review)
    ds.ReferencedFrameOfReferenceSequence = [_referenced_frame(sources, slices)]
    rois, contours, observations = [], [], []
    by_slice = np.ascontiguousarray(labels.transpose(2, 0, 1))  # one slice, one memory block
    generation = f"{provenance.algorithm_name} {provenance.cmc_version}"
    for number, cls in enumerate(present, start=1):
        code = codes.get(class_names[cls], GENERIC)
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = ds.FrameOfReferenceUID
        roi.ROIName = class_names[cls][:64]
        roi.ROIDescription = code.meaning[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = generation[:64]
        rois.append(roi)
        contour = Dataset()
        contour.ROIDisplayColor = list(code.color or (255, 0, 0))
        contour.ReferencedROINumber = number
        contour.ContourSequence = _contours(by_slice, cls, slices)
        contours.append(contour)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIIdentificationCodeSequence = [_code_item(code)]
        observation.RTROIInterpretedType = "ORGAN" if code.type != GENERIC.type else None
        observation.ROIInterpreter = None
        observations.append(observation)
    ds.StructureSetROISequence = rois
    ds.ROIContourSequence = contours
    ds.RTROIObservationsSequence = observations
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    # Implicit VR: Contour Data of a long outline can pass the 64 KiB that an explicit-VR
    # DS length field holds (pydicom would silently turn it into UN); RT systems read both.
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    atomic_write(out_path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))
    return out_path
