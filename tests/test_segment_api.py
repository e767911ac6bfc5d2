"""`cmc segment` from Python: `segment(...)` does what the command does, without a CLI.

The model is the threshold model of segment_fixtures (a real ONNX graph), so the labels the
call must write are known exactly; refused calls must raise SegmentError and create nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import segment_fixtures as fx

from cmc_serve.pipeline import SegmentError, SegmentOptionError, SegmentOptions, segment

SHAPE = (22, 20, 12)
AFFINE = fx.ras_affine(fx.SPACING, SHAPE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.make_model_dir(tmp_path_factory.mktemp("model"), modes=("a",))


def _ct(folder: Path, name: str = "pat1.nii.gz") -> Path:
    return fx.write_nifti(folder / name, fx.phantom(SHAPE, AFFINE, "ct"), AFFINE)


def test_segment_writes_the_case_and_its_report(tmp_path: Path, model_dir: Path) -> None:
    image = _ct(tmp_path / "in")
    out = tmp_path / "out"
    result = segment(image, out, model_dir,
                     options=SegmentOptions(runtime="onnxruntime", statistics=True))
    assert (result.done, result.failed, result.skipped) == (1, 0, 0)
    assert result.out == out and result.report == out / "report.json"
    assert result.failures is None and not (out / "failures.csv").exists()
    assert fx.case_files(out) == [".cmc-output", "pat1/done", "pat1/seg.json", "pat1/seg.nii.gz",
                                  "pat1/statistics.json", "report.html", "report.json"]
    labels, affine = fx.read_labels(out / "pat1" / "seg.nii.gz")
    np.testing.assert_allclose(affine, AFFINE)
    np.testing.assert_array_equal(labels, fx.expected_labels(SHAPE, AFFINE, "a"))
    (record,) = result.cases
    assert record.case_id == "pat1" and record.status == "done" and record.mode == "a"
    report = json.loads(result.report.read_text())
    assert report["counts"] == {"done": 1, "failed": 0, "skipped": 0}
    assert report["options"]["runtime"] == "onnxruntime"
    assert report["engine"]["runtime"] == "onnxruntime"

    again = segment(image, out, model_dir, options=SegmentOptions(resume=True))
    assert (again.done, again.failed, again.skipped) == (0, 0, 1)


def test_a_failing_case_is_counted_not_raised(tmp_path: Path, model_dir: Path) -> None:
    _ct(tmp_path / "in", "good.nii.gz")
    (tmp_path / "in" / "bad.nii.gz").write_bytes(b"not a nifti file")
    out = tmp_path / "out"
    result = segment(tmp_path / "in", out, model_dir)
    assert (result.done, result.failed) == (1, 1)
    assert result.failures == out / "failures.csv" and result.failures.is_file()
    failed = [c for c in result.cases if c.status == "failed"]
    assert [c.case_id for c in failed] == ["bad"] and failed[0].stage == "read"
    assert not (out / "bad").exists()


@pytest.mark.parametrize(("where", "message"), [
    ("inside_input", "the output folder must not be inside the input folder"),
    ("missing_model", "no_model"),
    ("dicom_seg_for_nifti", "--output-type dicom-seg needs DICOM input"),
    ("triton_without_server", "--runtime triton needs --server"),
])
def test_refused_call_raises_and_creates_nothing(tmp_path: Path, model_dir: Path, where: str,
                                                 message: str) -> None:
    _ct(tmp_path / "in")
    out = tmp_path / "in" / "out" if where == "inside_input" else tmp_path / "out"
    model = tmp_path / "no_model" if where == "missing_model" else model_dir
    options = {"dicom_seg_for_nifti": SegmentOptions(output_types=("dicom-seg",)),
               "triton_without_server": SegmentOptions(runtime="triton")}.get(where)
    with pytest.raises(SegmentError, match=message) as info:
        segment(tmp_path / "in", out, model, options=options)
    assert "\n" not in str(info.value)
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["pat1.nii.gz"]


@pytest.mark.parametrize(("fields", "option"), [
    ({"mode": "both"}, "mode"),
    ({"runtime": "tensorflow"}, "runtime"),
    ({"output_types": ("png",)}, "output_types"),
    ({"output_types": "nifti"}, "output_types"),
    ({"overlap": 1.0}, "overlap"),
    ({"jobs": 0}, "jobs"),
    ({"shard": (3, 2)}, "shard"),
])
def test_bad_options_are_refused_at_construction(fields: dict, option: str) -> None:
    with pytest.raises(SegmentOptionError) as info:
        SegmentOptions(**fields)
    assert info.value.option == option
    assert isinstance(info.value, ValueError) and isinstance(info.value, SegmentError)
