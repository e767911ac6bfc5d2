"""`cmc segment --from-dicomweb` against a real Orthanc: QIDO/WADO-RS in, STOW-RS back.

Orthanc (the distribution's package, on generated loopback ports) plays the PACS; the
threshold model of segment_fixtures makes the SEG's content known.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import segment_fixtures as fx
from dicom_factory import ROOT_UID
from listen_fixtures import assert_seg_of, stored_seg, write_study
from orthanc_fixture import OrthancServer, orthanc_server
from pydicom.uid import generate_uid


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    yield from orthanc_server(tmp_path_factory.mktemp("orthanc"))


def test_segment_from_dicomweb_and_stow_back(tmp_path: Path, model_dir: Path,
                                             pacs: OrthancServer) -> None:
    study = write_study(tmp_path / "study", patient_id="PAT-WEB")
    pacs.upload(study.files)
    out = tmp_path / "out"
    args = ["--from-dicomweb", pacs.dicomweb, "--study", study.study_uid, "-o", out,
            "--model", model_dir, "--runtime", "onnxruntime", "--stow", pacs.dicomweb]
    r = fx.segment(*args)
    assert r.exit_code == 0, r.output
    (seg_file,) = out.glob("PAT-WEB_*/seg.dcm")
    local = pydicom.dcmread(seg_file)
    (instance,) = pacs.wait_for_seg(study.study_uid)
    stored = stored_seg(pacs, instance)
    assert stored.SOPInstanceUID == local.SOPInstanceUID
    assert_seg_of(stored, study)
    assert "1 SEG(s) stored at" in r.stderr
    # --continue: the study is done in OUT, so it is neither retrieved nor stored again
    r = fx.segment(*args, "--continue")
    assert r.exit_code == 0, r.output
    assert "1 finished study not retrieved" in r.stderr and "0 done" in r.stderr
    assert pacs.seg_instances(study.study_uid) == [instance]


def test_from_dicomweb_unknown_study_is_refused_in_one_line(tmp_path: Path, model_dir: Path,
                                                           pacs: OrthancServer) -> None:
    out = tmp_path / "out"
    missing = generate_uid(ROOT_UID)
    r = fx.segment("--from-dicomweb", pacs.dicomweb, "--study", missing, "-o", out, "--model",
                   model_dir, "--runtime", "onnxruntime")
    assert r.exit_code == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("cmc segment: error: ") and missing in line and "404" in line
    assert not out.exists()


def test_from_dicomweb_shards_cover_every_study_once(tmp_path: Path, model_dir: Path,
                                                      pacs: OrthancServer) -> None:
    studies = [write_study(tmp_path / f"s{i}", patient_id=f"PAT-SHARD{i}") for i in range(3)]
    for study in studies:
        pacs.upload(study.files)
    seen: list[str] = []
    for shard in ("1/2", "2/2"):
        out = tmp_path / f"out{shard[0]}"
        args = ["--from-dicomweb", pacs.dicomweb, "-o", out, "--model", model_dir,
                "--runtime", "onnxruntime", "--output-type", "nifti", "--shard", shard]
        for study in studies:
            args += ["--study", study.study_uid]
        r = fx.segment(*args)
        assert r.exit_code == 0, r.output
        cases = json.loads((out / "report.json").read_text())["cases"]
        seen += [c["case_id"].split("_")[0] for c in cases if c["status"] == "done"]
    assert sorted(seen) == [f"PAT-SHARD{i}" for i in range(3)]
