"""Write a case's measurements as a DICOM SR measurement report (TID 1500, highdicom.sr).

statistics.json holds each structure's volume and mean intensity, but a JSON sidecar never
reaches the PACS; IHE AI Results expects them as a Comprehensive 3D SR beside the SEG. Per
structure in the SEG, one volumetric ROI measurement group (TID 1411) that references the
SEG's segment (by SOP Instance UID and segment number) and the SEG's source series, with:
- Volume (SCT 118565006) in mL (UCUM),
- the mean intensity per modality, Mean (SCT 373098007) as the derivation: CT as Attenuation
  Coefficient (DCM 112031) in Hounsfield units, MR as MR signal intensity (DCM 110852)
  without units (`intensity_concept`; a modality named otherwise has no coded intensity and
  is left out of the report, its numbers stay in statistics.json),
- the structure's codes as finding type and finding site (laterality included), the
  algorithm (`derived.Provenance`) as algorithm identification.
The observer is the device "CMC <model>"; series number and description as for the SEG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.sr.coding import Code

from cmc_common.files import atomic_write
from cmc_serve.dicom.codes import GENERIC, ClassCode, resolve
from cmc_serve.dicom.derived import Provenance, complete_type2
from cmc_serve.dicom.errors import DicomSegError

MILLILITRE = Code("mL", "UCUM", "milliliter")
PROCEDURES = {"CT": dicom_codes.LN.CTUnspecifiedBodyRegion,
              "MR": dicom_codes.LN.MRIUnspecifiedBodyRegion}
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
_MR_NAMES = ("mr", "mri", "t1", "t2", "flair", "dwi", "adc", "pd")


class SrError(DicomSegError):
    """A measurement report that cannot be written (no SEG, no statistics to report)."""


def intensity_concept(modality: str) -> tuple[Code, Code] | None:
    """(concept name, unit) of a mean intensity measured on a modality of this name: "ct"
    -> Attenuation Coefficient in HU; an MR name (mr, t1..., t2..., flair, dwi, adc, pd)
    -> MR signal intensity, no units; else None (no standard concept to say it with)."""
    name = modality.strip().lower()
    if name == "ct":
        return dicom_codes.DCM.AttenuationCoefficient, dicom_codes.UCUM.HounsfieldUnit
    if name.startswith(_MR_NAMES):
        return dicom_codes.DCM.MRSignalIntensity, dicom_codes.UCUM.NoUnits
    return None


def _measurements(stats: Mapping[str, Any]) -> list[hd.sr.Measurement]:
    out = [hd.sr.Measurement(name=dicom_codes.SCT.Volume, value=float(stats["volume_ml"]),
                             unit=MILLILITRE)]
    for modality, values in (stats.get("intensity") or {}).items():
        concept = intensity_concept(modality)
        if concept is None or values is None:
            continue
        out.append(hd.sr.Measurement(name=concept[0], value=float(values["mean"]),
                                     unit=concept[1], derivation=dicom_codes.SCT.Mean))
    return out


def _segment_numbers(seg: Dataset, class_names: Sequence[str], where: Path) -> dict[str, int]:
    """{class name: segment number} of the SEG's segments (labelled by class name)."""
    by_label = {str(s.SegmentLabel): int(s.SegmentNumber) for s in seg.SegmentSequence}
    numbers = {name: by_label[name[:64]] for name in class_names[1:] if name[:64] in by_label}
    if not numbers:
        raise SrError(f"{where}: the SEG has no segment labelled by a class of the model")
    return numbers


def write_measurement_report(seg_path: str | Path, source_datasets: Sequence[Dataset],
                             statistics: Mapping[str, Any], class_names: Sequence[str],
                             out_path: str | Path, *,
                             codes: Mapping[str, ClassCode] | None = None,
                             provenance: Provenance | None = None,
                             review: str | None = None) -> Path:
    """Write the TID 1500 report of the SEG at `seg_path` (written by `write_dicom_seg` from
    `source_datasets`) with the numbers of `statistics` (`pipeline.statistics.
    class_statistics`: volume_ml and intensity means per class); keywords as for the SEG."""
    seg_path, out_path = Path(seg_path), Path(out_path)
    try:
        seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise SrError(f"{out_path}: cannot read the SEG {seg_path} it reports on ({exc})") \
            from None
    codes = resolve(class_names) if codes is None else codes
    provenance = provenance or Provenance()
    sources = complete_type2(source_datasets)
    series = hd.sr.SourceSeriesForSegmentation(sources[0].SeriesInstanceUID)
    algorithm = provenance.sr_algorithm()
    groups = []
    classes = statistics.get("classes", {})
    for name, number in _segment_numbers(seg, class_names, seg_path).items():
        if name not in classes:
            raise SrError(f"{out_path}: no statistics for the segment {name!r}")
        code = codes.get(name, GENERIC)
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=name[:64]),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                segment_number=number, source_series=series),
            finding_type=code.type, algorithm_id=algorithm,
            finding_sites=[hd.sr.FindingSite(code.type, laterality=code.modifier)],
            measurements=_measurements(classes[name])))
    observer = hd.sr.ObserverContext(
        observer_type=dicom_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=provenance.algorithm_name, manufacturer_name="cmc",
            model_name=provenance.algorithm_name))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURES.get(str(sources[0].get("Modality", "")),
                                          IMAGING_PROCEDURE),
        imaging_measurements=groups)
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=[*sources, seg], content=report,
            series_instance_uid=hd.UID(), series_number=provenance.series_number("sr"),
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="cmc",
            series_description=provenance.series_description("sr", review),
            is_complete=True)
    except (ValueError, TypeError, AttributeError) as exc:
        raise SrError(f"{out_path}: highdicom rejected the measurement report: {exc}") \
            from exc
    sr.SeriesDate, sr.SeriesTime = sr.ContentDate, sr.ContentTime
    atomic_write(out_path, lambda tmp: sr.save_as(tmp))
    return out_path
