"""cmc_serve.dicom.seg_writer: standard-valid SEGs that put each label on the right pixel."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_checks import dciodvfy_errors
from dicom_factory import CT5N, SeriesSpec, load_only_series, write_series

from cmc_serve.dicom import DicomSegError, LoadedSeries
from cmc_serve.dicom.derived import TYPE2_ATTRIBUTES as TYPE2
from cmc_serve.dicom.derived import Provenance
from cmc_serve.dicom.seg_writer import write_dicom_seg

CLASSES = ["background", "liver", "spleen", "left kidney", "lesion"]


def phantom_labels(shape: tuple[int, int, int]) -> np.ndarray:
    """Asymmetric blocks (any flip or transpose of the SEG would move them)."""
    labels = np.zeros(shape, np.uint8)
    labels[1:6, 2:5, 1:3] = 1
    labels[7:9, 6:9, 2:] = 2
    labels[3, 8, 0] = 4
    return labels


def read_back(path: Path, loaded: LoadedSeries) -> np.ndarray:
    """The SEG as class indices on the source grid [column, row, slice] via highdicom."""
    seg = hd.seg.segread(path)
    uids = [ds.SOPInstanceUID for ds in loaded.datasets]
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=False,
        assert_missing_frames_are_empty=True)  # (slice, row, column, segment)
    out = np.zeros(masks.shape[:3], np.uint8)
    for number in range(1, masks.shape[3] + 1):
        label = CLASSES.index(seg.get_segment_description(number).segment_label)
        out[masks[..., number - 1] > 0] = label
    return out.transpose(2, 1, 0)


def test_seg_for_real_ct_series_is_valid_and_round_trips(tmp_path: Path) -> None:
    loaded = load_only_series(CT5N)
    labels = phantom_labels(loaded.volume.shape)
    out = write_dicom_seg(labels, loaded.datasets, CLASSES, tmp_path / "out" / "seg.dcm")
    assert dciodvfy_errors(out) == []
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind
    seg = hd.seg.segread(out)
    assert seg.SegmentationType == "BINARY"
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["liver", "spleen", "lesion"]
    liver = seg.SegmentSequence[0]
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"
    assert seg.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Lesion"
    assert liver.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "CMC cmc"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == loaded.info.uid
    assert seg.StudyInstanceUID == loaded.datasets[0].StudyInstanceUID
    # empty frames are omitted: 2 + 3 + 1 non-empty (slice, segment) pairs
    assert int(seg.NumberOfFrames) == 6
    np.testing.assert_array_equal(read_back(out, loaded), labels)


@pytest.mark.parametrize("orientation", [(0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
                                         (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)])
def test_seg_geometry_follows_sorted_slices(tmp_path: Path, orientation: tuple) -> None:
    """Shuffled files, reversed InstanceNumbers, sagittal or flipped planes: the label lands on
    the source voxel it was made for, and the SEG's frame positions are the images' positions."""
    write_series(tmp_path / "s", SeriesSpec(orientation=orientation, rows=12, cols=10))
    loaded = load_only_series(tmp_path / "s")
    labels = phantom_labels(loaded.volume.shape)
    out = write_dicom_seg(labels, loaded.datasets, CLASSES, tmp_path / "seg.dcm")
    assert dciodvfy_errors(out) == []
    np.testing.assert_array_equal(read_back(out, loaded), labels)
    seg = pydicom.dcmread(out)
    by_uid = {ds.SOPInstanceUID: ds for ds in loaded.datasets}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in by_uid[ref].ImagePositionPatient], atol=1e-4)


def test_seg_refusals(tmp_path: Path) -> None:
    loaded = load_only_series(CT5N)
    shape = loaded.volume.shape
    with pytest.raises(DicomSegError, match=r"labels shape \(5, 16, 16\) does not match"):
        write_dicom_seg(np.zeros((5, 16, 16), np.uint8), loaded.datasets, CLASSES,
                        tmp_path / "a.dcm")
    with pytest.raises(DicomSegError, match="no foreground voxels"):
        write_dicom_seg(np.zeros(shape, np.uint8), loaded.datasets, CLASSES, tmp_path / "b.dcm")
    with pytest.raises(DicomSegError, match="label 4 has no class name"):
        write_dicom_seg(phantom_labels(shape), loaded.datasets, CLASSES[:3], tmp_path / "c.dcm")
    assert list(tmp_path.iterdir()) == []


def test_flagged_seg_says_needs_review(tmp_path: Path) -> None:
    """Quality control's verdict reaches the PACS series list (DICOM LO: 64 characters): with
    the mode when both fit, the review alone when they do not."""
    loaded = load_only_series(CT5N)
    labels = phantom_labels(loaded.volume.shape)
    fused = Provenance(modalities=("ct", "mr"), mode="fused")
    short = "needs review: branch_disagreement"
    out = write_dicom_seg(labels, loaded.datasets, CLASSES, tmp_path / "a.dcm",
                          provenance=fused, review=short)
    seg = pydicom.dcmread(out)
    assert seg.SeriesDescription == f"CMC CT+MR fused, {short}" == seg.ContentDescription
    assert dciodvfy_errors(out) == []
    long = "needs review: branch_disagreement, intensity_out_of_range, +2"
    out = write_dicom_seg(labels, loaded.datasets, CLASSES, tmp_path / "b.dcm",
                          provenance=fused, review=long)
    seg = pydicom.dcmread(out)
    assert seg.SeriesDescription == long == seg.ContentDescription


def test_seg_codes_laterality_and_provenance(tmp_path: Path) -> None:
    """The demo's kidney_r / kidney_l are Kidney with a Right / Left modifier (SegDB), and
    the SEG names the model, its checksum and the mode; series numbers differ per mode."""
    loaded = load_only_series(CT5N)
    classes = ["background", "liver", "spleen", "kidney_r", "kidney_l"]
    labels = phantom_labels(loaded.volume.shape)
    labels[0, 0, 0] = 3
    sha = "ab" * 32
    numbers = set()
    for mode, text in (("fused", "CT+MR fused"), ("a", "CT only"), ("b", "MR only")):
        provenance = Provenance(model_name="demo", model_sha256=sha, modalities=("ct", "mr"),
                                mode=mode, runtime="openvino", precision="bf16")
        out = write_dicom_seg(labels, loaded.datasets, classes, tmp_path / f"{mode}.dcm",
                              provenance=provenance)
        seg = pydicom.dcmread(out)
        assert seg.SeriesDescription == f"CMC segmentation, {text}"
        numbers.add(int(seg.SeriesNumber))
    assert numbers == {300, 301, 302}
    assert dciodvfy_errors(out) == []
    right = seg.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0]
    assert (right.CodeValue, right.CodeMeaning) == ("64033007", "Kidney")
    assert right.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "CMC demo"
    assert f"model_sha256={sha}" in algorithm.AlgorithmParameters
    assert "mode=b" in algorithm.AlgorithmParameters
    described = hd.seg.segread(out).get_segment_description(3)
    assert described.segmented_property_type.value == "64033007"


def test_series_without_type2_attributes_is_written_with_them_empty(
        tmp_path: Path, model_dir: Path) -> None:
    """Some anonymisers remove PatientBirthDate, PatientSex, StudyID, AccessionNumber and
    ReferringPhysicianName instead of emptying them: the SEG, RTSTRUCT and report are written
    with them empty (as the standard allows), the source files are left as they were, and
    the case record says so."""
    import json

    import segment_fixtures as fx

    removed = ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
               "ReferringPhysicianName")
    folder = tmp_path / "ct"
    for path in fx.write_phantom_series(folder, fx.ct_spec("1.2.826.0.1.3680043.8.498.95")):
        ds = pydicom.dcmread(path)
        for keyword in removed:
            delattr(ds, keyword)
        ds.save_as(path, enforce_file_format=True)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    r = fx.segment(folder, "-o", tmp_path / "out", "--model", model_dir, "--runtime",
                   "onnxruntime", "--output-type", "auto,rtstruct,sr")
    assert r.exit_code == 0, r.output
    (case,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    record = json.loads((case / "done").read_text())
    (warning,) = [w for w in record["warnings"] if "Type 2" in w]
    assert warning == ("seg.dcm, rtstruct.dcm, sr.dcm: the source series lacks the Type 2 "
                       "attributes " + ", ".join(sorted(removed, key=TYPE2.index))
                       + "; written empty, as the standard allows")
    assert "Type 2 attributes" in r.stderr  # said on the console too
    for name in ("seg.dcm", "rtstruct.dcm", "sr.dcm"):
        written = pydicom.dcmread(case / name, stop_before_pixels=True)
        assert all(keyword in written and not written[keyword].value for keyword in removed)
        assert dciodvfy_errors(case / name) == []
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
