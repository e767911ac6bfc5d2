"""`cmc listen` against a real Orthanc: PACS -> node -> SEG back to the PACS.

Orthanc (the distribution's package, on generated loopback ports) plays the hospital PACS;
the node runs as a real `cmc listen` process with the threshold model of segment_fixtures,
so the SEG's content is known. Every wait is bounded (listen_fixtures.wait_until).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import segment_fixtures as fx
from dicom_factory import ROOT_UID
from listen_fixtures import (
    Node,
    Study,
    assert_seg_of,
    association_rejected,
    send,
    stored_seg,
    wait_until,
    write_study,
)
from orthanc_fixture import OrthancServer, orthanc_server, require_orthanc
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """The PACS; it knows the node as modality `cmc` (AE title CMC at 127.0.0.1)."""
    yield from orthanc_server(tmp_path_factory.mktemp("orthanc"),
                              modalities={"cmc": ("CMC", "127.0.0.1", 11112)})


def _exactly_one_seg(pacs: OrthancServer, study: Study, state: dict) -> pydicom.Dataset:
    (instance,) = pacs.wait_for_seg(study.study_uid)
    seg = stored_seg(pacs, instance)
    assert_seg_of(seg, study)
    assert state["result_uids"] == [seg.SOPInstanceUID]
    return seg


def _instances_in_spool(node: Node, study: Study) -> int:
    return len(list((node.spool / "studies" / study.study_uid / "instances").glob("*.dcm")))


def test_orthanc_stores_study_to_node_and_seg_comes_back(tmp_path: Path, model_dir: Path,
                                                         pacs: OrthancServer) -> None:
    study = write_study(tmp_path / "study")
    node = Node(model_dir, tmp_path / "spool", "--send-to", pacs.send_to).start()
    try:
        pacs.add_modality("cmc", node.ae_title, node.port)
        orthanc_study = pacs.upload(study.files)
        # Orthanc's own "send to modality": REST /modalities/{id}/store, a C-STORE SCU job
        pacs.post("/modalities/cmc/store", {"Resources": [orthanc_study], "Synchronous": True})
        state = node.wait_state(study.study_uid, ["done", "failed"])
        assert state["state"] == "done", state
        seg = _exactly_one_seg(pacs, study, state)
        # what Orthanc holds is the SEG cmc segment wrote for the study, frame for frame
        (local,) = (node.spool / "studies" / study.study_uid).glob("out/*/seg.dcm")
        assert (seg.pixel_array == pydicom.dcmread(local).pixel_array).all()
        assert _instances_in_spool(node, study) == len(study.files)
        assert [h[0] for h in state["history"]] == ["received", "segmenting", "delivering",
                                                    "done"]
    finally:
        node.stop()


def test_rtstruct_and_measurement_report_travel_with_the_seg(
        tmp_path: Path, model_dir: Path, pacs: OrthancServer) -> None:
    """Every DICOM result of the case is delivered, SEG first and the SR (which references
    it) last, each acknowledged in the ledger."""
    study = write_study(tmp_path / "study", patient_id="PAT-RT")
    node = Node(model_dir, tmp_path / "spool", "--send-to", pacs.send_to, "--output-type",
                "auto,rtstruct,sr").start()
    try:
        assert set(send(study.files, node.port)) == {0}
        state = node.wait_state(study.study_uid, ["done", "failed"])
    finally:
        node.stop()
    assert state["state"] == "done", state
    names = [Path(f).name for f in state["result_files"]]
    assert names[0] == "seg.dcm" and names[-1].startswith("sr") and len(names) == 3, names
    assert state["deliveries"][pacs.send_to]["delivered"] == state["result_uids"]
    modalities = set()
    for series in pacs.post("/tools/find", {"Level": "Series", "Expand": True, "Query": {
            "StudyInstanceUID": study.study_uid}}):
        modalities.add(series["MainDicomTags"]["Modality"])
    assert {"SEG", "RTSTRUCT", "SR"} <= modalities, modalities


def test_seg_stored_back_through_stow_rs(tmp_path: Path, model_dir: Path,
                                         pacs: OrthancServer) -> None:
    study = write_study(tmp_path / "study", patient_id="PAT-STOW")
    node = Node(model_dir, tmp_path / "spool", "--stow", pacs.dicomweb).start()
    try:
        assert set(send(study.files, node.port)) == {0}
        state = node.wait_state(study.study_uid, ["done", "failed"])
        assert state["state"] == "done", state
        assert state["deliveries"][pacs.dicomweb]["status"] == "done"
        _exactly_one_seg(pacs, study, state)
    finally:
        node.stop()


def test_sigkill_mid_study_then_restart_loses_nothing_and_delivers_once(
        tmp_path: Path, model_dir: Path, pacs: OrthancServer) -> None:
    study = write_study(tmp_path / "study", patient_id="PAT-KILL")
    spool = tmp_path / "spool"
    first, rest = study.files[:18], study.files[18:]
    node = Node(model_dir, spool, "--send-to", pacs.send_to, study_timeout=30).start()
    assert set(send(first, node.port)) == {0}
    node.kill()  # mid-study: the MR series is incomplete
    assert _instances_in_spool(node, study) == len(first)
    assert node.state(study.study_uid)["state"] == "received"

    node = Node(model_dir, spool, "--send-to", pacs.send_to, study_timeout=1).start()
    try:
        assert set(send(rest, node.port)) == {0}  # the PACS sends the rest to the new node
        state = node.wait_state(study.study_uid, ["done", "failed"])
        assert state["state"] == "done", state
        assert _instances_in_spool(node, study) == len(study.files)
        _exactly_one_seg(pacs, study, state)
    finally:
        node.stop()


def test_destination_down_retried_then_delivered_once_across_sigkill(
        tmp_path: Path, model_dir: Path) -> None:
    require_orthanc()
    later = OrthancServer(tmp_path / "later-pacs", modalities={"cmc": ("CMC", "127.0.0.1", 1)})
    study = write_study(tmp_path / "study", patient_id="PAT-DOWN")
    spool = tmp_path / "spool"
    node = Node(model_dir, spool, "--send-to", later.send_to, "--retries", "1000",
                http=True).start()
    assert set(send(study.files, node.port)) == {0}
    def attempts() -> int:
        ledger = (node.state(study.study_uid) or {}).get("deliveries", {})
        return int(ledger.get(later.send_to, {}).get("attempts", 0))

    wait_until(lambda: attempts() >= 2, 60, "failed delivery attempts")
    state = node.state(study.study_uid)
    assert state["state"] == "delivering"
    assert "no association" in state["deliveries"][later.send_to]["last_error"]
    health = json.loads(urllib.request.urlopen(
        f"http://127.0.0.1:{node.http_port}/health", timeout=10).read())
    assert health["status"] == "degraded" and health["studies"]["delivering"] == 1
    seg_uid = state["result_uids"][0]
    node.kill()  # while the delivery is being retried
    before = attempts()

    node = Node(model_dir, spool, "--send-to", later.send_to, "--retries", "1000").start()
    try:
        wait_until(lambda: attempts() > before, 60, "a retry after the restart")
        later.start()  # the destination comes up: the next retry delivers
        state = node.wait_state(study.study_uid, ["done", "failed"])
        assert state["state"] == "done", state
        assert state["result_uids"] == [seg_uid]  # the SEG made before the kill, not a new one
        seg = _exactly_one_seg(later, study, state)
        assert seg.SOPInstanceUID == seg_uid
        assert state["deliveries"][later.send_to]["delivered"] == [seg_uid]
    finally:
        node.stop()
        later.stop()


def test_sigterm_finishes_the_study_in_flight_and_exits_cleanly(
        tmp_path: Path, model_dir: Path, pacs: OrthancServer) -> None:
    study_uid = generate_uid(ROOT_UID)[:60]
    # a larger CT so that segmenting takes long enough to be interrupted
    spec = fx.ct_spec(study_uid, rows=128, cols=128, n_slices=96, pixel_spacing=(0.5, 0.5),
                      slice_spacing=0.5, origin=(-40.0, -40.0, -30.0))
    files = fx.write_phantom_series(tmp_path / "ct", spec)
    node = Node(model_dir, tmp_path / "spool", "--send-to", pacs.send_to).start()
    assert set(send(files, node.port)) == {0}
    node.wait_state(study_uid, ["segmenting"], timeout=60)
    assert node.terminate(timeout=120) == 0, node.output()
    state = node.state(study_uid)
    assert state["state"] == "done", node.output()
    assert pacs.seg_instances(study_uid)
    assert "SIGTERM: finishing the study in flight" in node.output()


# ---------------------------------------------------------------------- refusals

@pytest.fixture(scope="module")
def guarded_node(tmp_path_factory: pytest.TempPathFactory, model_dir: Path,
                 pacs: OrthancServer) -> Iterator[Node]:
    """A node that accepts only calling AE titles SENDER and ORTHANC."""
    node = Node(model_dir, tmp_path_factory.mktemp("guarded") / "spool", "--allow",
                "SENDER,ORTHANC", "--send-to", pacs.send_to, http=True).start()
    yield node
    node.stop()


def test_calling_ae_not_on_allow_list_is_rejected(guarded_node: Node) -> None:
    assert association_rejected(guarded_node.port, "INTRUDER")
    assert not association_rejected(guarded_node.port, "SENDER")
    assert association_rejected(guarded_node.port, "SENDER", called_ae="NOTCMC")


def test_dcmtk_echoscu_sees_the_same_rules(guarded_node: Node) -> None:
    echoscu = shutil.which("echoscu")
    if echoscu is None:
        pytest.skip("dcmtk is not installed (make system-deps installs it)")

    def echo(calling: str) -> int:
        return subprocess.run([echoscu, "-to", "20", "-aet", calling, "-aec", "CMC",
                               "127.0.0.1", str(guarded_node.port)], capture_output=True,
                              timeout=60).returncode

    assert echo("ORTHANC") == 0
    assert echo("INTRUDER") != 0


def test_non_image_sop_class_is_accepted_and_ignored(guarded_node: Node, tmp_path: Path) -> None:
    """Objects the node does not segment are "stored" for the sender (its job goes on) and
    kept nowhere: no study is opened for them."""
    sr = pydicom.Dataset()
    sr.SOPClassUID, sr.SOPInstanceUID = BASIC_TEXT_SR, generate_uid(ROOT_UID)
    sr.StudyInstanceUID, sr.SeriesInstanceUID = generate_uid(ROOT_UID), generate_uid(ROOT_UID)
    sr.Modality, sr.PatientID = "SR", "PAT-SR"
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert send([sr], guarded_node.port) == [0]
    assert not (guarded_node.spool / "studies" / sr.StudyInstanceUID).exists()
    assert (f"ignored Basic Text SR Storage instance {sr.SOPInstanceUID} of study "
            f"{sr.StudyInstanceUID} from SENDER (not segmented)") in guarded_node.output()


def test_truncated_instance_refused_without_affecting_the_study(
        guarded_node: Node, tmp_path: Path, pacs: OrthancServer) -> None:
    study = write_study(tmp_path / "study", patient_id="PAT-TRUNC")
    broken = pydicom.dcmread(study.ct[3])
    broken.SOPInstanceUID = generate_uid(ROOT_UID)  # an extra slice, cut short on the wire
    broken.PixelData = broken.PixelData[: len(broken.PixelData) // 2]
    datasets = [pydicom.dcmread(f) for f in study.files]
    statuses = send([*datasets[:5], broken, *datasets[5:]], guarded_node.port)
    assert statuses == [0] * 5 + [0xC000] + [0] * (len(datasets) - 5)
    state = guarded_node.wait_state(study.study_uid, ["done", "failed"])
    assert state["state"] == "done", state  # had it been stored, the CT would have a duplicate
    assert _instances_in_spool(guarded_node, study) == len(study.files)
    ((uid, reason),) = state["refused"]
    assert uid == broken.SOPInstanceUID and "pixel data" in reason
    _exactly_one_seg(pacs, study, state)


def test_health_reports_ok_and_counts(guarded_node: Node) -> None:
    health = json.loads(urllib.request.urlopen(
        f"http://127.0.0.1:{guarded_node.http_port}/health", timeout=10).read())
    assert health["status"] == "ok" and health["ae_title"] == "CMC"
    assert health["problems"] == []




def test_pacs_that_does_not_know_the_ae_title_is_reported_clearly(
        tmp_path: Path, model_dir: Path, pacs: OrthancServer) -> None:
    """Orthanc only accepts C-STORE from its DicomModalities: it aborts the association of a
    node sending as another AE title; the study fails with a reason that says what to
    configure (not "no response")."""
    study = write_study(tmp_path / "study", patient_id="PAT-AET")
    node = Node(model_dir, tmp_path / "spool", "--send-to", pacs.send_to, "--retries", "2",
                ae_title="STRANGER").start()
    try:
        assert set(send(study.files, node.port, called_ae="STRANGER")) == {0}
        state = node.wait_state(study.study_uid, ["done", "failed"])
    finally:
        node.stop()
    assert state["state"] == "failed"
    assert "aborted the association instead of storing" in state["reason"]
    assert "calling AE title STRANGER" in state["reason"] and "DicomModalities" in state["reason"]
    assert not pacs.seg_instances(study.study_uid)


# ---------------------------------------------------------------------- status page

def test_status_page_in_headless_chromium_shows_states_and_previews(
        guarded_node: Node, tmp_path: Path, pacs: OrthancServer) -> None:
    from browser_fixture import overlay_pixels, render, require_chromium

    from cmc_serve.pipeline.preview import PALETTE

    require_chromium()
    study = write_study(tmp_path / "study", patient_id="PAT-PAGE")
    assert set(send(study.files, guarded_node.port)) == {0}
    guarded_node.wait_state(study.study_uid, ["done"])
    page = render(f"http://127.0.0.1:{guarded_node.http_port}/", tmp_path / "status.png",
                  (1400, 1400))
    row = page.dom[page.dom.index(study.study_uid):]
    row = row[:row.index("</tr>")]
    assert "PAT-PAGE" in row and '<span class="badge done">done</span>' in row
    assert 'src="data:image/png;base64,' in row  # the SEG preview, inlined
    assert f"{pacs.send_to}: done" in row
    assert overlay_pixels(page.pixels(), tuple(int(c) for c in PALETTE[0])) > 200


def test_documented_orthanc_routing_rule_segments_each_study_once(
        tmp_path: Path, model_dir: Path) -> None:
    """docs/orthanc/route-to-cmc.lua (README, Hospital deployment): Orthanc sends each stable
    study's CT and MR series to the node; the SEG coming back makes the study stable again,
    which must not start a second round."""
    require_orthanc()
    rule = Path(__file__).resolve().parents[1] / "docs" / "orthanc" / "route-to-cmc.lua"
    node = Node(model_dir, tmp_path / "spool", study_timeout=1)
    pacs = OrthancServer(tmp_path / "pacs", modalities={"cmc": ("CMC", "127.0.0.1", node.port)},
                         lua_scripts=(rule,)).start()
    node.extra = ("--send-to", pacs.send_to)
    node.start()
    try:
        study = write_study(tmp_path / "study", patient_id="PAT-LUA")
        pacs.upload(study.files)  # nothing else: the rule routes it
        state = node.wait_state(study.study_uid, ["done", "failed"], timeout=90)
        assert state["state"] == "done", state
        pacs.wait_for_seg(study.study_uid)
        time.sleep(4)  # the study is stable again (StableAge 1 s) after the SEG arrived
        state = node.state(study.study_uid)
        assert state["round"] == 1 and state["state"] == "done"
        assert len(pacs.seg_instances(study.study_uid)) == 1
    finally:
        node.stop()
        pacs.stop()
