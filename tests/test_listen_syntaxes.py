"""`cmc listen` speaks the archive's transfer syntaxes and takes whole-study re-sends.

A sender offering only a compressed syntax (JPEG Lossless SV1, JPEG-LS, JPEG 2000, RLE) is
accepted, the instances are kept in the syntax they came in, and the study segments to the
labels of its uncompressed twin; a syntax nothing here decodes is refused at negotiation
with one line naming it, in the log and on the status page. Orthanc (the suite's real PACS)
transcodes a study at ingest and sends it without transcoding back, so the node receives
exactly what a compressed archive sends; re-sending the whole study after the SEG arrived
(the SEG included) succeeds and makes no second SEG.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import segment_fixtures as fx
from dicom_factory import recode_dcmtk, recode_pydicom
from listen_fixtures import Node, Study, send, wait_until, write_study
from orthanc_fixture import OrthancServer, require_orthanc
from pydicom import uid

MPEG2 = "1.2.840.10008.1.2.4.100"  # a video syntax: no pixel decoder exists for it

# (syntax, encoder): dcmtk's encoders as an archive would use them; pydicom's for JPEG 2000
SENT_COMPRESSED = [(uid.JPEGLosslessSV1, "dcmtk"), (uid.JPEGLSLossless, "dcmtk"),
                   (uid.JPEG2000Lossless, "pydicom"), (uid.RLELossless, "dcmtk")]


class TranscodingOrthanc(OrthancServer):
    """An Orthanc that stores every instance it receives in `syntax` (IngestTranscoding),
    as an archive that compresses on arrival does."""

    def __init__(self, root: Path, syntax: str, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.syntax = syntax

    def config(self) -> dict[str, Any]:
        return {**super().config(), "IngestTranscoding": self.syntax}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.make_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def plain_labels(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> np.ndarray:
    """What `cmc segment` makes of the uncompressed study (every study here is the same
    phantom on the same grid)."""
    root = tmp_path_factory.mktemp("plain")
    write_study(root / "study", grid="square")
    r = fx.segment(root / "study", "-o", root / "out", "--model", model_dir,
                   "--runtime", "onnxruntime")
    assert r.exit_code == 0, r.output
    (case,) = [p for p in (root / "out").iterdir() if p.is_dir()]
    labels = fx.read_labels(case / "seg.nii.gz")[0]
    assert labels.any()
    return labels


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Node]:
    node = Node(model_dir, tmp_path_factory.mktemp("node") / "spool", http=True).start()
    yield node
    node.stop()


def _node_labels(node: Node, study_uid: str) -> np.ndarray:
    (seg,) = (node.spool / "studies" / study_uid / "out").glob("*/seg.nii.gz")
    return fx.read_labels(seg)[0]


def _spool_syntaxes(node: Node, study_uid: str) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            for p in (node.spool / "studies" / study_uid / "instances").glob("*.dcm")}


def _compressed_study(root: Path, syntax: str, encoder: str, patient_id: str) -> Study:
    if encoder == "dcmtk" and shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmtk is not installed (make system-deps installs it)")
    recode = recode_dcmtk if encoder == "dcmtk" else recode_pydicom
    plain = write_study(root / "plain", patient_id=patient_id, grid="square")
    ct = recode(plain.ct, root / "ct", syntax)
    mr = recode(plain.mr, root / "mr", syntax)
    return Study(plain.study_uid, ct, mr, plain.ct_series_uid)


@pytest.mark.parametrize(("syntax", "encoder"), SENT_COMPRESSED,
                         ids=[uid.UID(s).keyword for s, _ in SENT_COMPRESSED])
def test_sender_offering_only_a_compressed_syntax_segments_like_uncompressed(
        node: Node, tmp_path: Path, plain_labels: np.ndarray, syntax: str,
        encoder: str) -> None:
    study = _compressed_study(tmp_path, syntax, encoder, f"PAT-{uid.UID(syntax).keyword}")
    assert {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in study.files} == {syntax}
    assert set(send(study.files, node.port, syntaxes=[syntax])) == {0}
    state = node.wait_state(study.study_uid, ["done", "failed"])
    assert state["state"] == "done", state
    assert _spool_syntaxes(node, study.study_uid) == {syntax}  # stored as received
    assert np.array_equal(_node_labels(node, study.study_uid), plain_labels)


def test_dcmtk_storescu_sends_jpeg_lossless_as_stored(node: Node, tmp_path: Path,
                                                    plain_labels: np.ndarray) -> None:
    """storescu -xs proposes JPEG Lossless SV1 beside the uncompressed syntaxes, each in a
    context of its own: the node accepts both and the files arrive as they are stored."""
    storescu = shutil.which("storescu")
    if storescu is None:
        pytest.skip("dcmtk is not installed (make system-deps installs it)")
    study = _compressed_study(tmp_path, uid.JPEGLosslessSV1, "dcmtk", "PAT-STORESCU")
    done = subprocess.run([storescu, "-xs", "-to", "30", "-aet", "STORESCU", "-aec",
                           node.ae_title, "127.0.0.1", str(node.port),
                           *map(str, study.files)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert node.wait_state(study.study_uid, ["done", "failed"])["state"] == "done"
    assert _spool_syntaxes(node, study.study_uid) == {uid.JPEGLosslessSV1}
    assert np.array_equal(_node_labels(node, study.study_uid), plain_labels)


def test_undecodable_syntax_is_refused_in_one_line_in_log_and_on_the_page(
        node: Node, tmp_path: Path) -> None:
    from pynetdicom import AE

    study = write_study(tmp_path / "study", patient_id="PAT-MPEG")
    ae = AE(ae_title="VIDEOSCU")
    ae.add_requested_context(str(pydicom.dcmread(study.ct[0]).SOPClassUID), [MPEG2])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert not assoc.is_established  # no context left: the sender gives up (and says little)
    line = (f"refused CT Image Storage from VIDEOSCU: MPEG2 Main Profile / Main Level "
            f"({MPEG2}) cannot be decoded: no decoder for it is known to pydicom")
    wait_until(lambda: line in node.output(), 30, "the refusal in the node's log")
    (logged,) = [text for text in node.output().splitlines() if line in text]
    assert logged.endswith("export the series uncompressed")
    page = node.page()
    assert "Transfer syntaxes refused" in page and line in page
    assert not (node.spool / "studies" / study.study_uid).exists()


@pytest.mark.parametrize("syntax", [uid.JPEGLosslessSV1, uid.JPEGLSLossless],
                         ids=["JPEGLosslessSV1", "JPEGLSLossless"])
def test_orthanc_sends_a_study_it_transcoded_and_a_study_level_resend_makes_no_second_seg(
        tmp_path: Path, model_dir: Path, plain_labels: np.ndarray, syntax: str) -> None:
    require_orthanc()
    node = Node(model_dir, tmp_path / "spool", http=True)
    pacs = TranscodingOrthanc(tmp_path / "pacs", syntax).start()
    try:
        node.extra = ("--send-to", pacs.send_to)
        node.start()
        # the node as a modality Orthanc must not transcode for: it sends what it stores
        pacs.put("/modalities/cmc", {"AET": node.ae_title, "Host": "127.0.0.1",
                                     "Port": node.port, "AllowTranscoding": False})
        study = write_study(tmp_path / "study", patient_id="PAT-ORTHANC-TS", grid="square")
        orthanc_study = pacs.upload(study.files)
        instance = pacs.get(f"/studies/{orthanc_study}/instances")[0]["ID"]
        assert pacs.get_bytes(f"/instances/{instance}/metadata/TransferSyntax").decode() == syntax
        pacs.post("/modalities/cmc/store", {"Resources": [orthanc_study], "Synchronous": True})
        state = node.wait_state(study.study_uid, ["done", "failed"])
        assert state["state"] == "done", state
        assert _spool_syntaxes(node, study.study_uid) == {syntax}
        assert np.array_equal(_node_labels(node, study.study_uid), plain_labels)
        (seg,) = pacs.wait_for_seg(study.study_uid)

        # the whole study again, now holding the SEG: Orthanc's job succeeds (a refused
        # instance would fail the synchronous job with an HTTP error), nothing is redone
        pacs.post("/modalities/cmc/store", {"Resources": [orthanc_study], "Synchronous": True})
        wait_until(lambda: "ignored Segmentation Storage instance" in node.output(), 30,
                   "the node to ignore its own SEG")
        state = node.state(study.study_uid)
        assert state["round"] == 1 and state["state"] == "done", state
        assert state["ignored"] == {"Segmentation Storage": 1}
        assert pacs.seg_instances(study.study_uid) == [seg]
        assert "ignored (not segmented): 1 Segmentation Storage" in node.page()
    finally:
        node.stop()
        pacs.stop()
