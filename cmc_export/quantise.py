"""int8 OpenVINO graphs: NNCF post-training quantisation of the fp32 IR, then its own gate.

Where bf16 is not native (Xeons with AVX-512 VNNI only, the hospital server of a few years
ago) fp32 was the fastest graph cmc could offer; int8 convolutions and matmuls are what VNNI
(and AMX-INT8) accelerate. NNCF inserts quantise/dequantise pairs whose ranges it learns from
calibration tiles (`cmc_export.calibration`: the datalist's training images pre-processed by
the serving code); the result is an ordinary IR (`openvino/<mode>_int8.xml`) that OpenVINO
runs with int8 kernels on every x86 CPU, faster where VNNI or AMX exist.

Quantisation is a real accuracy risk (a range learnt from unrepresentative tiles clips the
activations of real ones), so the int8 graph passes `cmc_export.int8_gate` on tiles the
calibration never saw, against the fp32 ONNX graph. Under `--precision auto` every way int8
can fail (no calibration data, NNCF missing or failing, the gate) leaves it out with a line
and a `refused` entry in cmc.json; `--precision int8` named explicitly makes it required.

Settings (docs/GATES.md has the measurements): NNCF's transformer model type (its
SmoothQuant and the attention-aware placement cost a few % of int8's speed and kept the
smallest class's Dice higher on the demo model), the mixed preset (asymmetric activations:
after the softmax and GELU they are not centred), and bias correction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cmc_common.contract import MODE_INPUTS, MODE_OUTPUTS, Precision, Runtime
from cmc_common.errors import CmcError, one_line
from cmc_common.progress import Say
from cmc_export.calibration import TileSets, find_datalist, tile_sets
from cmc_export.errors import ExportError, GateFailed
from cmc_export.int8_gate import INT8_THRESHOLDS, Int8Thresholds, int8_parity
from cmc_serve.model_json import refused_entry

# NNCF's settings (module docstring): ModelType and QuantizationPreset values.
MODEL_TYPE = "transformer"
PRESET = "mixed"


def quantise_ir(fp32_xml: Path, int8_xml: Path, tiles: Mapping[str, np.ndarray],
                inputs: Sequence[str], props: Mapping[str, str],
                model_type: str | None = MODEL_TYPE, preset: str = PRESET) -> None:
    """NNCF post-training quantisation of `fp32_xml` on `tiles`, saved at `int8_xml` (+ .bin)
    with cmc's metadata in rt_info. ExportError when NNCF is missing or fails. `model_type`
    and `preset` name NNCF's ModelType and QuantizationPreset (bench/int8.py compares them)."""
    try:
        import nncf  # type: ignore[import-untyped,unused-ignore]
    except ImportError as exc:
        raise ExportError(f"int8 needs NNCF (pip install 'cmc[export]'): {exc}") from exc
    import openvino as ov  # type: ignore[import-untyped,unused-ignore]

    model = ov.Core().read_model(str(fp32_xml))
    count = next(iter(tiles.values())).shape[0]
    items = [{name: tiles[name][i:i + 1] for name in inputs} for i in range(count)]
    try:
        quantised = nncf.quantize(
            model, nncf.Dataset(items), subset_size=count,
            preset=nncf.QuantizationPreset(preset),
            model_type=nncf.ModelType(model_type) if model_type else None)
    except Exception as exc:  # NNCF raises its own and OpenVINO's runtime errors
        raise ExportError(f"{fp32_xml.name}: NNCF could not quantise the graph "
                          f"({one_line(exc)})") from exc
    for key, value in props.items():
        quantised.set_rt_info(value, ["cmc", key])
    int8_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantised, str(int8_xml), compress_to_fp16=False)


class Exporting(Protocol):
    """What the int8 stage uses of the exporter (`cmc_export.exporter._Exporter`)."""

    root: Path
    max_batch: int
    classes: list[str]
    half_required: bool
    refused: list[dict[str, Any]]
    log: Say

    def props(self, mode: str, precision: str) -> dict[str, str]: ...

    def add(self, mode: str, runtime: str, precision: str, path: Path,
            gate: dict[str, Any]) -> None: ...


class Int8Stage:
    """The int8 graphs of one export: tiles found once, each mode quantised and gated."""

    def __init__(self, checkpoint: Path, metadata: Mapping[str, Any], patch: int,
                 calibration: Path | None = None, required: bool = False,
                 thresholds: Int8Thresholds = INT8_THRESHOLDS) -> None:
        self.checkpoint, self.metadata, self.patch = checkpoint, metadata, patch
        self.thresholds = thresholds
        # An explicit --calibration that does not exist, or no datalist at all for a named
        # int8, fails the export before any work.
        self.requested = (find_datalist(calibration, metadata, checkpoint)
                          if calibration or required else None)
        self._tiles: TileSets | CmcError | None = None

    def tiles(self) -> TileSets:
        """The calibration and gate tiles (read once); otherwise the CmcError saying why not
        (CalibrationUnavailable, or the datalist's or an image's own refusal)."""
        if self._tiles is None:
            try:
                datalist = self.requested or find_datalist(None, self.metadata, self.checkpoint)
                self._tiles = tile_sets(datalist, self.metadata["modalities"],
                                        self.metadata["preprocessing"], self.patch)
            except CmcError as exc:
                self._tiles = exc
        if isinstance(self._tiles, CmcError):
            raise self._tiles
        return self._tiles

    def export(self, job: Exporting, mode: str, fp32_xml: Path, fp32_onnx: Path) -> None:
        """Quantise and gate the int8 graph of `mode`; add it to the export, or record why
        not (raised instead when int8 was named: `job.half_required`)."""
        int8_xml = job.root / "openvino" / f"{mode}_{Precision.INT8}.xml"
        try:
            tiles = self.tiles()
            job.log(f"int8 {mode}: calibrating on {tiles.calibration['image_a'].shape[0]} tiles "
                    f"of {tiles.datalist.name}, gating on "
                    f"{tiles.gate['image_a'].shape[0]} held-out tiles")
            gate = self.quantise_and_gate(job, mode, fp32_xml, fp32_onnx, int8_xml, tiles)
        except Exception as exc:  # NNCF and OpenVINO raise their own; auto never fails on int8
            for path in (int8_xml, int8_xml.with_suffix(".bin")):
                path.unlink(missing_ok=True)
            if job.half_required:
                raise
            reason = str(exc) if isinstance(exc, CmcError) else (
                f"{int8_xml.name}: {type(exc).__name__}: {one_line(exc)}")
            numbers = exc.numbers if isinstance(exc, GateFailed) else {}
            job.log(f"refused: openvino int8 {mode}: {reason} (left out; `--precision auto` "
                    "keeps the other graphs)")
            job.refused.append(refused_entry(mode, Runtime.OPENVINO, Precision.INT8, reason,
                                             {"kind": "int8_parity", **numbers}))
            return
        job.add(mode, Runtime.OPENVINO, Precision.INT8, int8_xml, gate)

    def quantise_and_gate(self, job: Exporting, mode: str, fp32_xml: Path, fp32_onnx: Path,
                          int8_xml: Path, tiles: TileSets) -> dict[str, Any]:
        """The int8 IR of `mode` written and judged against fp32 ONNX on the gate tiles."""
        from cmc_export.gate_inputs import mode_inputs
        from cmc_export.gates import run_batched
        from cmc_export.onnx_export import onnxruntime_runner
        from cmc_export.openvino_export import openvino_runner

        inputs, outputs = MODE_INPUTS[mode], MODE_OUTPUTS[mode]
        quantise_ir(fp32_xml, int8_xml, tiles.calibration, inputs, job.props(mode, Precision.INT8))
        held_out = mode_inputs(tiles.gate, mode)
        reference = run_batched(onnxruntime_runner(fp32_onnx, outputs=outputs), held_out,
                                job.max_batch)
        candidate = run_batched(openvino_runner(int8_xml, Precision.INT8, inputs, job.max_batch,
                                                outputs=outputs), held_out, job.max_batch)
        numbers = int8_parity(f"{int8_xml.name} (openvino int8)", reference, candidate, outputs,
                              job.classes, self.thresholds)
        return {"kind": "int8_parity", "reference": "onnxruntime fp32", **numbers,
                "calibration": tiles.record()}
