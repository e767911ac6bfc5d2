"""Enhanced (multi-frame) CT and MR in: segmented like the single-frame series they came from.

The enhanced instances are highdicom's legacy conversions of generated phantom series: one
file, per-frame positions in the Per-Frame Functional Groups, shared orientation, pixel
measures and rescale. highdicom writes the frames in InstanceNumber order, which the factory
writes against the slice order, so a loader that stacked frames as stored would flip the
volume. The SEG must reference the multi-frame instance, each SEG frame pointing at the
source frame at its own position.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import segment_fixtures as fx
from dicom_factory import ROOT_UID, write_enhanced_ct
from pydicom.uid import generate_uid

from cmc_serve.dicom import DicomSeriesError, load_series, scan_folder

STUDY_UID = "1.2.826.0.1.3680043.8.498.2702"


def write_enhanced_mr(folder: Path, sources: list[Path]) -> Path:
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        [pydicom.dcmread(p) for p in sources], series_instance_uid=generate_uid(ROOT_UID),
        series_number=15, sop_instance_uid=generate_uid(ROOT_UID), instance_number=1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The single-frame study, and copies with the CT or the MR as one enhanced instance."""
    root = tmp_path_factory.mktemp("studies")
    single = root / "single"
    fx.write_phantom_series(single / "ct", fx.ct_spec(STUDY_UID, slope=2.0))
    fx.write_phantom_series(single / "mr", fx.mr_spec(STUDY_UID))
    ct_files, mr_files = (sorted((single / s).iterdir()) for s in ("ct", "mr"))
    write_enhanced_ct(root / "enhanced_ct" / "ct", ct_files)
    shutil.copytree(single / "mr", root / "enhanced_ct" / "mr")
    write_enhanced_mr(root / "enhanced_mr" / "mr", mr_files)
    shutil.copytree(single / "ct", root / "enhanced_mr" / "ct")
    return {"single": single, "enhanced_ct": root / "enhanced_ct",
            "enhanced_mr": root / "enhanced_mr"}


def _segment(study: Path, out: Path, model_dir: Path) -> tuple[np.ndarray, np.ndarray, Path]:
    r = fx.segment(study, "-o", out, "--model", model_dir, "--runtime", "onnxruntime")
    assert r.exit_code == 0, r.output
    (case,) = [p for p in out.iterdir() if p.is_dir()]
    labels, affine = fx.read_labels(case / "seg.nii.gz")
    return labels, affine, case


@pytest.mark.parametrize("series", ["ct", "mr"])
def test_enhanced_series_loads_as_its_single_frame_source(studies: dict[str, Path],
                                                          series: str) -> None:
    single = load_series(scan_folder(studies["single"] / series).volumes[0])
    info = scan_folder(studies[f"enhanced_{series}"] / series).volumes[0]
    assert (info.n_files, info.n_slices) == (1, single.volume.shape[2])
    enhanced = load_series(info)
    np.testing.assert_array_equal(enhanced.volume.array, single.volume.array)
    np.testing.assert_allclose(enhanced.volume.affine, single.volume.affine, atol=1e-6)
    assert len(enhanced.datasets) == 1 and "PixelData" not in enhanced.datasets[0]


def test_enhanced_ct_segments_to_the_single_frame_labels_and_seg_references_it(
        studies: dict[str, Path], tmp_path: Path, model_dir: Path) -> None:
    expected, affine, _ = _segment(studies["single"], tmp_path / "single", model_dir)
    labels, enhanced_affine, case = _segment(studies["enhanced_ct"], tmp_path / "out",
                                             model_dir)
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_allclose(enhanced_affine, affine, atol=1e-6)

    source = pydicom.dcmread(next((studies["enhanced_ct"] / "ct").iterdir()))
    seg = pydicom.dcmread(case / "seg.dcm")
    (ref_series,) = seg.ReferencedSeriesSequence
    assert [r.ReferencedSOPInstanceUID for r in ref_series.ReferencedInstanceSequence] == \
        [source.SOPInstanceUID]
    source_positions = [[float(v) for v in g.PlanePositionSequence[0].ImagePositionPatient]
                        for g in source.PerFrameFunctionalGroupsSequence]
    z_of_slice = {round(float(affine[2, 3] + k * affine[2, 2]), 3): k
                  for k in range(labels.shape[2])}
    segment_class = {int(s.SegmentNumber): fx.CLASSES.index(s.SegmentLabel)
                     for s in seg.SegmentSequence}
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    seen = np.zeros(labels.shape, dtype=bool)
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ref = group.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, source_positions[int(ref.ReferencedFrameNumber) - 1],
                                   atol=1e-3)
        k = z_of_slice[round(position[2], 3)]  # axial: LPS z is RAS z
        np.testing.assert_array_equal(frame.astype(bool),
                                      expected[:, :, k].T == segment_class[segment])
        seen[:, :, k] |= frame.T.astype(bool)
    np.testing.assert_array_equal(seen, expected > 0)
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy:
        run = subprocess.run([dciodvfy, str(case / "seg.dcm")], capture_output=True, text=True,
                             timeout=60)
        errors = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, errors


def test_enhanced_mr_segments_to_the_single_frame_labels(
        studies: dict[str, Path], tmp_path: Path, model_dir: Path) -> None:
    expected, _, _ = _segment(studies["single"], tmp_path / "single", model_dir)
    labels, _, case = _segment(studies["enhanced_mr"], tmp_path / "out", model_dir)
    np.testing.assert_array_equal(labels, expected)
    assert (case / "seg.dcm").is_file()  # the SEG references the CT (modality a)


def test_enhanced_frame_without_position_is_refused_by_name(studies: dict[str, Path],
                                                            tmp_path: Path) -> None:
    path = next((studies["enhanced_ct"] / "ct").iterdir())
    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    broken = tmp_path / "ct" / path.name
    broken.parent.mkdir()
    ds.save_as(broken, enforce_file_format=True)
    with pytest.raises(DicomSeriesError, match=r"enhanced.dcm: frame 3 has no "
                                               r"ImagePositionPatient"):
        load_series(scan_folder(tmp_path / "ct").volumes[0])
