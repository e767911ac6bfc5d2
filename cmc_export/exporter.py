"""`cmc export`: checkpoint -> gated ONNX / OpenVINO / TensorRT graphs + Triton repository + cmc.json.

All or nothing: the export is built in a hidden folder beside MODEL_DIR and renamed into
place at the end (`cmc_export.staging`).

Per mode, the fp32 ONNX graph is gated against PyTorch (max abs diff); every other graph
(ONNX fp16, OpenVINO fp32/bf16/fp16, TensorRT) is gated against that fp32 ONNX graph on a
pre-processed synthetic volume (`cmc_export.gates.segmentation_parity`). Combinations this
host cannot produce or that make no sense (bf16 in ONNX Runtime, a precision the CPU lacks,
TensorRT without a GPU) are skipped with a one-line message.

Precisions: `auto` (the default) exports fp32, whose failure stays fatal, every half
precision this host can produce and int8 OpenVINO graphs where calibration data exist
(`cmc_export.quantise`, its own gate); a half-precision graph that fails its gate is then left
out with one line and recorded in cmc.json's `refused` list with its numbers, so one noisy
precision never costs the user the whole export. Precisions named explicitly are all
required: any failure fails the export and nothing is written.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmc_common.contract import (
    AUTO,
    EXPORT_FORMATS,
    GRAPH_OUTPUT,
    MODE_INPUTS,
    MODE_OUTPUTS,
    MODEL_JSON,
    MODES,
    PRECISIONS,
    ExportFormat,
    Precision,
    Runtime,
)
from cmc_common.files import file_digest
from cmc_common.progress import Say
from cmc_export.errors import ExportError, GateFailed
from cmc_export.export_request import (
    check_backend,
    check_choices,
    check_name,
    check_precisions,
    class_codes,
)
from cmc_export.gates import (
    THRESHOLDS,
    RoundingNoise,
    Runner,
    Thresholds,
    describe_gate,
    fp32_parity,
    outputs_parity,
    run_batched,
)
from cmc_export.quantise import Int8Stage
from cmc_export.staging import check_output, staged
from cmc_export.triton_repository import PatchGraph, write_repository
from cmc_serve.model_json import ModelJson, graph_entry, refused_entry, write_model_json

# Without an OpenVINO graph, the ONNX graph a python-backend Triton patch model serves.
PYTHON_BACKEND_PREFERENCE = ((Runtime.ONNXRUNTIME, Precision.FP32),
                             (Runtime.ONNXRUNTIME, Precision.FP16))
NATIVE_BACKEND_PREFERENCE = {"onnxruntime": PYTHON_BACKEND_PREFERENCE,
                             "openvino": ((Runtime.OPENVINO, Precision.FP32),),
                             "tensorrt": ((Runtime.TENSORRT, Precision.FP16),
                                          (Runtime.TENSORRT, Precision.FP32))}


@dataclass
class ExportReport:
    """What an export wrote: cmc.json's graph entries, skipped combinations, Triton models."""

    out_dir: Path
    graphs: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    triton_models: dict[str, str] = field(default_factory=dict)
    refused: list[dict[str, Any]] = field(default_factory=list)


def sha256_file(path: Path) -> str:
    return str(file_digest(path)["sha256"])


class _Exporter:
    """One export run inside the temporary folder `root` (see `export`)."""

    def __init__(self, root: Path, net: Any, metadata: dict[str, Any], sha256: str,
                 max_batch: int, thresholds: Thresholds, log: Say,
                 half_required: bool) -> None:
        from cmc_train.config import PreprocessConfig

        self.root, self.net, self.metadata, self.sha256 = root, net, metadata, sha256
        self.max_batch, self.thresholds, self.log = max_batch, thresholds, log
        self.half_required = half_required
        self.refused: list[dict[str, Any]] = []
        self.fp32_graphs: dict[str, Any] = {}  # mode -> fp32 ONNX ModelProto
        # (mode, precision) -> output -> the emulated rounding noise of that output
        self.noise: dict[tuple[str, str], dict[str, RoundingNoise]] = {}
        self.patch = int(net.cfg.img_size)
        self.classes = list(metadata["classes"])
        self.work = root / ".work"
        self.report_graphs: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.preprocess = PreprocessConfig.from_dict(metadata["preprocessing"])
        self._tiles: dict[str, np.ndarray] | None = None
        self.int8: Int8Stage | None = None  # set by `export` when int8 is wanted

    def skip(self, message: str) -> None:
        if message not in self.skipped:
            self.skipped.append(message)
            self.log(f"skipped: {message}")

    def tiles(self) -> dict[str, np.ndarray]:
        """The pre-processed synthetic gate volume, as patches (built once per export)."""
        if self._tiles is None:
            from cmc_export.gate_inputs import synthetic_tiles

            self._tiles = synthetic_tiles(self.preprocess, self.patch)
        return self._tiles

    def props(self, mode: str, precision: str) -> dict[str, str]:
        from cmc_export.onnx_export import cmc_metadata_props

        return cmc_metadata_props(self.metadata, mode, precision, self.sha256)

    def add(self, mode: str, runtime: str, precision: str, path: Path, gate: dict[str, Any]) -> None:
        self.log(f"gate {mode}/{runtime}/{precision}: {describe_gate(gate)}")
        self.report_graphs.append(graph_entry(mode, runtime, precision,
                                              path.relative_to(self.root).as_posix(), gate))

    def gate_candidate(self, mode: str, runtime: str, precision: str, path: Path, label: str,
                       runner: Runner, reference: np.ndarray) -> bool:
        """Gate a candidate graph and add it; False if it was refused (and recorded) instead.

        A failure raises GateFailed when the precision is required (named by the user, or
        fp32); otherwise the graph is left out and listed in cmc.json's `refused`.
        """
        from cmc_export.gate_inputs import mode_inputs

        probs = run_batched(runner, mode_inputs(self.tiles(), mode), self.max_batch)
        noise = self.rounding_noise(mode, precision, reference)
        try:
            gate = outputs_parity(label, reference, probs, MODE_OUTPUTS[mode], self.classes,
                                  noise, self.thresholds)
        except GateFailed as exc:
            if self.half_required or precision == Precision.FP32:
                raise
            self.log(f"refused: {exc} (left out; `--precision auto` keeps the other graphs)")
            self.refused.append(refused_entry(mode, runtime, precision, str(exc),
                                              {"kind": "segmentation_parity", **exc.numbers}))
            return False
        self.add(mode, runtime, precision, path,
                 {"kind": "segmentation_parity", "reference": "onnxruntime fp32", **gate})
        return True

    def export_mode(self, mode: str, formats: Sequence[str], precisions: Sequence[str]) -> None:
        from cmc_export.fp16 import convert_fp16
        from cmc_export.gate_inputs import mode_inputs, random_patches
        from cmc_export.onnx_export import (
            check_and_save,
            export_onnx,
            onnxruntime_runner,
            set_metadata_props,
        )
        from cmc_export.patch_graph import patch_graph, torch_runner

        graph = patch_graph(self.net, mode)
        keep_fp32 = ExportFormat.ONNX in formats and Precision.FP32 in precisions
        onnx_dir = self.root / "onnx" if keep_fp32 else self.work
        fp32_path = onnx_dir / f"{mode}_fp32.onnx"
        model = export_onnx(graph, mode, self.patch, fp32_path, self.props(mode, Precision.FP32))
        sets = {"random": random_patches(mode, self.patch),
                "synthetic": mode_inputs(self.tiles(), mode)}
        outputs = MODE_OUTPUTS[mode]
        torch_run = torch_runner(graph, outputs)
        ort_run = onnxruntime_runner(fp32_path, outputs=outputs)
        candidate = {k: run_batched(ort_run, v, self.max_batch) for k, v in sets.items()}
        gate = fp32_parity(f"{fp32_path.name} (onnxruntime fp32 vs PyTorch)",
                           {k: run_batched(torch_run, v, self.max_batch) for k, v in sets.items()},
                           candidate, self.thresholds, outputs)
        gate = {"kind": "fp32_parity", "reference": "pytorch", **gate}
        if keep_fp32:
            self.add(mode, Runtime.ONNXRUNTIME, Precision.FP32, fp32_path, gate)
        else:
            self.log(f"gate {mode}/onnxruntime/fp32 (reference only): {describe_gate(gate)}")
        reference = candidate["synthetic"]
        self.fp32_graphs[mode] = model

        if ExportFormat.ONNX in formats and Precision.FP16 in precisions:
            path = self.root / "onnx" / f"{mode}_fp16.onnx"
            fp16 = convert_fp16(model)
            set_metadata_props(fp16, self.props(mode, Precision.FP16))
            check_and_save(fp16, path)
            if not self.gate_candidate(mode, Runtime.ONNXRUNTIME, Precision.FP16, path,
                                       f"{path.name} (onnxruntime fp16)",
                                       onnxruntime_runner(path, outputs=outputs), reference):
                path.unlink()
        if ExportFormat.ONNX in formats and Precision.BF16 in precisions:
            self.skip("onnx bf16: ONNX Runtime has no bf16 CPU kernels; bf16 is served by OpenVINO")
        if ExportFormat.OPENVINO in formats:
            self.export_openvino(mode, fp32_path, precisions, reference)
        if ExportFormat.TENSORRT in formats:
            self.export_tensorrt(mode, fp32_path, precisions, reference)

    def rounding_noise(self, mode: str, precision: str, reference: np.ndarray
                       ) -> dict[str, RoundingNoise]:
        """The rounding noise of `precision` on each output of the mode's fp32 graph,
        emulated in ONNX Runtime (measured once per mode and precision; none for fp32)."""
        from cmc_export.emulated_precision import emulate
        from cmc_export.gate_inputs import mode_inputs
        from cmc_export.onnx_export import onnxruntime_runner

        outputs = MODE_OUTPUTS[mode]
        if precision == Precision.FP32:
            return {name: RoundingNoise(precision, 0.0, 0.0) for name in outputs}
        if (mode, precision) not in self.noise:
            emulated = run_batched(onnxruntime_runner(emulate(self.fp32_graphs[mode], precision),
                                                      outputs=outputs),
                                   mode_inputs(self.tiles(), mode), self.max_batch)
            noise = RoundingNoise.measure_outputs(precision, reference, emulated, outputs)
            probs = noise[GRAPH_OUTPUT]
            self.log(f"rounding noise {mode}/{precision} (emulated): probability error p99.9 "
                     f"{probs.prob_error_p999:.4f}, max {probs.prob_error_max:.4f}")
            self.noise[mode, precision] = noise
        return self.noise[mode, precision]

    def export_openvino(self, mode: str, onnx_path: Path, precisions: Sequence[str],
                        reference: np.ndarray) -> None:
        from cmc_export.openvino_export import export_openvino, openvino_runner, unsupported_reason

        wanted = []
        for precision in precisions:
            reason = unsupported_reason(precision)
            if reason:
                self.skip(reason)
            else:
                wanted.append(precision)
        hinted = [p for p in wanted if p != Precision.INT8]  # precisions the fp32 IR runs at
        if not wanted:
            return
        # The fp32 IR is also int8's source; asked for int8 alone, it is not kept.
        xml = (self.root / "openvino" if hinted else self.work) / f"{mode}_fp32.xml"
        export_openvino(onnx_path, xml, self.props(mode, Precision.FP32))
        if Precision.INT8 in wanted and self.int8 is not None:
            self.int8.export(self, mode, xml, onnx_path)
        for precision in hinted:
            self.gate_candidate(mode, Runtime.OPENVINO, precision, xml,
                                f"{xml.name} (openvino {precision})",
                                openvino_runner(xml, precision, MODE_INPUTS[mode],
                                                self.max_batch, outputs=MODE_OUTPUTS[mode]),
                                reference)

    def export_tensorrt(self, mode: str, onnx_path: Path, precisions: Sequence[str],
                        reference: np.ndarray) -> None:
        from cmc_export.tensorrt_build import TRT_PRECISIONS, build_engine, tensorrt_runner

        for precision in precisions:
            if precision not in TRT_PRECISIONS:
                self.skip(f"tensorrt {precision}: engines are built in {list(TRT_PRECISIONS)}")
                continue
            plan = self.root / "tensorrt" / f"{mode}_{precision}.plan"
            build_engine(onnx_path, plan, MODE_INPUTS[mode], self.patch, self.max_batch,
                         precision, timing_cache=self.root / "tensorrt" / "timing.cache")
            if not self.gate_candidate(mode, Runtime.TENSORRT, precision, plan,
                                       f"{plan.name} (tensorrt {precision})",
                                       tensorrt_runner(plan, MODE_OUTPUTS[mode]), reference):
                plan.unlink()

    def write_triton(self, name: str, backend: str, modes: Sequence[str]) -> dict[str, str]:
        chosen = [self.triton_graph(backend, mode) for mode in modes]
        return write_repository(self.root / "repository", name, backend, chosen, self.patch,
                                len(self.classes), self.max_batch,
                                postprocessing=self.metadata.get("postprocessing"))

    def triton_graph(self, backend: str, mode: str) -> PatchGraph:
        """The graph the Triton patch model of `mode` serves.

        The python backend serves OpenVINO's IR at precision "auto" (the server picks the
        fastest of its gated precisions that its CPU runs natively), else ONNX Runtime.
        """
        entries = {(g["runtime"], g["precision"]): g for g in self.report_graphs
                   if g["mode"] == mode}
        openvino = tuple(p for p in PRECISIONS if (Runtime.OPENVINO, p) in entries)
        if backend == "python" and openvino:
            file = self.root / entries[Runtime.OPENVINO, openvino[0]]["file"]
            int8 = entries.get((Runtime.OPENVINO, Precision.INT8))
            return PatchGraph(mode, Runtime.OPENVINO, AUTO, file, openvino,
                              self.root / int8["file"] if int8 else None)
        preference = (PYTHON_BACKEND_PREFERENCE if backend == "python"
                      else NATIVE_BACKEND_PREFERENCE[backend])
        key = next((k for k in preference if k in entries), None)
        if key is None:
            raise ExportError(f"Triton backend {backend}: no exported graph for mode {mode} "
                              f"can be served (exported: {sorted(entries)})")
        return PatchGraph(mode, key[0], key[1], self.root / entries[key]["file"])

    def write_model_json(self, name: str, backend: str, triton_models: Mapping[str, str]) -> None:
        write_model_json(self.root, ModelJson(
            name=name, cmc_version=_cmc_version(),
            modalities=self.metadata["modalities"], classes=self.classes,
            patch_size=[self.patch] * 3, max_batch=self.max_batch,
            preprocessing=self.metadata["preprocessing"], checkpoint_sha256=self.sha256,
            graphs=self.report_graphs, refused=self.refused,
            gate_thresholds=asdict(self.thresholds), triton_backend=backend,
            triton_patch_models=triton_models,
            postprocessing=self.metadata.get("postprocessing"),
            qc_reference=self.metadata.get("qc_reference"),
            codes=self.metadata.get("codes")))


def _cmc_version() -> str:
    from cmc_train import __version__

    return __version__


def export(ckpt_path: Path | str, out_dir: Path | str, name: str = "cmc",
           formats: Sequence[str] = (ExportFormat.ONNX, ExportFormat.OPENVINO),
           precisions: Sequence[str] = (AUTO,),
           modes: Sequence[str] = MODES, max_batch: int = 8, triton_backend: str = "python",
           force: bool = False, thresholds: Thresholds = THRESHOLDS,
           log: Say = print,
           calibration: Path | str | None = None,
           codes: Path | str | None = None) -> ExportReport:
    """Export a checkpoint to MODEL_DIR (docs/DESIGN.md layout); all or nothing.

    `precisions` ("auto", or a list of fp32/fp16/bf16/int8): see the module docstring.
    `calibration`: the datalist int8 is calibrated on (default: the checkpoint's own,
    `cmc_export.calibration`). `codes`: a CSV of SNOMED CT codes per class overriding
    the shipped table (`cmc_serve.dicom.codes`); the codes of every class are recorded in
    cmc.json for the DICOM outputs.
    """
    from cmc_train.checkpoint import load_model

    ckpt_path, out_dir = Path(ckpt_path), Path(out_dir).absolute()
    formats = check_choices("format", formats, EXPORT_FORMATS)
    precisions, half_required = check_precisions(precisions)
    modes = check_choices("mode", modes, MODES)
    check_name(name, max_batch)
    skipped = []
    if ExportFormat.TENSORRT in formats:
        from cmc_export.tensorrt_build import tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason()
        if reason and formats == (ExportFormat.TENSORRT,):
            raise ExportError(f"cannot export to TensorRT: {reason}")
        if reason:
            skipped.append(f"tensorrt: {reason}")
            formats = tuple(f for f in formats if f != ExportFormat.TENSORRT)
    check_backend(triton_backend, formats)
    check_output(out_dir, force)
    net, metadata = load_model(ckpt_path)
    metadata = {**metadata, "codes": class_codes(codes, metadata["classes"])}
    int8 = (Int8Stage(ckpt_path, metadata, int(net.cfg.img_size),
                      Path(calibration) if calibration else None, required=half_required)
            if Precision.INT8 in precisions and ExportFormat.OPENVINO in formats else None)
    with staged(out_dir) as tmp:
        job = _Exporter(tmp, net, metadata, sha256_file(ckpt_path), max_batch, thresholds, log,
                        half_required)
        for message in skipped:
            job.skip(message)
        job.int8 = int8
        for mode in modes:
            job.export_mode(mode, formats, precisions)
        if not job.report_graphs:
            raise ExportError(f"{ckpt_path}: nothing to export for formats {list(formats)} and "
                              f"precisions {list(precisions)} on this host")
        triton_models = job.write_triton(name, triton_backend, modes)
        job.write_model_json(name, triton_backend, triton_models)
        shutil.rmtree(job.work, ignore_errors=True)
    log(f"exported {len(job.report_graphs)} graphs to {out_dir}"
        + (f"; refused {len(job.refused)} (listed in {MODEL_JSON})" if job.refused else ""))
    return ExportReport(out_dir, job.report_graphs, job.skipped, triton_models, job.refused)
