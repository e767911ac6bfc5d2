"""int8 at export (NNCF on tiles pre-processed by cmc_serve, its own gate) and `--precision
auto` choosing it by measured speed, on a micro checkpoint and a small synthetic datalist."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from export_fixtures import CLASSES, MICRO, PREPROCESS, micro_net, write_micro_checkpoint
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import cmc_serve.runtimes.openvino_rt as openvino_rt
from cmc_export.calibration import split_cases, tile_origins, tile_sets
from cmc_export.errors import ExportError, GateFailed
from cmc_export.exporter import export
from cmc_export.gates import run_batched
from cmc_export.int8_gate import INT8_THRESHOLDS, int8_parity
from cmc_export.onnx_export import onnxruntime_runner
from cmc_export.openvino_export import openvino_runner
from cmc_export.quantise import quantise_ir
from cmc_serve.engine import Segmenter
from cmc_serve.model_dir import ModelInfo
from cmc_serve.runtimes import RuntimeUnavailable, open_runtime
from cmc_serve.runtimes.precision import INT8_MARGIN, choose_precision
from cmc_train.checkpoint import build_metadata, save_checkpoint
from cmc_train.data.datalist import Datalist
from cmc_train.synth import write_synthetic_study

S = MICRO.img_size
QUIET = {"log": lambda _: None}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_study(tmp_path_factory.mktemp("study"), cases=6, seed=1, size=32,
                                 labelled_ratio=0.5, val_cases=2, test_cases=0)


@pytest.fixture(scope="module")
def confident_ckpt(study: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro checkpoint as confident as a trained one (heads x5), recording `study` as its
    training datalist the way `cmc train` does."""
    path = tmp_path_factory.mktemp("ckpt") / "micro.pt"
    metadata = build_metadata(MICRO, PREPROCESS, CLASSES,
                              {"steps": 0, "seed": 0, "datalist": str(study)})
    save_checkpoint(path, micro_net(0, logit_scale=5.0).state_dict(), metadata)
    return path


@pytest.fixture(scope="module")
def exported(confident_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    """A plain export (no int8 flag, no --calibration) of mode b."""
    lines: list[str] = []
    out = tmp_path_factory.mktemp("export") / "model"
    export(confident_ckpt, out, modes=("b",), max_batch=4, log=lines.append)
    return out, lines


@pytest.mark.slow  # one export with NNCF quantisation, ~40 s on 2 busy cores
def test_plain_export_writes_a_gated_int8_graph_from_the_checkpoints_datalist(
        exported, study: Path) -> None:
    out, lines = exported
    document = json.loads((out / "cmc.json").read_text())
    (int8,) = [g for g in document["graphs"] if g["precision"] == "int8"]
    assert (int8["runtime"], int8["file"]) == ("openvino", "openvino/b_int8.xml")
    gate = int8["gate"]
    assert gate["kind"] == "int8_parity" and gate["reference"] == "onnxruntime fp32"
    assert gate["decided_agreement"] >= gate["limits"]["min_decided_agreement"]
    assert gate["dice"] and min(gate["dice"].values()) >= gate["limits"]["min_dice"]
    calibration = gate["calibration"]
    assert calibration["datalist"] == str(study)
    assert not set(calibration["calibration_cases"]) & set(calibration["gate_cases"])
    assert any(line.startswith("gate b/openvino/int8: ") for line in lines)
    assert ModelInfo.load(out).graph("b", "openvino", "int8").files  # checksummed
    # The Triton patch model gets the int8 IR beside the fp32 one, to choose at load.
    config = text_format.Parse((out / "repository" / "cmc_patch_b" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    assert "int8" in config.parameters["gated_precisions"].string_value.split(",")
    assert config.parameters["int8_graph"].string_value == "1/b_int8.xml"
    assert (out / "repository" / "cmc_patch_b" / "1" / "b_int8.bin").is_file()


@pytest.mark.slow  # two NNCF quantisations, ~40 s on 2 busy cores
def test_int8_gate_refuses_a_quantisation_calibrated_on_garbage_scaled_tiles(
        exported, study: Path, tmp_path: Path) -> None:
    out, _ = exported
    tiles = tile_sets(study, PREPROCESS.modalities, PREPROCESS.to_dict(), S,
                      calibration_tiles=16, gate_tiles=16)
    held_out = {"image_b": tiles.gate["image_b"]}
    reference = run_batched(onnxruntime_runner(out / "onnx" / "b_fp32.onnx"), held_out, 4)
    # The export's correctly calibrated int8 graph passes ...
    exported_int8 = openvino_runner(out / "openvino" / "b_int8.xml", "int8", ("image_b",), 4)
    int8_parity("good", reference, run_batched(exported_int8, held_out, 4), ("probs",),
                CLASSES, INT8_THRESHOLDS)
    # ... the same graph calibrated on garbage-scaled tiles does not.
    for scale in (0.02, 50.0):  # ranges that clip real activations / waste the int8 grid
        xml = tmp_path / f"b_int8_x{scale:g}.xml"
        quantise_ir(out / "openvino" / "b_fp32.xml", xml,
                    {k: v * scale for k, v in tiles.calibration.items()}, ("image_b",), {})
        candidate = run_batched(openvino_runner(xml, "int8", ("image_b",), 4), held_out, 4)
        with pytest.raises(GateFailed, match="int8 gate failed: decided_agreement") as failed:
            int8_parity("broken", reference, candidate, ("probs",), CLASSES, INT8_THRESHOLDS)
        assert failed.value.numbers["decided_agreement"] < 0.99


def test_without_calibration_data_int8_is_refused_with_the_reason(tmp_path: Path) -> None:
    ckpt = write_micro_checkpoint(tmp_path / "micro.pt")  # records no datalist
    report = export(ckpt, tmp_path / "model", formats=("openvino",), modes=("b",), **QUIET)
    assert all(g["precision"] != "int8" for g in report.graphs)
    (refused,) = [r for r in report.refused if r["precision"] == "int8"]
    assert refused["runtime"] == "openvino" and refused["gate"]["kind"] == "int8_parity"
    assert "records no training datalist; pass --calibration DATALIST" in refused["reason"]
    # Named, int8 is required; a --calibration that does not exist is an error up front.
    with pytest.raises(ExportError, match="records no training datalist"):
        export(ckpt, tmp_path / "m2", formats=("openvino",), precisions=("int8",),
               modes=("b",), **QUIET)
    with pytest.raises(ExportError, match="missing.json: calibration datalist does not exist"):
        export(ckpt, tmp_path / "m3", formats=("openvino",), modes=("b",),
               calibration=tmp_path / "missing.json", **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["micro.pt", "model"]


def test_calibration_tiles_are_deterministic_and_gate_cases_held_out(study: Path) -> None:
    first = tile_sets(study, PREPROCESS.modalities, PREPROCESS.to_dict(), S, 8, 8)
    again = tile_sets(study, PREPROCESS.modalities, PREPROCESS.to_dict(), S, 8, 8)
    for name in ("image_a", "image_b"):
        assert first.calibration[name].shape == (8, 1, S, S, S)
        np.testing.assert_array_equal(first.calibration[name], again.calibration[name])
        np.testing.assert_array_equal(first.gate[name], again.gate[name])
    datalist = Datalist.load(study)
    assert set(first.gate_cases) == {e.id for e in datalist.validation}
    assert not set(first.gate_cases) & set(first.calibration_cases)
    # Without validation or test pairs, every fourth training case is held out instead.
    bare = Datalist(datalist.modalities, datalist.classes, datalist.labelled,
                    datalist.unlabelled)
    training, held_out = split_cases(bare)
    assert len(held_out) == len(bare.labelled + bare.unlabelled) // 4
    assert not {e.id for e in held_out} & {e.id for e in training}
    # Tiles cover each axis without overlap; a short axis gets one centred (padded) tile.
    assert tile_origins((40, 16, 10), 16) == [(x, 0, -3) for x in (0, 16, 24)]


class Timings:
    """Seconds per tile a host would measure (the measurement's input, recorded)."""

    def __init__(self, **seconds: float) -> None:
        self.seconds, self.asked = seconds, []

    def __call__(self, precisions: Sequence[str]) -> dict[str, float]:
        self.asked.append(tuple(precisions))
        return {p: self.seconds[p] for p in precisions}


@pytest.mark.parametrize(("capabilities", "refused", "rule"), [
    (("FP32", "INT8"), (), "fp32"),  # Xeon with AVX-512 VNNI only
    (("BF16", "FP32", "INT8"), (), "bf16"),  # AMD EPYC with AVX512-BF16
    (("BF16", "FP16", "FP32", "INT8"), (), "bf16"),  # AMX Xeon
    (("BF16", "FP16", "FP32", "INT8"), ("bf16",), "fp16"),  # AMX Xeon, bf16 refused at export
], ids=["vnni_only_host", "avx512_bf16_host", "amx_host", "amx_host_without_bf16_graph"])
def test_auto_takes_int8_only_where_measured_faster_on_every_kind_of_host(
        monkeypatch: pytest.MonkeyPatch, capabilities: tuple[str, ...],
        refused: tuple[str, ...], rule: str) -> None:
    # OpenVINO's answer for the CPU and the measured timings are the inputs replaced; the
    # rule, the comparison and the margin run as shipped.
    monkeypatch.setattr(openvino_rt, "cpu_capabilities", lambda: ("test host", capabilities))
    gated = {"fp32", "bf16", "fp16", "int8"} - set(refused)
    fast = Timings(**{rule: 0.010, "int8": 0.006})
    choice = choose_precision("openvino", "cpu", gated, fast)
    assert choice.precision == "int8" and fast.asked == [(rule, "int8")]
    assert choice.reason.startswith(f"auto: int8, the gated int8 graph is 1.67x {rule}")
    assert "6.0 ms per tile in int8, 10.0 in " + rule in choice.reason
    close = Timings(**{rule: 0.010, "int8": 0.010 / INT8_MARGIN * 1.01})  # inside the margin
    choice = choose_precision("openvino", "cpu", gated, close)
    assert choice.precision == rule and "int8 not 1.05x faster here" in choice.reason
    # No gated int8 graph, another runtime, or no measurement: nothing is timed.
    untouched = Timings()
    assert choose_precision("openvino", "cpu", gated - {"int8"}, untouched).precision == rule
    assert choose_precision("onnxruntime", "cpu", {"fp32", "int8"}, untouched).precision == "fp32"
    assert choose_precision("openvino", "cpu", gated).precision == rule
    assert untouched.asked == []


@pytest.mark.slow  # shares the int8 export
def test_segment_runs_int8_where_auto_measures_it_faster(exported) -> None:
    out, _ = exported
    info = ModelInfo.load(out)
    runtime = open_runtime(info, "b")  # auto: this host's timings decide
    runtime.close()
    rng = np.random.default_rng(3)
    image = rng.normal(0.5, 0.3, (24, 20, 18)).astype(np.float32)
    with Segmenter(info) as seg:
        auto = seg.segment(image_b=image)
    assert auto.precision == runtime.precision
    assert "measured" in auto.precision_reason and "ms per tile in int8" in auto.precision_reason
    assert auto.precision_reason.startswith("auto: int8" if auto.precision == "int8"
                                            else f"auto: {auto.precision}")
    with Segmenter(info, precision="int8") as seg, Segmenter(info, precision="fp32") as ref:
        int8, fp32 = seg.segment(image_b=image), ref.segment(image_b=image)
    assert int8.precision == "int8" and (int8.labels == fp32.labels).mean() > 0.9


def test_int8_named_without_an_int8_graph_is_refused(tmp_path: Path) -> None:
    ckpt = write_micro_checkpoint(tmp_path / "micro.pt")
    out = tmp_path / "model"
    export(ckpt, out, formats=("onnx",), precisions=("fp32",), modes=("b",), **QUIET)
    with pytest.raises(RuntimeUnavailable, match="no graph for mode=b runtime=openvino "
                                                 "precision=int8"):
        open_runtime(ModelInfo.load(out), "b", "openvino", precision="int8")


@pytest.mark.slow
@pytest.mark.triton
def test_triton_patch_model_chooses_int8_as_segment_does(exported, triton_install) -> None:
    # The exported repository as `cmc serve` starts it: the patch model times its int8 IR
    # against the rule's precision at load and says which it runs in the server log.
    from cmc_serve.triton.client import TritonPatchRuntime
    from cmc_serve.triton.server import TritonServer

    out, _ = exported
    info = ModelInfo.load(out)
    log: list[str] = []
    with TritonServer(out / "repository", install=triton_install, log=log.append,
                      ready_timeout_s=90) as server:
        served = TritonPatchRuntime(f"http://{server.http_url}", info, "b")
        tiles = {"image_b": np.random.default_rng(5).normal(0.5, 0.3, (2, 1, S, S, S))
                 .astype(np.float32)}
        got = served.run(tiles)
        served.close()
    (line,) = [entry for entry in log if "cmc_patch_b: precision auto: " in entry]
    chosen = line.split("precision auto: ")[1].split(",")[0].split(" ")[0]
    assert chosen in ("int8", "fp32", "bf16") and "ms per tile in int8" in line
    local = open_runtime(info, "b", "openvino", precision=chosen, max_batch=2)
    np.testing.assert_allclose(got, local.run(tiles), atol=1e-5)
    local.close()


def test_cli_calibration_that_does_not_exist_is_one_error_line(tmp_path: Path) -> None:
    from cmc_cli.main import app
    from typer.testing import CliRunner

    ckpt = write_micro_checkpoint(tmp_path / "micro.pt")
    result = CliRunner().invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "model"),
                                      "--calibration", str(tmp_path / "nope.json")])
    assert result.exit_code == 2
    assert result.output.strip().endswith("nope.json: calibration datalist does not exist")
    assert not (tmp_path / "model").exists()


SIGTERM_AFTER_RELEASE = """
import os, signal, sys, time
from pathlib import Path
from cmc_common.interrupts import sigterm_as_interrupt
from cmc_serve.model_dir import ModelInfo
from cmc_serve.runtimes import open_runtime
info = ModelInfo.load(Path(sys.argv[1]))
first = open_runtime(info, "b", "openvino", precision="int8")
second = open_runtime(info, "b", "openvino", precision="int8")
first.close()
second.close()
try:
    with sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
except KeyboardInterrupt:
    print("interrupted")
"""


def test_sigterm_after_graphs_released_in_opening_order_still_interrupts(exported) -> None:
    # OpenVINO's CPU plugin swaps the compiling thread's signal stack for int8 / bf16 graphs
    # and puts the previous one back when a graph is released: released in opening order
    # (as `--precision auto` timed them), the thread was left on freed memory and SIGTERM
    # killed the process with SIGSEGV instead of interrupting it (runtimes.signal_stack).
    out, _ = exported
    run = subprocess.run([sys.executable, "-c", SIGTERM_AFTER_RELEASE, str(out)],
                         capture_output=True, text=True, timeout=180)
    assert (run.returncode, run.stdout.strip()) == (0, "interrupted"), run.stderr[-2000:]
