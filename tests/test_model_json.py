"""cmc.json's one writer (`cmc_serve.model_json`) against its one reader (`ModelInfo.load`).

What the writer records must come back from the reader unchanged, the record must not grow a
field the reader does not know of (or the reverse), and the file is written like every other
cmc output: atomically, with the mode a plain `open` gives, in the key order and indentation
exports have always had (users diff cmc.json between exports).
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

from cmc_serve.model_dir import ModelInfo
from cmc_serve.model_json import ModelJson, graph_entry, write_model_json

PREPROCESSING = {"modalities": ["ct", "mr"], "spacing": [2.0, 2.0, 2.0]}
KEY_ORDER = ["format", "format_version", "cmc_version", "name", "modalities", "classes",
             "patch_size", "max_batch", "preprocessing", "checkpoint_sha256", "graphs",
             "refused", "gate_thresholds", "postprocessing", "codes", "qc_reference", "triton"]


def _in_order(document: dict[str, object]) -> list[str]:
    return [key for key in KEY_ORDER if key in document]


def _model_dir(root: Path) -> ModelJson:
    """A model directory with one (unopened) graph file and a Triton repository file."""
    (root / "onnx").mkdir(parents=True)
    (root / "onnx" / "fused_fp32.onnx").write_bytes(b"graph bytes")
    (root / "repository" / "m" / "1").mkdir(parents=True)
    (root / "repository" / "m" / "config.pbtxt").write_text('name: "m"\n')
    return ModelJson(
        name="m", cmc_version="9.9.9", modalities=("ct", "mr"), classes=("bg", "liver"),
        patch_size=(16, 16, 16), max_batch=3, preprocessing=PREPROCESSING,
        graphs=[graph_entry("fused", "onnxruntime", "fp32", "onnx/fused_fp32.onnx",
                            {"max_abs_diff": 1e-6})],
        checkpoint_sha256="a" * 64, gate_thresholds={"max_abs_diff": 1e-4},
        triton_backend="python", triton_patch_models={"fused": "m_patch_fused"},
        qc_reference={"cases": 3})


def test_what_the_writer_records_the_reader_returns(tmp_path: Path) -> None:
    model = _model_dir(tmp_path)
    previous = os.umask(0o027)
    try:
        path = write_model_json(tmp_path, model)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    text = path.read_text()
    document = json.loads(text)
    assert text == json.dumps(document, indent=2) + "\n"
    assert list(document) == _in_order(document) and "triton" in document
    info = ModelInfo.load(tmp_path)
    assert (info.name, info.cmc_version, info.modalities, info.classes, info.patch_size,
            info.max_batch, info.preprocessing, info.checkpoint_sha256, info.qc_reference) == (
        "m", "9.9.9", ("ct", "mr"), ("bg", "liver"), (16, 16, 16), 3, PREPROCESSING,
        "a" * 64, {"cases": 3})
    assert info.checksums and [f.path.name for f in info.repository_files] == ["config.pbtxt"]
    (graph,) = info.graphs
    assert (graph.mode, graph.runtime, graph.precision, graph.gate) == (
        "fused", "onnxruntime", "fp32", {"max_abs_diff": 1e-6})


def test_without_checksums_and_triton_the_optional_sections_are_left_out(
        tmp_path: Path) -> None:
    model = dataclasses.replace(_model_dir(tmp_path), triton_backend=None, qc_reference=None,
                                gate_thresholds=None)
    document = json.loads(write_model_json(tmp_path, model, checksums=False).read_text())
    assert list(document) == KEY_ORDER[:12]  # up to `refused`: always there
    assert "files" not in document["graphs"][0]
    assert not ModelInfo.load(tmp_path).checksums


def test_the_record_mirrors_what_the_reader_parses() -> None:
    written = {f.name for f in dataclasses.fields(ModelJson)}
    read = {f.name for f in dataclasses.fields(ModelInfo)}
    # read from the directory itself, not from the record
    assert read - written == {"root", "repository_files"}
    # what the reader checks or leaves to other readers (Triton, `cmc export` reports)
    assert written - read == {"refused", "gate_thresholds", "triton_backend",
                              "triton_patch_models", "format_version"}
