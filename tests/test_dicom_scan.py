"""cmc_serve.dicom.scan and choose_series on pydicom's real scanner folders and synthetic ones."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pydicom
import pytest
from dicom_factory import SeriesSpec, write_series

from cmc_serve.dicom import (
    DicomScanError,
    DicomSeriesError,
    SelectionRules,
    choose_series,
    scan_folder,
)

TEST_FILES = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
DICOMDIRTESTS = TEST_FILES / "dicomdirtests"
CT5N_UID = "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.6"
CT2_UID = "1.3.6.1.4.1.5962.1.1.0.0.0.1196530851.28319.0.2"


@pytest.fixture(scope="module")
def real_tree() -> dict[str, object]:
    result = scan_folder(DICOMDIRTESTS)
    return {s.uid: s for s in result.series} | {"_result": result}


def test_real_tree_classification(real_tree: dict) -> None:
    ct5n = real_tree[CT5N_UID]
    assert (ct5n.kind, ct5n.modality, ct5n.n_files, ct5n.plane) == ("volume", "CT", 5, "axial")
    assert ct5n.description == "SmartScore - Gated 0.5 sec"
    assert ct5n.patient_id and ct5n.study_uid
    assert ct5n.folder == DICOMDIRTESTS / "98892001" / "CT5N"
    kinds = {(s.description, s.kind) for s in real_tree["_result"].series}
    assert ("Scout", "localizer") in kinds  # CT2N: ImageType LOCALIZER
    assert ("FAST LOCALIZER", "localizer") in kinds  # single sagittal slices
    assert ("T/S/C RF FAST PILOT", "localizer") in kinds  # 3 orientations in one series
    assert ("ANGIO Projected from   C", "derived") in kinds  # MR700: DERIVED/SECONDARY
    skipped = dict(real_tree["_result"].skipped_files)
    assert skipped[DICOMDIRTESTS / "DICOMDIR"] == "DICOMDIR index, not an instance"
    assert skipped[DICOMDIRTESTS / "README.txt"] == "not a DICOM file (no DICM preamble)"
    assert {s.uid for s in real_tree["_result"].volumes} == {CT5N_UID, CT2_UID}


def test_mixed_folder_has_several_series_and_none_to_segment() -> None:
    result = scan_folder(DICOMDIRTESTS / "98892003" / "MR2")
    assert len(result.series) == 3
    assert {s.kind for s in result.series} == {"localizer"}
    with pytest.raises(DicomSeriesError, match="no series qualifies .*multi-planar localizer"):
        choose_series(result.series)


def test_choose_series_in_a_mixed_export(tmp_path: Path) -> None:
    """CT5N + CT2 + the MR localizers + a SEG + junk in one folder, as PACS exports look."""
    for sub in ("98892001/CT5N", "77654033/CT2", "98892003/MR2"):
        shutil.copytree(DICOMDIRTESTS / sub, tmp_path / sub.replace("/", "_"))
    shutil.copy(TEST_FILES / "liver_1frame.dcm", tmp_path / "seg.dcm")
    (tmp_path / "notes.txt").write_text("not dicom")
    result = scan_folder(tmp_path)
    assert (tmp_path / "notes.txt", "not a DICOM file (no DICM preamble)") in result.skipped_files
    assert any(s.modality == "SEG" and s.kind == "non-image" for s in result.series)
    best, reason = choose_series(result.series, SelectionRules(modality="CT"))
    assert best.uid == CT5N_UID
    assert "most slices among 2 candidates" in reason and "series excluded" in reason
    best, reason = choose_series(result.series, SelectionRules(description="brain"))
    assert best.uid == CT2_UID and "most slices" not in reason
    with pytest.raises(DicomSeriesError, match="modality CT is not MR"):
        choose_series(result.series, SelectionRules(modality="MR"))
    with pytest.raises(DicomSeriesError, match="plane axial is not sagittal"):
        choose_series(result.series, SelectionRules(plane="sagittal"))


def test_derived_series_only_when_allowed() -> None:
    result = scan_folder(DICOMDIRTESTS / "98892003" / "MR700")
    with pytest.raises(DicomSeriesError, match="derived: ImageType DERIVED/SECONDARY"):
        choose_series(result.series)
    best, _ = choose_series(result.series, SelectionRules(allow_derived=True))
    assert best.n_files == 7


def test_synthetic_series_beside_non_dicom_files(tmp_path: Path, caplog) -> None:
    write_series(tmp_path / "a", SeriesSpec(description="arterial", n_slices=4))
    write_series(tmp_path / "a", SeriesSpec(description="venous", n_slices=6, series_number=3),
                 prefix="VE")
    (tmp_path / "a" / "._IM0001.dcm").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    (tmp_path / "a" / "report.pdf").write_bytes(b"%PDF-1.4 ...")
    with caplog.at_level(logging.INFO, logger="cmc_serve.dicom.scan"):
        result = scan_folder(tmp_path)
    assert sorted(s.description for s in result.volumes) == ["arterial", "venous"]
    assert len(result.skipped_files) == 2
    assert "report.pdf: not a DICOM file" in caplog.text
    best, reason = choose_series(result.series)
    assert best.description == "venous" and "6 files" in reason


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(DicomScanError, match="the folder is empty"):
        scan_folder(tmp_path)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DicomScanError, match=r"no DICOM series found \(1 files, none"):
        scan_folder(tmp_path)
    with pytest.raises(DicomScanError, match="nowhere: not a folder"):
        scan_folder(tmp_path / "nowhere")


def test_damaged_files_are_attributed_to_the_series_beside_them(tmp_path: Path) -> None:
    """Truncated, empty or same-named unreadable files belong to the series; a deflated image
    (read whole, inflated in memory) and unrelated files do not."""
    paths = write_series(tmp_path / "s", SeriesSpec(n_slices=5), shuffle=False)
    uid = pydicom.dcmread(paths[0]).get_item("SeriesInstanceUID")
    paths[0].write_bytes(paths[0].read_bytes()[:uid.value_tell + 6])  # cut inside the UID
    paths[4].write_bytes(b"")
    (tmp_path / "s" / "IM0009.dcm").write_bytes(b"garbage with the series' name")
    (tmp_path / "s" / "notes.txt").write_text("not dicom")
    shutil.copy(TEST_FILES / "image_dfl.dcm", tmp_path / "s" / "deflated.dcm")
    result = scan_folder(tmp_path)
    (series,) = [s for s in result.series if s.n_files == 3]
    unreadable = {p.name: why for p, why in series.unreadable}
    assert unreadable == {
        "IM0000.dcm": "no pixel data: the file ends after its header (truncated?)",
        "IM0004.dcm": "empty file (0 bytes)",
        "IM0009.dcm": "not a DICOM file (no DICM preamble)"}
    assert any(s.paths == (tmp_path / "s" / "deflated.dcm",) for s in result.series)
