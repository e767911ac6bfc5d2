"""Issue 19, items 4-9, from the user's side: damaged model files are refused (never an
`auto` fallback), outputs get the mode a plain `open` gives, a refused run creates nothing,
summary lines are never wrapped, library warnings do not reach stderr raw, a NIfTI header
that declares an impossible size is named, and concurrent shards into one OUT keep every
record."""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import segment_fixtures as fx

from cmc_serve.model_dir import ModelInfo
from cmc_serve.model_json import ModelJson, graph_entry, write_model_json

SHAPE = (14, 12, 10)
AFFINE = fx.ras_affine((2.0, 2.0, 2.0), SHAPE)
REPO = Path(__file__).parents[1]


def _image(path: Path, modality: str = "ct") -> Path:
    return fx.write_nifti(path, fx.phantom(SHAPE, AFFINE, modality), AFFINE)


def _model_with_openvino(root: Path, checksums: bool = True) -> Path:
    """The threshold model of segment_fixtures for mode a, as ONNX and as OpenVINO IR
    (what `cmc export` writes), with the files' sizes and sha256 in cmc.json."""
    import openvino as ov

    fx.make_model_dir(root, modes=("a",), checksums=checksums)
    xml = root / "openvino" / "a_fp32.xml"
    xml.parent.mkdir()
    ov.save_model(ov.convert_model(str(root / "onnx" / "a_fp32.onnx")), str(xml),
                  compress_to_fp16=False)
    info = ModelInfo.load(root)
    write_model_json(root, ModelJson(
        name=info.name, cmc_version=info.cmc_version, modalities=info.modalities,
        classes=info.classes, patch_size=info.patch_size, max_batch=info.max_batch,
        preprocessing=info.preprocessing, checkpoint_sha256=info.checkpoint_sha256,
        graphs=[graph_entry("a", "onnxruntime", "fp32", "onnx/a_fp32.onnx"),
                graph_entry("a", "openvino", "fp32", "openvino/a_fp32.xml")]),
        checksums=checksums)
    return root


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


# ------------------------------------------------------------------ 4: damaged graph files

def test_truncated_openvino_weights_are_refused_with_the_file_named(tmp_path: Path) -> None:
    """Today `--runtime auto` quietly runs ONNX Runtime instead; only report.json shows it."""
    model = _model_with_openvino(tmp_path / "model")
    image = _image(tmp_path / "c.nii.gz")
    ok = fx.segment(image, "-o", tmp_path / "good", "--model", model)
    assert ok.exit_code == 0, ok.output
    assert _report(tmp_path / "good")["engine"]["runtime"] == "openvino"

    weights = model / "openvino" / "a_fp32.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    r = fx.segment(image, "-o", out, "--model", model)
    assert r.exit_code == 2, r.output
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("cmc segment: error:")]
    assert f"{weights}:" in line and "cmc.json records" in line and "damaged" in line
    assert not out.exists()


def test_same_size_damage_is_caught_by_the_checksum(tmp_path: Path) -> None:
    model = _model_with_openvino(tmp_path / "model")
    weights = model / "openvino" / "a_fp32.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)  # zeroed, same size
    weights.write_bytes(bytes(data))
    for runtime in ("auto", "openvino"):
        r = fx.segment(_image(tmp_path / "c.nii.gz"), "-o", tmp_path / f"out-{runtime}",
                       "--model", model, "--runtime", runtime)
        assert r.exit_code == 2, r.output
        assert f"{weights}: sha256 " in r.stderr and "differs from" in r.stderr
        assert not (tmp_path / f"out-{runtime}").exists()


def test_damaged_graph_refused_by_the_python_api(tmp_path: Path) -> None:
    from cmc_serve.engine import Segmenter
    from cmc_serve.model_dir import ModelFileError

    model = _model_with_openvino(tmp_path / "model")
    graph = model / "onnx" / "a_fp32.onnx"
    graph.write_bytes(graph.read_bytes()[:-1] + b"\x00")
    with Segmenter(model, runtime="onnxruntime") as seg, \
            pytest.raises(ModelFileError, match=f"{graph}: sha256"):
        seg.segment(np.zeros((16, 16, 16), np.float32), mode="a")


def test_model_without_checksums_runs_with_a_warning(tmp_path: Path) -> None:
    """A cmc.json from before checksums is accepted; the user is told it cannot be verified,
    and an unreadable graph is still an error, not a quiet switch to another runtime."""
    model = _model_with_openvino(tmp_path / "model", checksums=False)
    image = _image(tmp_path / "c.nii.gz")
    r = fx.segment(image, "-o", tmp_path / "out", "--model", model)
    assert r.exit_code == 0, r.output
    assert (f"cmc segment: warning: {model / 'cmc.json'}: no checksums of the graph files"
            in r.stderr)
    assert _report(tmp_path / "out")["model"]["files_verified"] is False
    weights = model / "openvino" / "a_fp32.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    r = fx.segment(image, "-o", tmp_path / "out2", "--model", model)
    assert r.exit_code == 2, r.output
    assert f"{model / 'openvino' / 'a_fp32.xml'}: openvino cannot read the graph" in r.stderr


def test_export_records_size_and_sha256_of_every_graph_file_and_copy(tmp_path: Path) -> None:
    import hashlib

    from export_fixtures import write_micro_checkpoint

    from cmc_export.exporter import export

    out = tmp_path / "model"
    export(write_micro_checkpoint(tmp_path / "ckpt.pt"), out, formats=("onnx", "openvino"),
           precisions=("fp32",), modes=("a",), max_batch=2, log=lambda line: None)
    graphs = json.loads((out / "cmc.json").read_text())["graphs"]
    listed = {rel: rec for g in graphs for rel, rec in g["files"].items()}
    assert set(listed) == {"onnx/a_fp32.onnx", "openvino/a_fp32.xml", "openvino/a_fp32.bin"}
    for g in graphs:
        assert g["file"] in g["files"]
    repository = json.loads((out / "cmc.json").read_text())["triton"]["files"]
    assert set(repository) == {p.relative_to(out).as_posix()
                               for p in (out / "repository").rglob("*") if p.is_file()}
    for rel, rec in {**listed, **repository}.items():
        data = (out / rel).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    # `cmc serve` names a damaged repository copy before it starts a server
    (copy,) = (out / "repository").rglob("a_fp32.bin")
    copy.write_bytes(bytes(copy.stat().st_size))
    r = fx.run_cli("serve", out)
    assert r.exit_code == 2
    assert f"cmc serve: error: {copy}: sha256 " in r.stderr and "damaged" in r.stderr


# ------------------------------------------------------------------ 5: file modes

@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_outputs_get_the_mode_a_plain_open_gives(tmp_path: Path, umask: int) -> None:
    """Today every output is 0600 (mkstemp's mode carried over by the rename)."""
    study = tmp_path / "study"
    fx.write_phantom_series(study / "ct", fx.ct_spec("1.2.826.0.1.3680043.8.498.1901"))
    model = fx.make_model_dir(tmp_path / "model")
    out = tmp_path / "out"
    previous = os.umask(umask)
    try:
        r = fx.segment(study, "-o", out, "--model", model, "--runtime", "onnxruntime",
                       "--statistics", "--preview")
    finally:
        os.umask(previous)
    assert r.exit_code == 0, r.output
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"seg.dcm", "seg.nii.gz", "seg.json", "report.json",
                                       "statistics.json", "preview.png", "done", ".cmc-output"}
    modes = {p.relative_to(out).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


def test_checkpoint_gets_the_mode_a_plain_open_gives(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from export_fixtures import write_micro_checkpoint

    previous = os.umask(0o022)
    try:
        path = write_micro_checkpoint(tmp_path / "ckpt.pt")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# ------------------------------------------------------------------ 6: refused runs

def test_run_refused_for_its_runtime_creates_and_announces_nothing(tmp_path: Path) -> None:
    model = fx.make_model_dir(tmp_path / "model")
    out = tmp_path / "out"
    r = fx.segment(_image(tmp_path / "c.nii.gz"), "-o", out, "--model", model,
                   "--runtime", "tensorrt")
    assert r.exit_code == 2, r.output
    assert r.stderr.splitlines()[0] == "cmc segment: error: tensorrt runs on cuda only"
    assert "case(s) ->" not in r.stderr
    assert not out.exists()


# ------------------------------------------------------------------ 7: no wrapped lines

def test_paths_and_summary_lines_are_never_wrapped(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    model = fx.make_model_dir(tmp_path / "model")
    out = tmp_path / ("a folder with a long name, " * 3).strip() / "segmentations out"
    r = fx.segment(_image(tmp_path / "c.nii.gz"), "-o", out, "--model", model,
                   "--runtime", "onnxruntime")
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    assert f"cmc segment: 1 case(s) -> {out}" in lines
    assert f"cmc segment: 1 done, 0 failed, 0 skipped; report: {out / 'report.json'}" in lines

    zeros = fx.write_nifti(tmp_path / "zeros.nii.gz", np.zeros(SHAPE, np.float32), AFFINE)
    r = fx.segment(zeros, "-o", out, "--model", model, "--runtime", "onnxruntime")
    assert r.exit_code == 1
    assert f"cmc segment: failed cases are listed in {out / 'failures.csv'}" in (
        r.stderr.splitlines())


# ------------------------------------------------------------------ 8: library warnings, NIfTI size

def test_pydicom_warnings_become_one_line_notes_not_stderr_noise(tmp_path: Path) -> None:
    study = tmp_path / "study"
    paths = fx.write_phantom_series(study / "ct", fx.ct_spec("1.2.826.0.1.3680043.8.498.1902"))
    with warnings.catch_warnings():  # (writing it warns too)
        warnings.simplefilter("ignore")
        for path in paths:  # an over-long LO value: pydicom warns on every file it reads
            ds = pydicom.dcmread(path)
            ds.add_new(0x0008103E, "LO", "abdomen venous " + "x" * 70)
            ds.save_as(path)
    out = tmp_path / "out"
    r = fx.segment(study, "-o", out, "--model", fx.make_model_dir(tmp_path / "model"),
                   "--runtime", "onnxruntime")
    assert r.exit_code == 0, r.output
    assert "UserWarning" not in r.stderr and "site-packages" not in r.stderr
    (case,) = _report(out)["cases"]
    (note,) = [n for n in case["pairing"] if "pydicom:" in n]
    assert "exceeds the maximum length of 64 allowed for VR LO" in note
    assert note.endswith(f"({len(paths)} times)") and note.startswith("series 3 ")
    assert sum("pydicom:" in line for line in r.stderr.splitlines()) == 1


def test_nifti_declaring_an_impossible_size_is_named(tmp_path: Path) -> None:
    """Today: `cannot read voxel data (MemoryError: )`."""
    import gzip

    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((8, 8, 8))
    header["dim"][1:4] = 32767
    header.set_data_offset(352)
    header.set_sform(AFFINE, code=1)
    blob = header.binaryblock + b"\0" * 4 + np.ones(512, np.int16).tobytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.nii.gz").write_bytes(gzip.compress(blob))
    (tmp_path / "in" / "cut.nii").write_bytes(blob)
    out = tmp_path / "out"
    r = fx.segment(tmp_path / "in", "-o", out, "--model", fx.make_model_dir(tmp_path / "model"),
                   "--runtime", "onnxruntime")
    assert r.exit_code == 1
    with open(out / "failures.csv") as f:
        rows = {row["case_id"]: row["error"] for row in csv.DictReader(f)}
    declared = "header declares 32767x32767x32767 voxels of int16 (64 TiB)"
    assert declared in rows["big"] and "as float32, more than the" in rows["big"]
    assert declared in rows["cut"] and "the file holds 1024 bytes of voxel data" in rows["cut"]
    assert "MemoryError" not in r.stderr


# ------------------------------------------------------------------ 9: shards into one OUT

def _shard_inputs(folder: Path, n: int) -> None:
    for i in range(n):
        _image(folder / f"case{i}.nii.gz")
    fx.write_nifti(folder / "case_zeros.nii.gz", np.zeros(SHAPE, np.float32), AFFINE)


def test_three_concurrent_shards_into_one_out_keep_every_record(tmp_path: Path) -> None:
    """Today the last shard to finish rewrites OUT/report.json with its own cases only."""
    _shard_inputs(tmp_path / "in", 6)
    model = fx.make_model_dir(tmp_path / "model")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "cmc_cli.main", "segment", str(tmp_path / "in"), "-o", str(out),
         "--model", str(model), "--runtime", "onnxruntime", "--shard", f"{i}/3"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in (1, 2, 3)]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 0, 1], results  # the all-zero case fails in exactly one shard

    merged = _report(out)
    ids = [f"case{i}" for i in range(6)] + ["case_zeros"]
    assert [c["case_id"] for c in merged["cases"]] == ids
    assert merged["counts"] == {"done": 6, "failed": 1, "skipped": 0}
    assert merged["finished"] and merged["merged_shards"] == 3
    assert [s["state"] for s in merged["shards"]] == ["finished"] * 3
    with open(out / "failures.csv") as f:
        assert [row["case_id"] for row in csv.DictReader(f)] == ["case_zeros"]
    own = [_report(out / ".cmc-shards" / f"shard-{i}-of-3") for i in (1, 2, 3)]
    assert sorted(c["case_id"] for r in own for c in r["cases"]) == ids
    assert all(r["finished"] for r in own)
    assert sorted(p.parent.name for p in out.glob("*/done")) == ids[:6]
    assert not [p for p in out.rglob(".*") if p.name not in (".cmc-output", ".cmc-shards")]

    (out / "report.html").unlink()
    r = fx.run_cli("merge-shards", out)
    assert r.exit_code == 1 and f"failed cases are listed in {out / 'failures.csv'}" in r.stderr
    assert _report(out)["cases"] == merged["cases"]
    page = (out / "report.html").read_text()
    assert all(case_id in page for case_id in ids)  # every shard's cases on the one page


def test_merge_reports_a_missing_shard(tmp_path: Path) -> None:
    for i in range(3):
        _image(tmp_path / "in" / f"case{i}.nii.gz")
    out = tmp_path / "out"
    r = fx.segment(tmp_path / "in", "-o", out, "--model", fx.make_model_dir(tmp_path / "model"),
                   "--runtime", "onnxruntime", "--shard", "2/2", "--continue")
    assert r.exit_code == 0, r.output
    merged = _report(out)
    assert [s["state"] for s in merged["shards"]] == ["missing", "finished"]
    assert not merged["finished"]
    r = fx.run_cli("merge-shards", out)
    assert r.exit_code == 2 and "not every shard has finished" in r.stderr
    r = fx.run_cli("merge-shards", tmp_path / "in")
    assert r.exit_code == 2 and "no shard records" in r.stderr
