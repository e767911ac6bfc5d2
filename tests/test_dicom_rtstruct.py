"""cmc_serve.dicom.rtstruct_writer: standard-valid RTSTRUCTs whose contours, filled again by
an independent reader, give back the labels (holes and several components per slice too)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import segment_fixtures as fx
from dicom_checks import dciodvfy_errors, dice, fill_rtstruct
from dicom_factory import CT5N, SeriesSpec, load_only_series, write_series
from pydicom.sr.codedict import codes

from cmc_serve.dicom.contours import mask_contours
from cmc_serve.dicom.derived import Provenance
from cmc_serve.dicom.rtstruct_writer import RtStructError, write_rtstruct

CLASSES = ["background", "liver", "spleen", "kidney_r", "kidney_l"]


def ring_and_islands(shape: tuple[int, int, int]) -> np.ndarray:
    """A ring (a hole) with an island in the hole, two components of one class on a slice,
    diagonal-only contact, a one-pixel structure and an empty class (spleen)."""
    labels = np.zeros(shape, np.uint8)
    labels[1:10, 1:10, 1:4] = 1
    labels[3:8, 3:8, 1:4] = 0  # hole
    labels[5, 5, 2] = 1  # island inside the hole
    labels[11:13, 1:3, :] = 3
    labels[11:13, 6:8, 2] = 3  # second component of kidney_r on slice 2
    labels[13, 10, 0] = labels[14, 11, 0] = 4  # touching at a corner only
    labels[15, 15, 4] = 4  # one pixel
    return labels


def test_rtstruct_is_valid_references_its_series_and_round_trips(tmp_path: Path) -> None:
    loaded = load_only_series(CT5N)
    labels = ring_and_islands(loaded.volume.shape)
    provenance = Provenance(model_name="demo", model_sha256="cd" * 32, modalities=("ct", "mr"),
                            mode="a")
    out = write_rtstruct(labels, loaded.datasets, CLASSES, tmp_path / "case" / "rtstruct.dcm",
                         provenance=provenance)
    assert dciodvfy_errors(out) == []
    assert list(out.parent.iterdir()) == [out]
    rt = pydicom.dcmread(out)
    assert rt.Modality == "RTSTRUCT" and int(rt.SeriesNumber) == 311
    assert rt.SeriesDescription == "CMC contours, CT only"
    assert [r.ROIName for r in rt.StructureSetROISequence] == ["liver", "kidney_r", "kidney_l"]
    frame = rt.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == loaded.datasets[0].FrameOfReferenceUID
    study = frame.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == loaded.datasets[0].StudyInstanceUID
    series = study.RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == loaded.info.uid
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == \
        [ds.SOPInstanceUID for ds in loaded.datasets]
    kidney = rt.RTROIObservationsSequence[1].RTROIIdentificationCodeSequence[0]
    assert (kidney.CodeValue, kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning) \
        == ("64033007", "Right")
    assert "model_sha256=" + "cd" * 32 in rt.StructureSetDescription
    filled = fill_rtstruct(out, list(loaded.datasets))
    for name, mask in filled.items():
        np.testing.assert_array_equal(mask, labels == CLASSES.index(name))
    # slice 2 of the liver: ring outline, hole outline, island
    liver = rt.ROIContourSequence[0].ContourSequence
    on_slice_2 = [c for c in liver if c.ContourImageSequence[0].ReferencedSOPInstanceUID
                  == loaded.datasets[2].SOPInstanceUID]
    assert len(on_slice_2) == 3


@pytest.mark.parametrize("orientation", [(0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
                                         (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
                                         (0.8, 0.6, 0.0, 0.0, 0.0, -1.0)])
def test_rtstruct_geometry_on_sagittal_flipped_and_oblique_planes(
        tmp_path: Path, orientation: tuple) -> None:
    """Shuffled files, anisotropic pixels: contours land on the source voxels (Dice 1)."""
    write_series(tmp_path / "s", SeriesSpec(orientation=orientation, rows=16, cols=17))
    loaded = load_only_series(tmp_path / "s")
    labels = ring_and_islands(loaded.volume.shape)
    out = write_rtstruct(labels, loaded.datasets, CLASSES, tmp_path / "rt.dcm")
    assert dciodvfy_errors(out) == []
    for name, mask in fill_rtstruct(out, list(loaded.datasets)).items():
        assert dice(mask, labels == CLASSES.index(name)) == 1.0


def test_contours_refill_random_masks_exactly() -> None:
    """Random masks (any holes, touching corners, borders): even-odd filling of the traced
    polygons at pixel centres gives back the mask."""
    from matplotlib.path import Path as PolygonPath

    rng = np.random.default_rng(0)
    for _ in range(100):
        shape = (int(rng.integers(1, 18)), int(rng.integers(1, 18)))
        mask = rng.random(shape) < rng.random()
        xs, ys = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
        centres = np.stack([xs.ravel(), ys.ravel()], axis=1)
        filled = np.zeros(mask.size, bool)
        for polygon in mask_contours(mask):
            assert np.all(np.abs(polygon % 1 - 0.5) < 1e-9)  # vertices on pixel corners
            filled ^= PolygonPath(polygon).contains_points(centres)
        np.testing.assert_array_equal(filled.reshape(shape), mask)


def test_rtstruct_refusals(tmp_path: Path) -> None:
    loaded = load_only_series(CT5N)
    with pytest.raises(RtStructError, match="no foreground voxels"):
        write_rtstruct(np.zeros(loaded.volume.shape, np.uint8), loaded.datasets, CLASSES,
                       tmp_path / "a.dcm")
    sources = [pydicom.Dataset(ds) for ds in loaded.datasets]
    no_frame = []
    for ds in sources:
        copy = pydicom.Dataset()
        copy.update(ds)
        del copy.FrameOfReferenceUID
        no_frame.append(copy)
    with pytest.raises(RtStructError, match="no FrameOfReferenceUID"):
        write_rtstruct(ring_and_islands(loaded.volume.shape), no_frame, CLASSES,
                       tmp_path / "b.dcm")
    assert list(tmp_path.iterdir()) == []


def _case_objects(out: Path) -> tuple[Path, dict]:
    (case,) = [p for p in out.iterdir() if p.is_dir()]
    return case, json.loads((case / "done").read_text())


def test_segment_writes_rtstruct_and_report_beside_the_seg(tmp_path: Path,
                                                           model_dir: Path) -> None:
    """`--output-type auto,rtstruct,sr`: the RTSTRUCT's contours filled again agree with
    seg.nii.gz (Dice >= 0.95 per structure; pixel-edge contours give 1.0), the report's
    volumes are statistics.json's, each mode gets its own series numbers and says its mode,
    and Orthanc stores all three objects and returns them unchanged."""
    from orthanc_fixture import orthanc_server, require_orthanc

    require_orthanc()

    uid = "1.2.826.0.1.3680043.8.498.94"
    ct = fx.ct_spec(uid)
    fx.write_phantom_series(tmp_path / "study" / "ct", ct)
    fx.write_phantom_series(tmp_path / "study" / "mr", fx.mr_spec(uid))
    sources = sorted((pydicom.dcmread(p) for p in (tmp_path / "study" / "ct").iterdir()),
                     key=lambda d: float(d.ImagePositionPatient[2]))
    objects = []
    for mode, numbers, text in (("fused", (300, 310, 320), "CT+MR fused"),
                                ("a", (301, 311, 321), "CT only")):
        out = tmp_path / f"out-{mode}"
        r = fx.segment(tmp_path / "study", "-o", out, "--model", model_dir, "--runtime",
                       "onnxruntime", "--mode", mode, "--output-type", "auto,rtstruct,sr",
                       "--statistics")
        assert r.exit_code == 0, r.output
        case, record = _case_objects(out)
        assert {"seg.nii.gz", "seg.dcm", "rtstruct.dcm", "sr.dcm"} <= set(record["outputs"])
        labels, _ = fx.read_labels(case / "seg.nii.gz")
        filled = fill_rtstruct(case / "rtstruct.dcm", sources)
        assert set(filled) == {fx.CLASSES[k] for k in np.unique(labels) if k}
        for name, mask in filled.items():
            assert dice(mask, labels == fx.CLASSES.index(name)) >= 0.95
        stats = json.loads((case / "statistics.json").read_text())["classes"]
        for group in hd.sr.srread(case / "sr.dcm").content \
                .get_volumetric_roi_measurement_groups():
            (volume,) = group.get_measurements(name=codes.SCT.Volume)
            assert volume.value == pytest.approx(stats[group.tracking_identifier]["volume_ml"])
        for name, number in zip(("seg.dcm", "rtstruct.dcm", "sr.dcm"), numbers, strict=True):
            assert dciodvfy_errors(case / name) == []
            ds = pydicom.dcmread(case / name, stop_before_pixels=True)
            assert int(ds.SeriesNumber) == number and text in ds.SeriesDescription
            objects.append(case / name)

    with contextmanager(orthanc_server)(tmp_path / "orthanc") as pacs:
        ids = [pacs.post("/instances", p.read_bytes())["ID"] for p in objects]
        for path, instance in zip(objects, ids, strict=True):
            assert pacs.get_bytes(f"/instances/{instance}/file") == path.read_bytes()
        modalities = sorted(pacs.get(f"/series/{pacs.get(f'/instances/{i}')['ParentSeries']}")
                            ["MainDicomTags"]["Modality"] for i in ids)
        assert modalities == ["RTSTRUCT", "RTSTRUCT", "SEG", "SEG", "SR", "SR"]


def test_a_contour_longer_than_64_kib_survives(tmp_path: Path) -> None:
    """A double comb of 1-pixel teeth is one polygon of ~4800 corners (Contour Data over the
    64 KiB an explicit-VR DS holds): written whole, valid, and filled back exactly."""
    write_series(tmp_path / "s", SeriesSpec(rows=5, cols=1200, n_slices=2))
    loaded = load_only_series(tmp_path / "s")
    labels = np.zeros(loaded.volume.shape, np.uint8)  # [column, row, slice]
    labels[:, 2, 1] = 1
    labels[::2, 1, 1] = labels[::2, 3, 1] = 1
    out = write_rtstruct(labels, loaded.datasets, CLASSES, tmp_path / "rt.dcm")
    (contour,) = pydicom.dcmread(out).ROIContourSequence[0].ContourSequence
    assert int(contour.NumberOfContourPoints) > 4000
    assert dciodvfy_errors(out) == []
    np.testing.assert_array_equal(fill_rtstruct(out, list(loaded.datasets))["liver"],
                                  labels == 1)


def test_rtstruct_of_an_enhanced_ct_references_its_frames(tmp_path: Path) -> None:
    """An Enhanced (multi-frame) CT source: each contour names the instance and the frame
    whose plane holds it, and filled on the single-frame twin the contours are the labels."""
    from dicom_factory import write_enhanced_ct

    files = write_series(tmp_path / "single", SeriesSpec(rows=16, cols=17))
    write_enhanced_ct(tmp_path / "enhanced", files)
    single, enhanced = load_only_series(tmp_path / "single"), load_only_series(tmp_path / "enhanced")
    (instance,) = enhanced.datasets
    labels = ring_and_islands(enhanced.volume.shape)
    out = write_rtstruct(labels, enhanced.datasets, CLASSES, tmp_path / "rt.dcm")
    assert dciodvfy_errors(out) == []
    for name, mask in fill_rtstruct(out, list(single.datasets)).items():
        np.testing.assert_array_equal(mask, labels == CLASSES.index(name))
    iop = np.array([float(v) for v in single.datasets[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    for roi in pydicom.dcmread(out).ROIContourSequence:
        for contour in roi.ContourSequence:
            (image,) = contour.ContourImageSequence
            assert image.ReferencedSOPInstanceUID == instance.SOPInstanceUID
            frame = instance.PerFrameFunctionalGroupsSequence[image.ReferencedFrameNumber - 1]
            position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
            point = [float(v) for v in contour.ContourData[:3]]
            assert abs((np.array(point) - position) @ normal) < 1e-3
