"""`cmc export` end to end on a micro checkpoint: layout, metadata, cmc.json, refusals, atomicity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cmc_cli.main import app
from export_fixtures import CLASSES, MICRO, write_micro_checkpoint
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from typer.testing import CliRunner

from cmc_export.errors import ExportError, GateFailed
from cmc_export.exporter import export, sha256_file
from cmc_export.gates import Thresholds
from cmc_export.onnx_export import onnxruntime_runner, read_metadata_props
from cmc_export.openvino_export import unsupported_reason
from cmc_serve.model_dir import ModelInfo
from cmc_train.checkpoint import CheckpointError

S = MICRO.img_size
MODES = ("fused", "a")
# One cheap export for the tests that only need *an* export to exist or be refused.
SMALL = {"formats": ("onnx",), "precisions": ("fp32",), "modes": ("b",), "log": lambda _: None}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_micro_checkpoint(tmp_path_factory.mktemp("ckpt") / "micro.pt")


@pytest.fixture(scope="module")
def exported(ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    lines: list[str] = []
    out = tmp_path_factory.mktemp("export") / "model"
    report = export(ckpt, out, formats=("onnx", "openvino"), modes=MODES, max_batch=4,
                    log=lines.append)  # precision auto: fp32 + every half precision gated here
    return out, report, lines


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.slow  # shares one full export (about 30 s on 2 idle cores)
def test_layout_and_cmc_json_load_in_cmc_serve(exported, ckpt: Path) -> None:
    out, report, _ = exported
    info = ModelInfo.load(out)
    assert info.classes == tuple(CLASSES) and info.modalities == ("ct", "mr")
    assert info.patch_size == (S, S, S) and info.max_batch == 4
    assert info.checkpoint_sha256 == sha256_file(ckpt)
    native = [p for p in ("bf16", "fp16") if unsupported_reason(p) is None]
    expected = {(m, "onnxruntime", "fp32") for m in MODES} | {
        (m, "onnxruntime", "fp16") for m in MODES} | {(m, "openvino", "fp32") for m in MODES}
    expected |= {(m, "openvino", p) for m in MODES for p in native}
    assert {(g.mode, g.runtime, g.precision) for g in info.graphs} == expected
    for graph in info.graphs:
        assert graph.path.is_file()
        assert graph.path.relative_to(out).parts[0] in ("onnx", "openvino")
    assert (out / "onnx" / "fused_fp16.onnx").is_file()
    assert (out / "openvino" / "a_fp32.xml").is_file() and (out / "openvino" / "a_fp32.bin").is_file()
    assert any("onnx bf16" in s for s in report.skipped)
    for precision in {"bf16", "fp16"} - set(native):
        assert any(f"OpenVINO {precision}" in s for s in report.skipped)
    assert _leftovers(out.parent) == []


@pytest.mark.slow  # shares one full export (about 30 s on 2 idle cores)
def test_every_graph_carries_its_gate_numbers(exported) -> None:
    out, _, lines = exported
    document = json.loads((out / "cmc.json").read_text())
    for graph in document["graphs"]:
        gate = graph["gate"]
        if (graph["runtime"], graph["precision"]) == ("onnxruntime", "fp32"):
            assert gate["kind"] == "fp32_parity" and gate["reference"] == "pytorch"
            assert gate["max_abs_diff_random"] <= 1e-4 and gate["max_abs_diff_synthetic"] <= 1e-4
        else:
            assert gate["kind"] == "segmentation_parity"
            limits = gate["limits"]
            assert gate["decided_agreement"] >= limits["min_decided_agreement"]
            assert gate["prob_error_p999"] <= limits["max_prob_error_p999"]
            assert min(gate["dice"].values()) >= limits["min_dice"]
            assert set(gate["dice"]) <= set(CLASSES)
            assert gate["noise"]["emulated"] == graph["precision"]
        # ... and the export printed them.
        assert any(line.startswith(f"gate {graph['mode']}/{graph['runtime']}/"
                                   f"{graph['precision']}: ") for line in lines)
    assert document["triton"]["patch_models"] == {"fused": "cmc_patch", "a": "cmc_patch_a"}


@pytest.mark.slow  # shares one full export (about 30 s on 2 idle cores)
def test_onnx_files_are_checker_clean_with_cmc_metadata(exported, ckpt: Path) -> None:
    out, _, _ = exported
    for path in sorted((out / "onnx").glob("*.onnx")):
        onnx.checker.check_model(str(path), full_check=True)
        props = read_metadata_props(path)
        mode, precision = path.stem.split("_")
        assert props["mode"] == mode and props["precision"] == precision
        assert json.loads(props["classes"]) == CLASSES
        assert json.loads(props["modalities"]) == ["ct", "mr"]
        assert json.loads(props["patch_size"]) == [S, S, S]
        assert json.loads(props["spacing"]) == [2.0, 2.0, 2.0]
        assert json.loads(props["normalisation"])["ct"]["kind"] == "ct_window"
        assert props["checkpoint_sha256"] == sha256_file(ckpt)


@pytest.mark.slow  # shares one full export (about 30 s on 2 idle cores)
def test_single_modality_graph_has_one_input_and_a_dynamic_batch(exported) -> None:
    out, _, _ = exported
    model = onnx.load(str(out / "onnx" / "a_fp32.onnx"))
    assert [i.name for i in model.graph.input] == ["image_a"]
    assert [o.name for o in model.graph.output] == ["probs"]
    run = onnxruntime_runner(out / "onnx" / "a_fp32.onnx")
    for batch in (1, 3):
        probs = run({"image_a": np.zeros((batch, 1, S, S, S), np.float32)})
        assert probs.shape == (batch, MICRO.num_classes, S, S, S)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow  # shares one full export (about 30 s on 2 idle cores)
def test_triton_repository_of_the_export(exported) -> None:
    out, report, _ = exported
    repo = out / "repository"
    assert sorted(p.name for p in repo.iterdir()) == ["cmc", "cmc_patch", "cmc_patch_a"]
    for model in ("cmc", "cmc_patch", "cmc_patch_a"):
        config = text_format.Parse((repo / model / "config.pbtxt").read_text(),
                                   model_config_pb2.ModelConfig())
        assert config.name == model and (repo / model / "1" / "model.py").is_file()
        if model != "cmc":
            graph = repo / model / config.parameters["graph"].string_value
            assert graph.is_file() and config.max_batch_size == 4
            # The python backend serves OpenVINO's graph; the server picks the fastest of its
            # gated precisions that its own CPU runs natively.
            assert config.parameters["runtime"].string_value == "openvino"
            assert config.parameters["precision"].string_value == "auto"
            gated = {g["precision"] for g in json.loads((out / "cmc.json").read_text())["graphs"]
                     if g["runtime"] == "openvino" and g["mode"] == ("a" if model.endswith("_a")
                                                                     else "fused")}
            assert set(config.parameters["gated_precisions"].string_value.split(",")) == gated
    assert report.triton_models == {"fused": "cmc_patch", "a": "cmc_patch_a"}


def test_existing_output_is_refused_without_force(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export(ckpt, out, **SMALL)
    assert (out / "keep.txt").read_text() == "mine"


def test_force_replaces_atomically_and_failed_gate_writes_nothing(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old export")
    # A gate that cannot pass (zero tolerance): the old export must survive untouched.
    with pytest.raises(GateFailed, match=r"b_fp32\.onnx .*fp32 parity gate failed: "
                                         r"max_abs_diff_random"):
        export(ckpt, out, force=True, thresholds=Thresholds(max_abs_diff=0.0), **SMALL)
    assert sorted(p.name for p in out.iterdir()) == ["stale.txt"]
    assert _leftovers(tmp_path) == []
    # The same export with real gates replaces it completely.
    report = export(ckpt, out, force=True, **SMALL)
    assert not (out / "stale.txt").exists()
    assert [(g["mode"], g["runtime"], g["precision"]) for g in report.graphs] == [
        ("b", "onnxruntime", "fp32")]
    assert ModelInfo.load(out).modes == ("b",)
    assert _leftovers(tmp_path) == []


def test_failed_gate_of_a_named_precision_leaves_no_folder(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    with pytest.raises(GateFailed, match="precision gate failed: decided_agreement"):
        export(ckpt, out, formats=("onnx",), precisions=("fp32", "fp16"), modes=("b",),
               thresholds=Thresholds(min_decided_agreement=1.01), log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_auto_precision_leaves_out_a_refused_half_precision(ckpt: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    out = tmp_path / "model"
    report = export(ckpt, out, formats=("onnx",), modes=("b",), log=lines.append,
                    thresholds=Thresholds(min_decided_agreement=1.01))  # no half precision passes
    assert [(g["runtime"], g["precision"]) for g in report.graphs] == [("onnxruntime", "fp32")]
    assert sorted(p.name for p in (out / "onnx").iterdir()) == ["b_fp32.onnx"]
    (refused,) = json.loads((out / "cmc.json").read_text())["refused"]
    assert (refused["mode"], refused["runtime"], refused["precision"]) == ("b", "onnxruntime", "fp16")
    assert refused["gate"]["decided_agreement"] < refused["gate"]["limits"]["min_decided_agreement"]
    assert "b_fp16.onnx (onnxruntime fp16): precision gate failed" in refused["reason"]
    assert any(line.startswith("refused: b_fp16.onnx") for line in lines)
    assert ModelInfo.load(out).modes == ("b",)


def test_auto_cannot_be_combined_with_named_precisions(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="auto cannot be combined"):
        export(ckpt, tmp_path / "m", precisions=("auto", "fp16"), log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_a_clear_error(ckpt: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match="cannot create the output folder"):
        export(ckpt, blocker / "model", **SMALL)
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ExportError, match="is not writable"):
            export(ckpt, locked / "model", **SMALL)


def test_wrong_checkpoints_are_clear_errors(ckpt: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt: not a readable torch checkpoint"):
        export(garbage, tmp_path / "m1", **SMALL)
    payload = torch.load(ckpt, weights_only=True)
    future = dict(payload, format_version=99)
    torch.save(future, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="future.pt: unsupported CMC checkpoint format_version 99"):
        export(tmp_path / "future.pt", tmp_path / "m2", **SMALL)
    metadata = json.loads(payload["metadata_json"])
    metadata["model"]["embed_dim"] = 64  # another configuration than the weights
    torch.save(dict(payload, metadata_json=json.dumps(metadata)), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt: weights do not match the model config"):
        export(tmp_path / "other.pt", tmp_path / "m3", **SMALL)
    metadata = dict(json.loads(payload["metadata_json"]), classes=["background", "liver"])
    torch.save(dict(payload, metadata_json=json.dumps(metadata)), tmp_path / "classes.pt")
    with pytest.raises(CheckpointError, match="classes.pt: 2 class names for a model with 5"):
        export(tmp_path / "classes.pt", tmp_path / "m4", **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.pt", "future.pt", "garbage.pt", "other.pt"]


def test_bad_choices_and_tensorrt_only_without_gpu(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="invalid precision"):
        export(ckpt, tmp_path / "m", precisions=("int4",))
    with pytest.raises(ExportError, match="Triton backend tensorrt needs format tensorrt"):
        export(ckpt, tmp_path / "m", formats=("onnx",), triton_backend="tensorrt")
    from cmc_export.tensorrt_build import tensorrt_unavailable_reason

    if tensorrt_unavailable_reason():
        with pytest.raises(ExportError, match="cannot export to TensorRT: "):
            export(ckpt, tmp_path / "m", formats=("tensorrt",), triton_backend="tensorrt")
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_errors_in_one_line(ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    result = CliRunner().invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "model"),
                                      "--format", "onnx", "--precision", "fp32"])
    assert result.exit_code == 2
    assert "cmc export: error: " in result.output and "pass --force" in result.output


def test_a_host_without_native_half_precision_exports_fp32_for_openvino(
        ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The branch a plain AVX-512 host takes, run on any host: the CPU capability check is the
    # only input replaced (OpenVINO itself would accept the hint and silently run fp32).
    import cmc_serve.runtimes.openvino_rt as openvino_rt

    monkeypatch.setattr(openvino_rt, "cpu_capabilities",
                        lambda: ("plain AVX-512 host", ("FP32", "INT8")))
    out = tmp_path / "model"
    report = export(ckpt, out, modes=("b",), log=lambda _: None)
    assert {(g["runtime"], g["precision"]) for g in report.graphs} == {
        ("onnxruntime", "fp32"), ("onnxruntime", "fp16"), ("openvino", "fp32")}
    assert {s.split(":")[0] for s in report.skipped} >= {"OpenVINO bf16", "OpenVINO fp16"}
    config = text_format.Parse((out / "repository" / "cmc_patch_b" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert config.parameters["precision"].string_value == "auto"
    assert config.parameters["gated_precisions"].string_value == "fp32"


def test_an_amx_host_gates_both_openvino_half_precisions(
        ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The branch of an AMX host (OpenVINO lists BF16 and FP16), run on any host: only the CPU
    # capability query is replaced, so export judges both half precisions, records them in
    # cmc.json and the Triton repository, and skips neither. What OpenVINO runs for a hint
    # the CPU lacks differs by host (fp32 on plain AVX-512; bf16 for fp16 on an AVX512-BF16
    # host, which the fp16 gate refuses), so fp16 may be written or refused here; native
    # half-precision numbers are test_gates' and the device checks' business. The fused
    # graph's two branch outputs (quality control's agreement signal) are judged too.
    import cmc_serve.runtimes.openvino_rt as openvino_rt

    monkeypatch.setattr(openvino_rt, "cpu_capabilities",
                        lambda: ("AMX host", ("BF16", "FP16", "FP32", "INT8")))
    out = tmp_path / "model"
    report = export(ckpt, out, modes=("b", "fused"), log=lambda _: None)
    assert not any(s.startswith("OpenVINO") for s in report.skipped)
    model = json.loads((out / "cmc.json").read_text())
    fused = {g["precision"]: g["gate"] for g in model["graphs"]
             if g["runtime"] == "openvino" and g["mode"] == "fused" and g["precision"] != "fp32"}
    assert "bf16" in fused
    for gate in fused.values():
        assert set(gate["branch_outputs"]) == {"probs_a", "probs_b"}
    fused_refused = [r for r in model.get("refused", []) if r["runtime"] == "openvino"
                     and r["mode"] == "fused" and r["precision"] != "int8"]
    assert set(fused) | {r["precision"] for r in fused_refused} == {"bf16", "fp16"}
    b_graphs = [g for g in model["graphs"] if g["mode"] == "b"]
    written = {g["precision"] for g in b_graphs if g["runtime"] == "openvino"}
    refused = {r["precision"]: r for r in model.get("refused", [])
               if r["runtime"] == "openvino" and r["mode"] == "b"}
    # The micro checkpoint records no datalist: int8 is refused for want of calibration data.
    assert "pass --calibration DATALIST" in refused.pop("int8")["reason"]
    assert {"fp32", "bf16"} <= written and written | set(refused) == {"fp32", "bf16", "fp16"}
    for graph in b_graphs:
        if graph["runtime"] == "openvino" and graph["precision"] != "fp32":
            assert graph["gate"]["kind"] == "segmentation_parity"
            assert graph["gate"]["noise"]["emulated"] == graph["precision"]
    for entry in refused.values():
        assert "precision gate failed" in entry["reason"] and entry["gate"]["limits"]
    config = text_format.Parse((out / "repository" / "cmc_patch_b" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert set(config.parameters["gated_precisions"].string_value.split(",")) == written
