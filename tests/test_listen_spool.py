"""`cmc listen` without a PACS: start-up refusals and the spool's recovery after a kill.

The Orthanc tests kill a real node; these cover the states a kill can leave that are hard
to hit with timing (a study.json in `segmenting`, an instance without study.json, a
temporary file of an interrupted write) by writing them as the node would have.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import segment_fixtures as fx
from cmc_cli.main import app
from typer.testing import CliRunner

from cmc_serve.node.spool import Spool, SpoolError
from cmc_serve.node.study_record import DELIVERING, FAILED, SEGMENTING, Delivery
from cmc_serve.triton.server import free_port


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.make_model_dir(tmp_path_factory.mktemp("model"))


def _listen(*args: object):
    return CliRunner().invoke(app, ["listen", *(str(a) for a in args)])


@pytest.mark.timeout(120)  # a refusal that failed would leave the node listening
@pytest.mark.parametrize(("extra", "message"), [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 listens beyond this machine: give --allow"),
    (["--send-to", "ORTHANC:4242"], "--send-to 'ORTHANC:4242': expected AET@HOST:PORT"),
    (["--stow", "pacs/dicom-web"], "--stow 'pacs/dicom-web': expected the DICOMweb root URL"),
    (["--ae-title", "A" * 17], "--ae-title"),
    (["--runtime", "tensorrt"], "tensorrt runs on cuda only"),
    (["--send-to", "PACS@127.0.0.1:4242", "--output-type", "nifti"],
     "--output-type must include dicom-seg"),
    (["--flagged-to", "REVIEW@127.0.0.1:4243", "--hold-flagged"],
     "--flagged-to and --hold-flagged: choose one"),
    (["--flagged-to", "REVIEW:4243"], "--flagged-to 'REVIEW:4243': expected AET@HOST:PORT"),
    (["--hold-flagged", "--qc", "off"], "--qc off would never flag a case"),
    (["--redeliver", "../1.2.3"], "--redeliver '../1.2.3': give a Study Instance UID or 'all'"),
    (["--release", "1.2.x"], "--release '1.2.x': give a Study Instance UID or 'all'"),
])
def test_listen_refuses_to_start_in_one_line(tmp_path: Path, model_dir: Path,
                                              extra: list[str], message: str) -> None:
    spool = tmp_path / "spool"
    r = _listen("--model", model_dir, "--spool", spool, "--port", free_port(), *extra)
    assert r.exit_code == 2, r.output
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("cmc listen: error: ") and message in line
    assert not spool.exists()  # a refused start creates nothing


def test_listen_refuses_a_foreign_spool_folder(tmp_path: Path, model_dir: Path) -> None:
    spool = tmp_path / "mine"
    spool.mkdir()
    (spool / "notes.txt").write_text("a user's file")
    r = _listen("--model", model_dir, "--spool", spool)
    assert r.exit_code == 2 and "is not a cmc spool" in r.stderr
    assert sorted(p.name for p in spool.iterdir()) == ["notes.txt"]


def test_spool_recovers_every_state_a_kill_can_leave(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "spool")
    for uid in ("1.2.3", "1.2.4", "1.2.5"):
        spool.add_instance(uid, f"{uid}.1", "P", b"DICM-bytes")
    cut = spool.get("1.2.3")
    cut.set_state(SEGMENTING, "round 1")
    spool.update(cut)
    sending = spool.get("1.2.4")
    sending.set_state(DELIVERING)
    sending.deliveries["PACS@h:1"] = Delivery(attempts=3, next_try=4e9, last_error="down")
    spool.update(sending)
    (spool.study_dir("1.2.5") / "study.json").unlink()  # killed before its first state
    (spool.instances_dir("1.2.3") / ".1.2.3.9.dcm.abc.tmp").write_bytes(b"half")

    again = Spool.open(tmp_path / "spool")
    states = {s.study_uid: s for s in again.studies()}
    assert states["1.2.3"].state == "received"
    assert "segmented again" in states["1.2.3"].history[-1][2]
    assert states["1.2.4"].state == "delivering"
    assert states["1.2.4"].deliveries["PACS@h:1"].next_try == 0.0  # retried at once
    assert states["1.2.5"].state == "received"
    assert not list(again.instances_dir("1.2.3").glob(".*"))
    assert again.instance_count("1.2.3") == 1


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_received_instances_and_records_get_the_mode_a_plain_open_gives(
        tmp_path: Path, umask: int) -> None:
    """The spool once kept mkstemp's 0600: a PACS export job of the node's group could not
    read what the node received."""
    previous = os.umask(umask)
    try:
        spool = Spool.open(tmp_path / "spool")
        spool.add_instance("1.2.3", "1.2.3.1", "P", b"DICM-bytes")
    finally:
        os.umask(previous)
    files = [spool.instances_dir("1.2.3") / "1.2.3.1.dcm",
             spool.study_dir("1.2.3") / "study.json", spool.root / ".cmc-spool"]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o666 & ~umask)}
    assert files[0].read_bytes() == b"DICM-bytes"


def test_failed_delivery_is_requeued_with_its_ledger_and_an_older_spool_still_reads(
        tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "spool")
    spool.add_instance("1.2.3", "1.2.3.1", "P", b"slice one")
    study = spool.get("1.2.3")
    study.result_files, study.result_uids = ["out/c/seg.dcm", "out/c/sr.dcm"], ["9.1", "9.2"]
    study.deliveries = {"A@h:1": Delivery(["9.1"], 2, 0.0, "down", "failed"),
                        "B@h:2": Delivery(["9.1", "9.2"], 0, 0.0, None, "done")}
    study.set_state(FAILED, reason="delivery to A@h:1 failed after 2 attempts: down")
    spool.update(study)
    assert [s.study_uid for s in spool.failed_deliveries()] == ["1.2.3"]
    assert spool.requeue_delivery("1.2.4", "asked") == "study 1.2.4: not in the spool"
    assert spool.requeue_delivery("1.2.3", "asked") is None
    again = spool.get("1.2.3")
    assert again.state == DELIVERING and not spool.failed_deliveries()
    a, b = again.deliveries["A@h:1"], again.deliveries["B@h:2"]
    assert (a.status, a.attempts, a.delivered) == ("pending", 0, ["9.1"])  # 9.1 not again
    assert (b.status, b.delivered) == ("done", ["9.1", "9.2"])
    # a re-sent, unchanged instance requeues only a failed delivery, and reopens nothing
    spool.add_instance("1.2.3", "1.2.3.1", "P", b"slice one")
    assert spool.get("1.2.3").round == 1
    # study.json written before the results were more than a SEG
    old = json.loads((spool.study_dir("1.2.3") / "study.json").read_text())
    old["seg_files"], old["seg_uids"] = old.pop("result_files"), old.pop("result_uids")
    for key in ("qc", "route", "ignored"):
        old.pop(key)
    (spool.study_dir("1.2.3") / "study.json").write_text(json.dumps(old))
    assert Spool.open(tmp_path / "spool").get("1.2.3").result_uids == ["9.1", "9.2"]


def test_spool_never_takes_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x").write_text("x")
    with pytest.raises(SpoolError, match="not a cmc spool"):
        Spool.open(tmp_path / "data")
    marker = json.loads((Spool.open(tmp_path / "new").root / ".cmc-spool").read_text())
    assert marker["format"] == "cmc-spool"


def test_new_instances_reopen_a_finished_study_but_unchanged_resends_do_not(
        tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "spool")
    spool.add_instance("1.2.3", "1.2.3.1", "P", b"slice one")
    study = spool.get("1.2.3")
    study.segment_started = 1e12  # segmentation began after every arrival so far
    study.set_state(SEGMENTING)
    spool.update(study)
    spool.finish_round(study, "done", "SEG delivered")
    assert spool.get("1.2.3").state == "done"
    spool.add_instance("1.2.3", "1.2.3.1", "P", b"slice one")  # the PACS rule fired again
    assert spool.get("1.2.3").state == "done"
    spool.add_instance("1.2.3", "1.2.3.2", "P", b"slice two")  # a late instance
    reopened = spool.get("1.2.3")
    assert reopened.state == "received" and reopened.round == 2


def test_a_study_that_cannot_be_segmented_fails_with_the_cli_reason_and_the_queue_goes_on(
        tmp_path: Path, model_dir: Path) -> None:
    from listen_fixtures import Node, send, write_study

    bad = write_study(tmp_path / "bad", patient_id="PAT-BAD")
    bad.ct[5].unlink()  # a slice missing in the middle of the CT
    good = write_study(tmp_path / "good", patient_id="PAT-GOOD")
    node = Node(model_dir, tmp_path / "spool").start()
    try:
        assert set(send([p for p in bad.files if p.exists()], node.port)) == {0}
        assert set(send(good.files, node.port)) == {0}
        failed = node.wait_state(bad.study_uid, ["done", "failed"])
        done = node.wait_state(good.study_uid, ["done", "failed"])
    finally:
        node.stop()
    assert done["state"] == "done" and failed["state"] == "failed"
    # the reason is what `cmc segment` reports for the same files (stage: message)
    r = fx.segment(tmp_path / "bad", "-o", tmp_path / "out", "--model", model_dir,
                   "--runtime", "onnxruntime")
    assert r.exit_code == 1
    row = (tmp_path / "out" / "failures.csv").read_text().splitlines()[1]
    stage = row.split(",")[1]
    assert failed["reason"].startswith(f"{stage}: ")  # same stage, same check, same words:
    assert "1 missing slice(s) between" in row and "1 missing slice(s) between" in failed["reason"]
    assert "\n" not in failed["reason"]


def test_two_nodes_never_share_a_spool(tmp_path: Path, model_dir: Path) -> None:
    from listen_fixtures import Node

    first = Node(model_dir, tmp_path / "spool").start()
    try:
        r = _listen("--model", model_dir, "--spool", tmp_path / "spool", "--port", free_port())
        assert r.exit_code == 2
        assert f"in use by another cmc listen (pid {first.process.pid})" in r.stderr
    finally:
        first.kill()  # the kernel releases the lock of a killed node
    second = Node(model_dir, tmp_path / "spool").start()
    second.stop()
