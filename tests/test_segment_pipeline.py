"""`cmc segment` end to end: NIfTI and DICOM cases, outputs, report, batch behaviour.

The model is the threshold model of segment_fixtures (a real ONNX graph), so the correct
labels on the source grid are known exactly.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import segment_fixtures as fx
from dicom_factory import SeriesSpec
from PIL import Image

from cmc_common.contract import MODES


def _ct_mr_nifti(folder: Path) -> tuple[Path, Path, np.ndarray, tuple[int, int, int]]:
    """CT on a 2 mm RAS grid; MR on another grid (LPS, 1.5 mm) of the same world."""
    shape = (22, 20, 12)
    aff_a = fx.ras_affine((2.0, 2.0, 2.0), shape)
    shape_b = (28, 26, 16)
    aff_b = np.diag([-1.5, -1.5, 1.5, 1.0])
    aff_b[:3, 3] = (20.0, 19.0, -11.0)
    a = fx.write_nifti(folder / "pat1_ct.nii.gz", fx.phantom(shape, aff_a, "ct"), aff_a)
    b = fx.write_nifti(folder / "pat1_mr.nii.gz", fx.phantom(shape_b, aff_b, "mr"), aff_b)
    return a, b, aff_a, shape


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _seg_frames(seg_path: Path, labels: np.ndarray, sources: list[pydicom.Dataset],
                classes: list[str]) -> None:
    """Every SEG frame equals the labels of the source slice it references, at its position."""
    seg = pydicom.dcmread(seg_path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.SegmentationType == "BINARY"
    segment_class = {int(s.SegmentNumber): classes.index(s.SegmentLabel)
                     for s in seg.SegmentSequence}
    by_uid = {ds.SOPInstanceUID: k for k, ds in enumerate(sources)}
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    seen = np.zeros_like(labels, dtype=bool)
    shared = seg.SharedFunctionalGroupsSequence[0]  # one segment: identified here
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = by_uid[uid]
        ident = group if "SegmentIdentificationSequence" in group else shared
        cls = segment_class[int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in sources[k].ImagePositionPatient],
                                   atol=1e-3)
        expected = labels[:, :, k].T == cls  # labels are [column, row, slice]
        np.testing.assert_array_equal(frame.astype(bool), expected)
        seen[:, :, k] |= expected.T
    # omitted frames are empty: every labelled voxel appears in some frame
    np.testing.assert_array_equal(seen, labels > 0)


def _dciodvfy(path: Path) -> None:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy not installed (make system-deps installs dicom3tools)")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


def test_nifti_pair_fused_exact_labels_statistics_preview_report(tmp_path: Path,
                                                                 model_dir: Path) -> None:
    a, b, aff_a, shape = _ct_mr_nifti(tmp_path / "in")
    out = tmp_path / "out"
    r = fx.segment(a, b, "-o", out, "--model", model_dir, "--runtime", "onnxruntime",
                   "--statistics", "--preview")
    assert r.exit_code == 0, r.output
    case = out / "pat1_ct"
    labels, affine = fx.read_labels(case / "seg.nii.gz")
    expected = fx.expected_labels(shape, aff_a, "fused")
    assert labels.dtype == np.uint8 and labels.shape == shape
    np.testing.assert_allclose(affine, aff_a, atol=1e-5)
    # class 1 comes from the CT on its own 2 mm grid: exact
    np.testing.assert_array_equal(labels == 1, expected == 1)
    # class 2 comes from the MR, resampled from another grid into the CT's world grid
    fx.assert_ball_b(labels, aff_a)
    assert json.loads((case / "seg.json").read_text())["labels"] == {
        "0": "background", "1": "bright_a", "2": "bright_b"}

    stats = json.loads((case / "statistics.json").read_text())["classes"]
    assert stats["bright_a"]["voxels"] == int((labels == 1).sum())
    assert stats["bright_a"]["volume_ml"] == pytest.approx((labels == 1).sum() * 8 / 1000)
    assert stats["bright_a"]["intensity"]["ct"] == {"mean": 200.0, "median": 200.0}
    assert stats["bright_b"]["intensity"]["mr"]["median"] > 50  # MR is bright there
    assert stats["bright_b"]["intensity"]["ct"]["mean"] == -1000.0

    png = Image.open(case / "preview.png")
    assert png.format == "PNG" and png.width > 3 * 64
    colours = {tuple(c) for c in np.asarray(png.convert("RGB")).reshape(-1, 3)}
    assert any(len(set(c)) > 1 for c in colours)  # coloured overlay on the grey image

    rep = _report(out)
    assert rep["engine"] == {"runtime": "onnxruntime", "device": "cpu", "precision": "fp32",
                             "precision_reason": "auto: fp32 (onnxruntime on cpu runs fp32 "
                                                 "fastest)"}
    assert {"numpy", "onnxruntime", "pydicom", "highdicom", "nibabel"} <= set(rep["versions"])
    (entry,) = rep["cases"]
    assert entry["status"] == "done" and entry["mode"] == "fused"
    assert {"read", "preprocess", "infer", "postprocess", "write", "total"} <= set(
        entry["timings"])
    assert any(p.startswith("a (ct) <- ") for p in entry["pairing"])
    assert any("resampled into a's world grid" in p for p in entry["pairing"])
    assert fx.case_files(out) == [".cmc-output", "pat1_ct/done", "pat1_ct/preview.png",
                                  "pat1_ct/seg.json", "pat1_ct/seg.nii.gz",
                                  "pat1_ct/statistics.json", "report.html", "report.json"]


def _study(root: Path, uid: str, with_mr: bool = True, scout: bool = False) -> SeriesSpec:
    ct = fx.ct_spec(uid)
    fx.write_phantom_series(root / "ct", ct)
    if with_mr:
        fx.write_phantom_series(root / "mr", fx.mr_spec(uid))
    if scout:
        fx.write_phantom_series(root / "scout", fx.ct_spec(
            uid, n_slices=1, description="Topogram", series_number=1,
            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")))
    return ct


def test_dicom_study_pairs_by_tags_and_writes_valid_seg(tmp_path: Path, model_dir: Path) -> None:
    ct = _study(tmp_path / "study", "1.2.826.0.1.3680043.8.498.77", scout=True)
    out = tmp_path / "out"
    r = fx.segment(tmp_path / "study", "-o", out, "--model", model_dir, "--runtime",
                   "onnxruntime")
    assert r.exit_code == 0, r.output
    (case,) = [p for p in out.iterdir() if p.is_dir()]
    assert case.name.startswith("PHANTOM-1_")
    record = json.loads((case / "done").read_text())
    assert record["mode"] == "fused"
    assert any(p.startswith("a (ct) <- series 3 'abdomen venous'") for p in record["pairing"])
    assert any(p.startswith("b (mr) <- series 5 't1 coronal'") for p in record["pairing"])
    assert "a (ct) <- series 3" in r.stderr  # the choice is logged, not only stored

    labels, affine = fx.read_labels(case / "seg.nii.gz")
    shape = (ct.cols, ct.rows, ct.n_slices)
    np.testing.assert_allclose(affine, fx.dicom_affine(ct), atol=1e-4)
    expected = fx.expected_labels(shape, fx.dicom_affine(ct), "fused")
    np.testing.assert_array_equal(labels == 1, expected == 1)
    fx.assert_ball_b(labels, affine)

    sources = sorted((pydicom.dcmread(p) for p in (tmp_path / "study" / "ct").iterdir()),
                     key=lambda d: float(d.ImagePositionPatient[2]))
    _seg_frames(case / "seg.dcm", labels, sources, fx.CLASSES)
    _dciodvfy(case / "seg.dcm")


def test_real_pydicom_ct_series_gives_valid_seg_on_its_grid(tmp_path: Path,
                                                            model_dir: Path) -> None:
    from cmc_serve.dicom import load_series, scan_folder

    folder = fx.DICOMDIRTESTS / "98892001" / "CT5N"
    out = tmp_path / "out"
    r = fx.segment(folder, "-o", out, "--model", model_dir, "--runtime", "onnxruntime",
                   "--statistics")
    assert r.exit_code == 0, r.output
    (case,) = [p for p in out.iterdir() if p.is_dir()]
    loaded = load_series(scan_folder(folder).volumes[0])
    labels, affine = fx.read_labels(case / "seg.nii.gz")
    assert labels.shape == loaded.volume.shape == (16, 16, 5)  # smaller than one patch
    np.testing.assert_allclose(affine, loaded.volume.affine, atol=1e-5)
    assert json.loads((case / "done").read_text())["mode"] == "a"  # CT only: single modality
    assert (labels == 1).any() and not (labels == 2).any()
    _seg_frames(case / "seg.dcm", labels, list(loaded.datasets), fx.CLASSES)
    _dciodvfy(case / "seg.dcm")


def test_input_b_with_the_wrong_modality_is_refused(tmp_path: Path, model_dir: Path) -> None:
    """Channel order is never silently wrong: MR given as a, CT as b."""
    uid = "1.2.826.0.1.3680043.8.498.78"
    fx.write_phantom_series(tmp_path / "ct", fx.ct_spec(uid))
    fx.write_phantom_series(tmp_path / "mr", fx.mr_spec(uid))
    out = tmp_path / "out"
    r = fx.segment(tmp_path / "mr", tmp_path / "ct", "-o", out, "--model", model_dir)
    assert r.exit_code == 1
    assert "given as a (ct) but no series matches (Modality in ['CT']" in r.stderr
    assert "it holds series 5 't1 coronal' [MR" in r.stderr
    assert "give the ct series as INPUT" in r.stderr
    assert not [p for p in out.iterdir() if p.is_dir()]


def _batch(root: Path) -> None:
    """Three studies; the third misses a slice."""
    _study(root / "s1", "1.2.826.0.1.3680043.8.498.101", with_mr=False)
    _study(root / "s2", "1.2.826.0.1.3680043.8.498.102")
    spec = fx.ct_spec("1.2.826.0.1.3680043.8.498.103")
    paths = fx.write_phantom_series(root / "s3" / "ct", spec)
    paths[5].unlink()


def test_batch_one_corrupt_study_then_continue(tmp_path: Path, model_dir: Path) -> None:
    _batch(tmp_path / "in")
    out = tmp_path / "out"
    r = fx.segment(tmp_path / "in", "-o", out, "--model", model_dir, "--runtime", "onnxruntime",
                   "--jobs", "2")
    assert r.exit_code == 1
    rep = _report(out)
    assert rep["counts"] == {"done": 2, "failed": 1, "skipped": 0}
    with open(out / "failures.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["stage"] == "read" and "missing slice" in row["error"]
    assert not (out / row["case_id"]).exists()
    done = sorted(p.parent.name for p in out.glob("*/done"))
    assert len(done) == 2 and row["case_id"] not in done
    assert {c["mode"] for c in rep["cases"] if c["status"] == "done"} == {"a", "fused"}
    stamps = {d: (out / d / "seg.nii.gz").stat().st_mtime_ns for d in done}

    r = fx.segment(tmp_path / "in", "-o", out, "--model", model_dir, "--runtime",
                   "onnxruntime", "--continue")
    assert r.exit_code == 1  # the corrupt study is retried and fails again
    rep = _report(out)
    assert rep["counts"] == {"done": 0, "failed": 1, "skipped": 2}
    assert {d: (out / d / "seg.nii.gz").stat().st_mtime_ns for d in done} == stamps


def test_shards_cover_every_case_once(tmp_path: Path, model_dir: Path) -> None:
    shape = (12, 12, 8)
    aff = fx.ras_affine((2.0, 2.0, 2.0), shape)
    for i in range(5):
        fx.write_nifti(tmp_path / "in" / f"case{i}.nii.gz", fx.phantom(shape, aff, "ct"), aff)
    seen = []
    for shard in ("1/2", "2/2"):
        out = tmp_path / f"out{shard[0]}"
        r = fx.segment(tmp_path / "in", "-o", out, "--model", model_dir, "--shard", shard,
                       "--runtime", "onnxruntime")
        assert r.exit_code == 0, r.output
        seen += [c["case_id"] for c in _report(out)["cases"]]
    assert sorted(seen) == [f"case{i}" for i in range(5)]
    assert fx.segment(tmp_path / "in", "-o", tmp_path / "x", "--model", model_dir,
                      "--shard", "3/2").exit_code == 2


def test_model_loaded_once_and_jobs_give_same_result(tmp_path: Path, model_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import cmc_serve.engine

    opened = []
    real = cmc_serve.engine.open_runtime

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(cmc_serve.engine, "open_runtime", counting)
    shape = (14, 12, 10)
    aff = fx.ras_affine((2.0, 2.0, 2.0), shape)
    for i in range(3):
        fx.write_nifti(tmp_path / "in" / f"c{i}_0000.nii.gz", fx.phantom(shape, aff, "ct"), aff)
        fx.write_nifti(tmp_path / "in" / f"c{i}_0001.nii.gz", fx.phantom(shape, aff, "mr"), aff)
    results = []
    for jobs in ("1", "3"):
        out = tmp_path / f"out{jobs}"
        r = fx.segment(tmp_path / "in", "-o", out, "--model", model_dir, "--jobs", jobs,
                       "--runtime", "onnxruntime")
        assert r.exit_code == 0, r.output
        results.append([fx.read_labels(out / f"c{i}" / "seg.nii.gz")[0] for i in range(3)])
    assert opened == ["fused", "fused"]  # one runtime per run, not per case
    for one, three in zip(*results, strict=True):
        np.testing.assert_array_equal(one, three)
    np.testing.assert_array_equal(results[0][0], fx.expected_labels(shape, aff, "fused"))


def test_failure_while_writing_leaves_no_partial_file(tmp_path: Path, model_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    shape = (12, 12, 8)
    aff = fx.ras_affine((2.0, 2.0, 2.0), shape)
    image = fx.write_nifti(tmp_path / "in" / "c.nii.gz", fx.phantom(shape, aff, "ct"), aff)
    real_save = nib.save

    def crash(img, filename):  # type: ignore[no-untyped-def]
        Path(filename).write_bytes(b"partial")  # half-written bytes, then the "kill"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", crash)
    out = tmp_path / "out"
    r = fx.segment(image, "-o", out, "--model", model_dir, "--runtime", "onnxruntime")
    assert r.exit_code == 1
    assert "FAILED c (write): [Errno 28] No space left on device" in r.stderr
    assert fx.case_files(out) == [".cmc-output", "failures.csv", "report.html", "report.json"]

    # a run killed mid-case leaves files without `done`: --continue redoes that case
    monkeypatch.setattr(nib, "save", real_save)
    (out / "c").mkdir()
    (out / "c" / "seg.nii.gz").write_bytes(b"stale")
    (out / "c" / ".seg.nii.gz.x1y2.nii.gz").write_bytes(b"temp")
    r = fx.segment(image, "-o", out, "--model", model_dir, "--runtime", "onnxruntime",
                   "--continue")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (out / "c").iterdir()) == ["done", "seg.json", "seg.nii.gz"]
    np.testing.assert_array_equal(fx.read_labels(out / "c" / "seg.nii.gz")[0],
                                  fx.expected_labels(shape, aff, "a"))
    assert not (out / "failures.csv").exists()


def test_foreign_output_folder_is_refused(tmp_path: Path, model_dir: Path) -> None:
    shape = (12, 12, 8)
    aff = fx.ras_affine((2.0, 2.0, 2.0), shape)
    image = fx.write_nifti(tmp_path / "in" / "c.nii.gz", fx.phantom(shape, aff, "ct"), aff)
    out = tmp_path / "patient_data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = fx.segment(image, "-o", out, "--model", model_dir)
    assert r.exit_code == 2
    assert "was not written by cmc" in r.stderr
    assert fx.case_files(out) == ["notes.txt"]


def test_cli_runs_without_torch(tmp_path: Path, model_dir: Path) -> None:
    """cmc_serve and `cmc segment` never import torch, monai, cmc_train or cmc_export."""
    shape = (12, 12, 8)
    aff = fx.ras_affine((2.0, 2.0, 2.0), shape)
    image = fx.write_nifti(tmp_path / "c.nii.gz", fx.phantom(shape, aff, "ct"), aff)
    code = ("import sys\n"
            "for m in ('torch', 'monai', 'cmc_train', 'cmc_export'): sys.modules[m] = None\n"
            "from cmc_cli.main import app\n"
            f"app(['segment', {str(image)!r}, '-o', {str(tmp_path / 'out')!r}, "
            f"'--model', {str(model_dir)!r}, '--preview', '--statistics'])\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parents[1],
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "c" / "done").is_file()
    rep = _report(tmp_path / "out")
    assert rep["engine"]["runtime"] in ("openvino", "onnxruntime")  # --runtime auto


@pytest.mark.triton
def test_triton_runtime_gives_the_local_result(tmp_path: Path, triton_install: object) -> None:
    """`--runtime triton --server URL`: tiles go to a real local tritonserver."""
    from cmc_export.triton_repository import PatchGraph, write_repository
    from cmc_serve.triton.server import TritonServer

    model = fx.make_model_dir(tmp_path / "model")
    graphs = [PatchGraph(mode, "onnxruntime", "fp32", model / "onnx" / f"{mode}_fp32.onnx")
              for mode in MODES]
    write_repository(model / "repository", "cmc-test", "python", graphs, fx.PATCH,
                     len(fx.CLASSES), 4)
    a, b, _, _ = _ct_mr_nifti(tmp_path / "in")
    r = fx.segment(a, b, "-o", tmp_path / "local", "--model", model, "--runtime", "onnxruntime")
    assert r.exit_code == 0, r.output
    with TritonServer(model / "repository", install=triton_install,
                      ready_timeout_s=90) as server:
        r = fx.segment(a, b, "-o", tmp_path / "remote", "--model", model, "--runtime", "triton",
                       "--server", f"grpc://{server.grpc_url}")
    assert r.exit_code == 0, r.output
    assert _report(tmp_path / "remote")["engine"]["runtime"] == "triton"
    remote, _ = fx.read_labels(tmp_path / "remote" / "pat1_ct" / "seg.nii.gz")
    local, _ = fx.read_labels(tmp_path / "local" / "pat1_ct" / "seg.nii.gz")
    np.testing.assert_array_equal(remote, local)
