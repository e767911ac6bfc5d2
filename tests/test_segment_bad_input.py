"""Bad input to `cmc segment`: one clear line naming the file and the problem, and no output.

Problems found before any case runs (nothing to segment, unusable model, unusable OUT) exit
with 2 and create nothing. Problems of a case (its images) exit with 1; OUT then holds only
the run's report.json and failures.csv, never a segmentation.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import segment_fixtures as fx
from dicom_factory import SeriesSpec, write_series

SHAPE = (12, 12, 8)
AFFINE = fx.ras_affine((2.0, 2.0, 2.0), SHAPE)
UID = "1.2.826.0.1.3680043.8.498.555"


def _error_line(stderr: str, fragment: str) -> str:
    lines = [line for line in stderr.splitlines() if fragment in line]
    assert lines, stderr
    return lines[0]


def _ct_series(folder: Path) -> list[Path]:
    return fx.write_phantom_series(folder, fx.ct_spec(UID))


# --------------------------------------------------------------- before any case: exit 2

def _empty(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _not_dicom(tmp: Path) -> Path:
    folder = tmp / "junk"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    (folder / "blob.dcm").write_bytes(os.urandom(2048))
    return folder


@pytest.mark.parametrize(("make", "fragment"), [
    (_empty, "empty: folder is empty"),
    (_not_dicom, "junk: no DICOM series found (2 files, none a DICOM series)"),
])
def test_nothing_to_segment(tmp_path: Path, model_dir: Path, make: Callable[[Path], Path],
                            fragment: str) -> None:
    out = tmp_path / "out"
    r = fx.segment(make(tmp_path), "-o", out, "--model", model_dir)
    assert r.exit_code == 2
    assert _error_line(r.stderr, fragment).startswith("cmc segment: error: ")
    assert not out.exists()


def test_model_dir_from_another_version(tmp_path: Path) -> None:
    model = fx.make_model_dir(tmp_path / "model", modes=("a",), format_version=2)
    image = fx.write_nifti(tmp_path / "c.nii.gz", fx.phantom(SHAPE, AFFINE, "ct"), AFFINE)
    r = fx.segment(image, "-o", tmp_path / "out", "--model", model)
    assert r.exit_code == 2
    line = _error_line(r.stderr, "format_version 2 is not supported")
    assert "cmc.json" in line and "re-export" in line
    assert not (tmp_path / "out").exists()


def test_unwritable_output(tmp_path: Path, model_dir: Path) -> None:
    image = fx.write_nifti(tmp_path / "c.nii.gz", fx.phantom(SHAPE, AFFINE, "ct"), AFFINE)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = fx.segment(image, "-o", blocker / "out", "--model", model_dir)
    assert r.exit_code == 2
    _error_line(r.stderr, f"{blocker / 'out'}: cannot write output folder")
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output(tmp_path: Path, model_dir: Path) -> None:
    image = fx.write_nifti(tmp_path / "c.nii.gz", fx.phantom(SHAPE, AFFINE, "ct"), AFFINE)
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        r = fx.segment(image, "-o", out, "--model", model_dir)
    finally:
        out.chmod(0o700)
    assert r.exit_code == 2
    _error_line(r.stderr, f"{out}: cannot write output folder")
    assert not any(out.iterdir())


# --------------------------------------------------------------- a bad case: exit 1

def _truncated(tmp: Path) -> Path:
    paths = _ct_series(tmp / "series")
    data = paths[3].read_bytes()
    paths[3].write_bytes(data[: len(data) - 300])  # cut inside the pixel data
    return tmp / "series"


def _missing_slice(tmp: Path) -> Path:
    _ct_series(tmp / "series")[4].unlink()
    return tmp / "series"


def _duplicate_positions(tmp: Path) -> Path:
    spec = SeriesSpec(study_uid=UID)
    positions = spec.positions()
    positions[3] = positions[2]
    write_series(tmp / "series", spec, positions=positions)
    return tmp / "series"


def _nifti(tmp: Path, array: np.ndarray) -> Path:
    path = tmp / "img.nii.gz"
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))
    return path


def _four_d(tmp: Path) -> Path:
    return _nifti(tmp, np.ones((*SHAPE, 2), np.float32))


def _nan(tmp: Path) -> Path:
    image = fx.phantom(SHAPE, AFFINE, "ct")
    image[3, 4, 5] = np.nan
    return _nifti(tmp, image)


def _all_zero(tmp: Path) -> Path:
    return _nifti(tmp, np.zeros(SHAPE, np.float32))


@pytest.mark.parametrize(("make", "stage", "fragment"), [
    (_truncated, "read", "IM0003.dcm: "),
    (_missing_slice, "read", "series: 1 missing slice(s) between IM0003.dcm and IM0005.dcm"),
    (_duplicate_positions, "read", "series: duplicate slice position"),
    (_four_d, "read", "img.nii.gz: expected a 3D image, got shape (12, 12, 8, 2)"),
    (_nan, "read", "img.nii.gz: image contains NaN or infinite values"),
    (_all_zero, "read", "img.nii.gz: image is all zeros"),
])
def test_bad_case(tmp_path: Path, model_dir: Path, make: Callable[[Path], Path], stage: str,
                  fragment: str) -> None:
    out = tmp_path / "out"
    r = fx.segment(make(tmp_path), "-o", out, "--model", model_dir, "--runtime", "onnxruntime")
    assert r.exit_code == 1, r.output
    line = _error_line(r.stderr, fragment)
    assert line.startswith("FAILED ") and f"({stage})" in line
    assert fx.case_files(out) == [".cmc-output", "failures.csv", "report.html", "report.json"]
    assert fragment in (out / "failures.csv").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"done": 0, "failed": 1, "skipped": 0}


def test_fused_mode_without_modality_b(tmp_path: Path, model_dir: Path) -> None:
    _ct_series(tmp_path / "study" / "ct")
    out = tmp_path / "out"
    r = fx.segment(tmp_path / "study", "-o", out, "--model", model_dir, "--mode", "fused")
    assert r.exit_code == 1
    _error_line(r.stderr, "modality b (mr) required by --mode fused but absent")
    assert fx.case_files(out) == [".cmc-output", "failures.csv", "report.html", "report.json"]


def test_bad_option_values(tmp_path: Path, model_dir: Path) -> None:
    image = fx.write_nifti(tmp_path / "c.nii.gz", fx.phantom(SHAPE, AFFINE, "ct"), AFFINE)
    for option in (["--mode", "both"], ["--output-type", "png"], ["--runtime", "tensorflow"]):
        r = fx.segment(image, "-o", tmp_path / "out", "--model", model_dir, *option)
        assert r.exit_code == 2, option
    r = fx.segment(image, "-o", tmp_path / "out", "--model", model_dir, "--output-type",
                   "dicom-seg")
    assert r.exit_code == 2
    _error_line(r.stderr, "--output-type dicom-seg needs DICOM input")
    r = fx.segment(image, "-o", tmp_path / "out", "--model", model_dir, "--runtime", "triton")
    assert r.exit_code == 2
    _error_line(r.stderr, "--runtime triton needs --server")
    r = fx.segment(tmp_path, "-o", tmp_path / "out", "--model", model_dir)
    assert r.exit_code == 2
    _error_line(r.stderr, "the output folder must not be inside the input folder")
    assert not (tmp_path / "out").exists()


def test_unavailable_runtime_stops_the_run(tmp_path: Path, model_dir: Path) -> None:
    """A runtime that cannot run here is one run-level error, not N identical case failures."""
    for i in range(2):
        fx.write_nifti(tmp_path / "in" / f"c{i}.nii.gz", fx.phantom(SHAPE, AFFINE, "ct"), AFFINE)
    out = tmp_path / "out"
    r = fx.segment(tmp_path / "in", "-o", out, "--model", model_dir, "--runtime", "tensorrt")
    assert r.exit_code == 2
    _error_line(r.stderr, "cmc segment: error: tensorrt runs on cuda only")
    assert "FAILED" not in r.stderr
    assert not out.exists()  # refused before OUT is created (issue 19, item 6)


def test_unreachable_triton_server_stops_the_run(tmp_path: Path, model_dir: Path) -> None:
    from cmc_common.contract import patch_model_name

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    image = fx.write_nifti(tmp_path / "c.nii.gz", fx.phantom(SHAPE, AFFINE, "ct"), AFFINE)
    out = tmp_path / "out"
    r = fx.segment(image, "-o", out, "--model", model_dir, "--runtime", "triton", "--server",
                   f"grpc://127.0.0.1:{port}")
    assert r.exit_code == 2
    model = patch_model_name("cmc-test", "a")
    _error_line(r.stderr, f"Triton at grpc://127.0.0.1:{port} (model {model}): server unreachable")
    assert not out.exists()  # refused before OUT is created (issue 19, item 6)
