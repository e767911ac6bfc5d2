"""Flagged results (issue 26's node part): routed to a review destination, or held.

The quality verdict is the real pipeline's (the `qc` of the case's `done` record): a study
whose MR field of view cuts ball B is flagged (fov_cut), one with both balls well inside is
not. Both PACS are real Orthancs: the hospital's, and a second one playing the review
worklist that `--flagged-to` names.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import segment_fixtures as fx
from listen_fixtures import Node, send, wait_until, write_study
from orthanc_fixture import OrthancServer, require_orthanc

from cmc_serve.qc.flags import score_text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.make_model_dir(tmp_path_factory.mktemp("model"))


def _pacs(root: Path, aet: str = "ORTHANC") -> OrthancServer:
    require_orthanc()
    return OrthancServer(root, aet=aet, modalities={"cmc": ("CMC", "127.0.0.1", 1)}).start()


def _verdict(state: dict, flagged: bool) -> None:
    """The precondition: the pipeline's own verdict on the study is what the test needs."""
    assert state["qc"] is not None and state["qc"]["flagged"] is flagged, state["qc"]
    if flagged:
        assert [f["code"] for f in state["qc"]["flags"]] == ["fov_cut"]


def test_flagged_result_goes_to_the_review_destination_instead(
        tmp_path: Path, model_dir: Path) -> None:
    pacs = _pacs(tmp_path / "pacs")
    review = _pacs(tmp_path / "review", aet="REVIEW")
    node = Node(model_dir, tmp_path / "spool", "--send-to", pacs.send_to, "--flagged-to",
                review.send_to, http=True).start()
    try:
        cut = write_study(tmp_path / "cut", patient_id="PAT-CUT")
        whole = write_study(tmp_path / "whole", patient_id="PAT-WHOLE", grid="whole")
        for study in (cut, whole):
            assert set(send(study.files, node.port)) == {0}
        flagged = node.wait_state(cut.study_uid, ["done", "failed"])
        clean = node.wait_state(whole.study_uid, ["done", "failed"])
        _verdict(flagged, True)
        _verdict(clean, False)
        assert flagged["route"] == "flagged" and clean["route"] == "normal"
        assert list(flagged["deliveries"]) == [review.send_to]
        (seg,) = review.wait_for_seg(cut.study_uid)
        assert not pacs.seg_instances(cut.study_uid)
        assert pacs.wait_for_seg(whole.study_uid) and not review.seg_instances(whole.study_uid)
        ds = pydicom.dcmread(BytesIO(review.seg_file(seg)))
        assert "needs review: fov_cut" in ds.SeriesDescription
        page = node.page()
        assert f"score {score_text(flagged['qc']['score'])}: needs review" in page
        assert float(score_text(flagged["qc"]["score"])) < 0.5  # an answer flag: below 0.5
        assert "bright_b: cut off by the field" in page
        assert f"score {score_text(clean['qc']['score'])}" in page
        assert "flagged results to: " + review.send_to in node.output()
    finally:
        node.stop()
        pacs.stop()
        review.stop()


def test_held_results_wait_for_release_on_the_page_or_at_start(
        tmp_path: Path, model_dir: Path) -> None:
    from browser_fixture import render, require_chromium

    pacs = _pacs(tmp_path / "pacs")
    spool = tmp_path / "spool"
    node = Node(model_dir, spool, "--send-to", pacs.send_to, "--hold-flagged",
                http=True).start()
    try:
        first = write_study(tmp_path / "first", patient_id="PAT-HELD1")
        second = write_study(tmp_path / "second", patient_id="PAT-HELD2")
        for study in (first, second):
            assert set(send(study.files, node.port)) == {0}
            held = node.wait_state(study.study_uid, ["held", "done", "failed"])
            assert held["state"] == "held", held
            _verdict(held, True)
            assert held["reason"].startswith("held for review: bright_b: cut off by the field")
        assert not pacs.seg_instances()  # nothing reached the PACS
        require_chromium()
        shown = render(f"http://127.0.0.1:{node.http_port}/", tmp_path / "held.png",
                       (1400, 1000))
        assert "Held for review (2)" in shown.dom
        assert f"QC score {score_text(held['qc']['score'])}" in shown.dom
        assert node.health()["status"] == "ok"  # waiting for a person is not a fault

        assert node.press("release", first.study_uid) == 200
        state = node.wait_state(first.study_uid, ["done", "failed"])
        assert state["state"] == "done" and state["route"] == "normal", state
        assert len(pacs.wait_for_seg(first.study_uid)) == 1
        assert node.state(second.study_uid)["state"] == "held"
    finally:
        node.stop()

    node = Node(model_dir, spool, "--send-to", pacs.send_to, "--hold-flagged", "--release",
                second.study_uid).start()
    try:
        assert node.wait_state(second.study_uid, ["done", "failed"])["state"] == "done"
        assert len(pacs.wait_for_seg(second.study_uid)) == 1
        wait_until(lambda: f"study {second.study_uid}: released" in node.output(), 10,
                   "the release in the log")
        assert len(pacs.seg_instances(first.study_uid)) == 1  # released once, sent once
    finally:
        node.stop()
        pacs.stop()
