"""Nothing lost after an outage: a delivery that failed after the retries stays deliverable.

The destination is a real Orthanc that is down (not started) while the node gives up
(`--retries 2`), then comes up. The results are delivered at the next start of the node, on
the status page's Redeliver button, or when the PACS re-sends the study; every time exactly
once (the ledger of acknowledged SOP Instance UIDs), also after `--redeliver all`. While a
delivery has failed `/health` is "degraded" and names the study, the destination and the
error, and the status page lists it with the error and a button.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import segment_fixtures as fx
from cmc_cli.main import app
from listen_fixtures import Node, send, wait_until, write_study
from orthanc_fixture import OrthancServer, require_orthanc
from typer.testing import CliRunner

RETRIES = ("--retries", "2")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.make_model_dir(tmp_path_factory.mktemp("model"))


def _down_pacs(root: Path) -> OrthancServer:
    """An Orthanc that knows the node (AE title CMC at 127.0.0.1) but is not started yet."""
    require_orthanc()
    return OrthancServer(root, modalities={"cmc": ("CMC", "127.0.0.1", 1)})


def _failed(node: Node, study_uid: str, pacs: OrthancServer) -> dict:
    state = node.wait_state(study_uid, ["done", "failed"])
    assert state["state"] == "failed", state
    assert state["reason"].startswith(f"delivery to {pacs.send_to} failed after 2 attempts: ")
    assert "no association" in state["reason"]
    assert state["deliveries"][pacs.send_to]["status"] == "failed"
    return state


@pytest.mark.slow  # four node starts (~35 s)
def test_failed_delivery_resumes_at_restart_and_is_delivered_exactly_once(
        tmp_path: Path, model_dir: Path) -> None:
    pacs = _down_pacs(tmp_path / "pacs")
    spool = tmp_path / "spool"
    study = write_study(tmp_path / "study", patient_id="PAT-OUTAGE")
    node = Node(model_dir, spool, "--send-to", pacs.send_to, *RETRIES, http=True).start()
    try:
        assert set(send(study.files, node.port)) == {0}
        state = _failed(node, study.study_uid, pacs)
        health = node.health()
        assert health["status"] == "degraded" and health["failed_deliveries"] == 1
        (problem,) = health["problems"]
        assert problem == f"delivery of study {study.study_uid} failed: {state['reason']}"
        page = node.page()
        assert "Failed deliveries (1)" in page and ">Redeliver</button>" in page
    finally:
        node.stop()

    # started without a destination, the node has nowhere to resume it: it stays failed
    node = Node(model_dir, spool, "--redeliver", "all").start()
    try:
        wait_until(lambda: "not re-queued for delivery: no destination given" in node.output(),
                   30, "the refused re-delivery")
        assert node.state(study.study_uid)["state"] == "failed"
    finally:
        node.stop()

    pacs.start()  # the PACS is back; the node comes back after it
    node = Node(model_dir, spool, "--send-to", pacs.send_to, *RETRIES, http=True).start()
    try:
        state = node.wait_state(study.study_uid, ["done"])
        (seg,) = pacs.wait_for_seg(study.study_uid)
        assert state["deliveries"][pacs.send_to]["delivered"] == state["result_uids"]
        assert f"study {study.study_uid}: failed delivery resumed" in node.output()
        assert node.health()["status"] == "ok"
    finally:
        node.stop()

    # asking again delivers nothing twice: the destination acknowledged that SEG
    node = Node(model_dir, spool, "--send-to", pacs.send_to, "--redeliver", "all",
                "--redeliver", study.study_uid).start()
    try:
        wait_until(lambda: f"study {study.study_uid}: re-queued for delivery" in node.output(),
                   30, "the re-delivery")
        node.wait_state(study.study_uid, ["done"])
        assert "redeliver all: no study to redeliver" in node.output()
        assert pacs.seg_instances(study.study_uid) == [seg]
    finally:
        node.stop()
        pacs.stop()


def test_status_page_button_and_a_resend_deliver_failed_studies_once(
        tmp_path: Path, model_dir: Path) -> None:
    from browser_fixture import render, require_chromium

    pacs = _down_pacs(tmp_path / "pacs")
    first = write_study(tmp_path / "first", patient_id="PAT-BUTTON")
    second = write_study(tmp_path / "second", patient_id="PAT-RESEND")
    node = Node(model_dir, tmp_path / "spool", "--send-to", pacs.send_to, *RETRIES,
                http=True).start()
    try:
        for study in (first, second):
            assert set(send(study.files, node.port)) == {0}
            _failed(node, study.study_uid, pacs)
        assert len(node.health()["problems"]) == 2
        require_chromium()
        shown = render(f"http://127.0.0.1:{node.http_port}/", tmp_path / "failed.png",
                       (1400, 1000))
        assert "Failed deliveries (2)" in shown.dom and "no association" in shown.dom

        # a running node keeps its spool: --redeliver from another process says where to go
        r = CliRunner().invoke(app, ["listen", "--model", str(model_dir), "--spool",
                                     str(node.spool), "--redeliver", "all"])
        assert r.exit_code == 2 and "status page's buttons" in r.stderr

        pacs.start()
        assert node.press("redeliver", first.study_uid) == 200
        assert node.wait_state(first.study_uid, ["done"])["round"] == 1
        assert node.state(second.study_uid)["state"] == "failed"  # only what was asked
        assert set(send(second.files, node.port)) == {0}  # the PACS re-sends, unchanged
        state = node.wait_state(second.study_uid, ["done"])
        assert state["round"] == 1  # delivered again, not segmented again
        for study in (first, second):
            assert len(pacs.wait_for_seg(study.study_uid)) == 1
        assert node.health()["status"] == "ok"
    finally:
        node.stop()
        pacs.stop()
