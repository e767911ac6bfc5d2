"""Compressed DICOM in: every transfer syntax a PACS stores segments like its uncompressed twin.

One CT + MR study of the threshold model's phantom is written uncompressed, segmented once,
then recoded by dcmtk (dcmcjpeg, dcmcjpls, dcmcrle, dcmconv) and by pydicom's own encoders
(JPEG 2000 via pylibjpeg-openjpeg, JPEG-LS via pyjpegls, RLE, Deflated) and segmented again
with `cmc segment`. Lossless syntaxes must give identical labels (and identical decoded
voxels); lossy ones (JPEG Baseline, JPEG-LS near-lossless, JPEG 2000 at 5:1) recode the CT
and must give identical labels while its voxels differ by a bounded amount, so the test shows
the lossy codec really ran. The series are 32 x 32: OpenJPEG refuses images smaller than its 6
resolution levels need.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import segment_fixtures as fx
from dicom_factory import recode_dcmtk, recode_pydicom
from orthanc_fixture import OrthancServer, orthanc_server
from pydicom import uid

from cmc_serve.dicom import load_series, scan_folder
from cmc_serve.dicom.decoders import can_decode, decodable_syntaxes, undecodable_reason

STUDY_UID = "1.2.826.0.1.3680043.8.498.2701"
Recoder = Callable[[list[Path], Path], list[Path]]


def _dcmtk(syntax: str) -> Recoder:
    return lambda paths, folder: recode_dcmtk(paths, folder, syntax)


def _pydicom(syntax: str, **options: object) -> Recoder:
    return lambda paths, folder: recode_pydicom(paths, folder, syntax, **options)


LOSSLESS = [
    ("jpeg-lossless-sv1-dcmtk", _dcmtk(uid.JPEGLosslessSV1)),
    ("jpeg-lossless-p14-dcmtk", _dcmtk(uid.JPEGLossless)),
    ("jpeg-ls-dcmtk", _dcmtk(uid.JPEGLSLossless)),
    ("jpeg-ls-pydicom", _pydicom(uid.JPEGLSLossless)),
    ("jpeg2000-lossless-pydicom", _pydicom(uid.JPEG2000Lossless)),
    ("rle-dcmtk", _dcmtk(uid.RLELossless)),
    ("rle-pydicom", _pydicom(uid.RLELossless)),
    ("deflated-dcmtk", _dcmtk(uid.DeflatedExplicitVRLittleEndian)),
    ("deflated-pydicom", _pydicom(uid.DeflatedExplicitVRLittleEndian)),
]
# lossy: (id, recoder, study fixture); JPEG Baseline holds 8 bits: a CT stored in 8 bits
LOSSY = [
    ("jpeg-baseline-dcmtk", _dcmtk(uid.JPEGBaseline8Bit), "plain_8bit"),
    ("jpeg-ls-near-lossless-dcmtk", _dcmtk(uid.JPEGLSNearLossless), "plain"),
    ("jpeg2000-lossy-pydicom", _pydicom(uid.JPEG2000, j2k_cr=[5]), "plain"),
]


def require_dcmtk() -> None:
    if shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmtk is not installed (make system-deps installs it)")


def write_study(root: Path, ct_bits: int = 16) -> Path:
    """CT (HU) and MR of the phantom, 32 x 32. An 8-bit CT stores HU / 8 + 128 (-1000 HU and
    200 HU are 3 and 153), which JPEG Baseline can hold."""
    ct = {"bits_allocated": 8, "slope": 8.0, "intercept": -1024.0} if ct_bits == 8 else {}
    fx.write_phantom_series(root / "ct", fx.ct_spec(
        STUDY_UID, rows=32, cols=32, origin=(-32.0, -32.0, -11.0), **ct))
    fx.write_phantom_series(root / "mr", fx.mr_spec(STUDY_UID, rows=32, cols=32))
    return root


def recode_study(study: Path, out: Path, recode: Recoder, with_mr: bool = True) -> Path:
    recode(sorted((study / "ct").iterdir()), out / "ct")
    if with_mr:
        recode(sorted((study / "mr").iterdir()), out / "mr")
    else:
        shutil.copytree(study / "mr", out / "mr")
    return out


def segment_labels(study: Path, out: Path, model_dir: Path) -> np.ndarray:
    r = fx.segment(study, "-o", out, "--model", model_dir, "--runtime", "onnxruntime")
    assert r.exit_code == 0, r.output
    (case,) = [p for p in out.iterdir() if p.is_dir()]
    return fx.read_labels(case / "seg.nii.gz")[0]


def volumes(study: Path) -> dict[str, np.ndarray]:
    return {s: load_series(scan_folder(study / s).volumes[0]).volume.array for s in ("ct", "mr")}


def transfer_syntaxes(study: Path) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            for p in study.rglob("*.dcm")}


Study = tuple[Path, np.ndarray, dict[str, np.ndarray]]


def _segmented(root: Path, model_dir: Path, ct_bits: int) -> Study:
    """The uncompressed study, its labels and its voxels."""
    study = write_study(root / "study", ct_bits)
    labels = segment_labels(study, root / "out", model_dir)
    assert (labels == 1).any() and (labels == 2).any()  # both balls: fused, both series read
    return study, labels, volumes(study)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Study:
    return _segmented(tmp_path_factory.mktemp("plain"), model_dir, 16)


@pytest.fixture(scope="module")
def plain_8bit(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Study:
    return _segmented(tmp_path_factory.mktemp("plain8"), model_dir, 8)


@pytest.mark.parametrize("name,recode", LOSSLESS, ids=[n for n, _ in LOSSLESS])
def test_lossless_syntax_segments_like_uncompressed(
        name: str, recode: Recoder, plain: Study, tmp_path: Path, model_dir: Path) -> None:
    require_dcmtk()
    study, labels, voxels = plain
    recoded = recode_study(study, tmp_path / "study", recode)
    assert transfer_syntaxes(recoded) != {uid.ExplicitVRLittleEndian}
    for series, array in volumes(recoded).items():
        np.testing.assert_array_equal(array, voxels[series], err_msg=series)
    np.testing.assert_array_equal(segment_labels(recoded, tmp_path / "out", model_dir), labels)


@pytest.mark.parametrize("name,recode,study", LOSSY, ids=[n for n, *_ in LOSSY])
def test_lossy_syntax_segments_like_uncompressed(
        name: str, recode: Recoder, study: str, request: pytest.FixtureRequest,
        tmp_path: Path, model_dir: Path) -> None:
    """The CT recoded lossily, the MR kept: same labels, while the CT's voxels changed (the
    codec really was lossy) by far less than its 1200 HU contrast. The MR stays lossless
    because the threshold model cuts MR at its mean, where any codec noise in the flat
    background flips voxels: a property of the test model, not of the decoding."""
    require_dcmtk()
    source, labels, voxels = request.getfixturevalue(study)
    recoded = recode_study(source, tmp_path / "study", recode, with_mr=False)
    ct_error = float(np.abs(volumes(recoded)["ct"] - voxels["ct"]).max())
    assert 0 < ct_error <= 300, ct_error
    np.testing.assert_array_equal(segment_labels(recoded, tmp_path / "out", model_dir), labels)


@pytest.mark.parametrize("name,recode", LOSSLESS, ids=[n for n, _ in LOSSLESS])
def test_signed_12_bit_ct_decodes_exactly(name: str, recode: Recoder, tmp_path: Path) -> None:
    """CT archives often store HU directly: signed (PixelRepresentation 1) 12-bit values in
    16-bit words, RescaleIntercept 0; the sign and the unused high bits must survive."""
    require_dcmtk()
    spec = fx.ct_spec(STUDY_UID, rows=32, cols=32, intercept=0.0, signed=True, bits_stored=12)
    paths = fx.write_phantom_series(tmp_path / "plain", spec)
    recode(paths, tmp_path / "recoded")
    plain = load_series(scan_folder(tmp_path / "plain").volumes[0]).volume.array
    assert plain.min() == fx.CT_BACKGROUND  # negative stored values
    np.testing.assert_array_equal(
        load_series(scan_folder(tmp_path / "recoded").volumes[0]).volume.array, plain)


def test_decodable_syntaxes_cover_what_pacs_store() -> None:
    for syntax in (uid.JPEGBaseline8Bit, uid.JPEGLossless, uid.JPEGLosslessSV1,
                   uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.JPEG2000Lossless,
                   uid.JPEG2000, uid.RLELossless, uid.DeflatedExplicitVRLittleEndian,
                   uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian):
        assert can_decode(syntax), syntax.name
        assert syntax in decodable_syntaxes()
        assert undecodable_reason(syntax) is None
    assert not can_decode(uid.MPEG2MPML)


def test_undecodable_syntax_is_one_line_naming_syntax_and_package(
        plain: Study, tmp_path: Path, model_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a host without python-gdcm: the JPEG Lossless decoder is not importable."""
    from pydicom.pixels import get_decoder

    import cmc_serve.dicom.decoders as decoders

    require_dcmtk()
    study = recode_study(plain[0], tmp_path / "study", _dcmtk(uid.JPEGLosslessSV1))
    # pydicom's own decoder for the syntax, with no plugin importable (restored afterwards)
    monkeypatch.setattr(get_decoder(uid.JPEGLosslessSV1), "_available", {})
    decoders.can_decode.cache_clear()
    try:
        reason = undecodable_reason(uid.JPEGLosslessSV1)
        assert reason == ("JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 "
                          "[Selection Value 1]) (1.2.840.10008.1.2.4.70) cannot be decoded "
                          "here: install python-gdcm (pip install 'cmc[serve]' declares it)")
        r = fx.segment(study, "-o", tmp_path / "out", "--model", model_dir)
    finally:
        decoders.can_decode.cache_clear()
    assert r.exit_code == 1
    assert reason in r.stderr
    assert "\n" not in reason


# ------------------------------------------------------- through a real PACS (Orthanc 1.10)

def _from_files(pacs: OrthancServer, study_uid: str, tmp_path: Path, model_dir: Path,
                syntax: str) -> np.ndarray:
    """The study's labels, its files fetched from Orthanc's REST API (stored as is)."""
    folder = tmp_path / "files"
    folder.mkdir()
    (orthanc_id,) = pacs.post("/tools/find", {"Level": "Study",
                                              "Query": {"StudyInstanceUID": study_uid}})
    for instance in pacs.get(f"/studies/{orthanc_id}/instances"):
        (folder / f"{instance['ID']}.dcm").write_bytes(
            pacs.get_bytes(f"/instances/{instance['ID']}/file"))
    assert transfer_syntaxes(folder) == {syntax}
    return segment_labels(folder, tmp_path / "out_files", model_dir)


def _from_dicomweb(pacs: OrthancServer, study_uid: str, tmp_path: Path, model_dir: Path
                   ) -> np.ndarray:
    """The study's labels through `cmc segment --from-dicomweb` (WADO-RS)."""
    r = fx.segment("--from-dicomweb", pacs.dicomweb, "--study", study_uid, "-o",
                   tmp_path / "out_web", "--model", model_dir, "--runtime", "onnxruntime")
    assert r.exit_code == 0, r.output
    (case,) = [p for p in (tmp_path / "out_web").iterdir() if p.is_dir()]
    return fx.read_labels(case / "seg.nii.gz")[0]


@pytest.mark.slow
@pytest.mark.parametrize("syntax", [uid.JPEGLosslessSV1, uid.JPEGLSLossless],
                         ids=["jpeg-lossless-sv1", "jpeg-ls"])
def test_study_transcoded_by_orthanc_segments_like_uncompressed(
        syntax: str, plain: Study, tmp_path: Path, model_dir: Path) -> None:
    """Orthanc's own transcoder (POST /studies/{id}/modify with Transcode) writes the
    compressed copy, as a PACS archiving compressed would (a new study UID: Force)."""
    study, labels, _ = plain
    for pacs in orthanc_server(tmp_path / "orthanc"):
        orthanc_id = pacs.upload(sorted(study.rglob("*.dcm")))
        copy = pacs.post(f"/studies/{orthanc_id}/modify", {"Transcode": syntax, "Force": True})
        copy_uid = pacs.get(f"/studies/{copy['ID']}")["MainDicomTags"]["StudyInstanceUID"]
        np.testing.assert_array_equal(
            _from_files(pacs, copy_uid, tmp_path, model_dir, syntax), labels)
        np.testing.assert_array_equal(_from_dicomweb(pacs, copy_uid, tmp_path, model_dir),
                                      labels)


@pytest.fixture
def j2k_pacs(plain: Study, tmp_path: Path) -> Iterator[OrthancServer]:
    """Orthanc holding the study in JPEG 2000 (Orthanc 1.10 cannot write JPEG 2000: the test
    encodes it, Orthanc stores it as is)."""
    recoded = recode_study(plain[0], tmp_path / "j2k", _pydicom(uid.JPEG2000Lossless))
    for pacs in orthanc_server(tmp_path / "orthanc"):
        pacs.upload(sorted(recoded.rglob("*.dcm")))
        yield pacs


@pytest.mark.slow
def test_jpeg2000_study_from_orthanc_files_segments_like_uncompressed(
        j2k_pacs: OrthancServer, plain: Study, tmp_path: Path, model_dir: Path) -> None:
    labels = _from_files(j2k_pacs, STUDY_UID, tmp_path, model_dir, uid.JPEG2000Lossless)
    np.testing.assert_array_equal(labels, plain[1])


@pytest.mark.slow
def test_jpeg2000_study_from_dicomweb_segments_like_uncompressed(
        j2k_pacs: OrthancServer, plain: Study, tmp_path: Path, model_dir: Path) -> None:
    """WADO-RS asks for the stored syntax (transfer-syntax=*): Orthanc cannot transcode JPEG
    2000 and answered HTTP 500 while cmc asked for Explicit VR Little Endian."""
    labels = _from_dicomweb(j2k_pacs, STUDY_UID, tmp_path, model_dir)
    np.testing.assert_array_equal(labels, plain[1])
