"""`cmc listen` against a real Orthanc: PACS -> node -> SEG back to the PACS.

Orthanc (the distribution's package, on generated loopback ports) plays the hospital PACS;
the node runs as a real `cmc listen` process with the threshold model of segment_fixtures,
so the SEG's content is known. Every wait is bounded (listen_fixtures.wait_until).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import segment_fixtures as fx
from listen_fixtures import Node, write_study
from orthanc_fixture import OrthancServer, orthanc_server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.make_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    yield from orthanc_server(tmp_path_factory.mktemp("orthanc"))


def _seg_from_orthanc(pacs: OrthancServer, instance: str) -> pydicom.Dataset:
    from io import BytesIO

    return pydicom.dcmread(BytesIO(pacs.get_bytes(f"/instances/{instance}/file")))


def _assert_seg_of(seg: pydicom.Dataset, study) -> None:
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.StudyInstanceUID == study.study_uid
    (ref,) = seg.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == study.ct_series_uid  # labels on the CT (modality a) grid
    labels = {s.SegmentLabel for s in seg.SegmentSequence}
    assert labels == {"bright_a", "bright_b"}


def test_orthanc_stores_study_to_node_and_seg_comes_back(tmp_path: Path, model_dir: Path,
                                                         pacs: OrthancServer) -> None:
    study = write_study(tmp_path / "study")
    node = Node(model_dir, tmp_path / "spool", "--send-to", pacs.send_to).start()
    try:
        pacs.add_modality("cmc", node.ae_title, node.port)
        orthanc_study = pacs.upload(study.files)
        before = set(pacs.seg_instances())
        pacs.post("/modalities/cmc/store", {"Resources": [orthanc_study], "Synchronous": True})
        state = node.wait_state(study.study_uid, ["done", "failed"])
        assert state["state"] == "done", state
        segs = set(pacs.seg_instances()) - before
        assert len(segs) == 1
        seg = _seg_from_orthanc(pacs, segs.pop())
        _assert_seg_of(seg, study)
        assert state["seg_uids"] == [seg.SOPInstanceUID]
        assert len(list((node.spool / "studies" / study.study_uid / "instances").glob("*.dcm"))
                   ) == len(study.files)
    finally:
        node.stop()
    print(node.output())
