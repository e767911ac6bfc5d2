"""cmc_serve.dicom.sr_writer: a TID 1500 measurement report that passes dciodvfy, references
the SEG's segments and the source series, and reads back with highdicom to the numbers of
statistics.json."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_checks import dciodvfy_errors
from dicom_factory import CT5N, load_only_series

from cmc_serve.dicom.derived import Provenance
from cmc_serve.dicom.seg_writer import write_dicom_seg
from cmc_serve.dicom.sr_writer import SrError, intensity_concept, write_measurement_report
from cmc_serve.pipeline.statistics import class_statistics

CLASSES = ["background", "liver", "spleen", "kidney_r", "kidney_l"]


def test_report_is_valid_and_reads_back_to_the_statistics(tmp_path: Path) -> None:
    loaded = load_only_series(CT5N)
    labels = np.zeros(loaded.volume.shape, np.uint8)
    labels[2:12, 2:12, 1:4] = 1
    labels[13:15, 2:9, :] = 3
    labels[13:15, 10:15, 2] = 4  # spleen absent: no segment, no group
    provenance = Provenance(model_name="demo", model_sha256="ef" * 32,
                            modalities=("ct", "mr"), mode="fused")
    seg_path = write_dicom_seg(labels, loaded.datasets, CLASSES, tmp_path / "seg.dcm",
                               provenance=provenance)
    ct = loaded.volume.array
    stats = class_statistics(labels, CLASSES, loaded.volume.affine, {"ct": ct, "mr": ct * 0.5})
    review = "needs review: fov_cut"
    out = write_measurement_report(seg_path, loaded.datasets, stats, CLASSES,
                                   tmp_path / "sr.dcm", provenance=provenance, review=review)
    assert dciodvfy_errors(out) == []
    sr = hd.sr.srread(out)
    seg = pydicom.dcmread(seg_path)
    assert sr.SeriesDescription == f"CMC CT+MR fused, {review}"
    assert int(sr.SeriesNumber) == 320
    assert sr.StudyInstanceUID == loaded.datasets[0].StudyInstanceUID
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["liver", "kidney_r", "kidney_l"]
    numbers = {s.SegmentLabel: s.SegmentNumber for s in seg.SegmentSequence}
    for group in groups:
        name = group.tracking_identifier
        segment, source_series = group.referenced_segment
        (reference,) = segment.ReferencedSOPSequence
        assert reference.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert reference.ReferencedSegmentNumber == numbers[name]
        assert source_series.UID == loaded.info.uid
        expected = stats["classes"][name]
        (volume,) = group.get_measurements(name=pydicom.sr.codedict.codes.SCT.Volume)
        assert volume.value == pytest.approx(expected["volume_ml"])
        assert volume.unit.value == "mL"
        (hu,) = group.get_measurements(name=intensity_concept("ct")[0])
        assert hu.value == pytest.approx(expected["intensity"]["ct"]["mean"])
        assert hu.unit.value == "[hnsf'U]"
        (mr,) = group.get_measurements(name=intensity_concept("mr")[0])
        assert mr.value == pytest.approx(expected["intensity"]["mr"]["mean"])
    site = groups[1].finding_sites[0]
    assert site.value.value == "64033007"
    (laterality,) = site.ContentSequence
    assert laterality.ConceptCodeSequence[0].CodeMeaning == "Right"
    texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
             for item in groups[0][0].ContentSequence if item.ValueType == "TEXT"
             and item.RelationshipType == "HAS CONCEPT MOD"}
    assert texts["Algorithm Name"] == "CMC demo"


def test_intensity_concepts_and_refusals(tmp_path: Path) -> None:
    assert intensity_concept("CT")[1].value == "[hnsf'U]"
    assert intensity_concept("t2_flair")[0].value == "110852"
    assert intensity_concept("pet") is None
    with pytest.raises(SrError, match="cannot read the SEG"):
        write_measurement_report(tmp_path / "missing.dcm", [], {}, CLASSES, tmp_path / "sr.dcm")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("text", "types"), [
    ("auto", ()), ("seg,sr", ("dicom-seg", "sr")), ("nifti,dicom_rtstruct", ("nifti", "rtstruct")),
    ("auto,rtstruct,sr,sr", ("auto", "rtstruct", "sr")), ("dicom-seg, dicom-sr", ("dicom-seg", "sr"))])
def test_output_types_parse(text: str, types: tuple[str, ...]) -> None:
    from cmc_serve.pipeline.api import SegmentOptions, parse_output_types

    assert parse_output_types(text) == types
    assert SegmentOptions(output_types=types).output_types == types


@pytest.mark.parametrize(("text", "problem"), [
    ("nifti,sr", "sr reports on the DICOM SEG's segments; add dicom-seg"),
    ("rtstruct,png", "use auto or a comma list of nifti, dicom-seg, rtstruct, sr"),
    ("", "use auto or a comma list")])
def test_output_types_refused(text: str, problem: str) -> None:
    from cmc_serve.pipeline.api import SegmentOptionError, parse_output_types

    with pytest.raises(SegmentOptionError, match=problem) as info:
        parse_output_types(text)
    assert info.value.option == "output_types"


def test_auto_adds_dicom_types_to_dicom_cases_only() -> None:
    from cmc_serve.pipeline.outputs import resolve_output_types

    assert resolve_output_types((), True) == ("nifti", "dicom-seg")
    assert resolve_output_types(("auto", "rtstruct", "sr"), True) == \
        ("nifti", "dicom-seg", "rtstruct", "sr")
    assert resolve_output_types(("auto", "rtstruct", "sr"), False) == ("nifti",)
    assert resolve_output_types(("rtstruct",), False) == ("rtstruct",)  # required: fails
