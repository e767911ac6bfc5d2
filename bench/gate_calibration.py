"""Measure the half-precision gate on a checkpoint: correct candidates vs deliberate faults.

    python bench/gate_calibration.py CKPT [--modes fused,a,b] [--bias 0.3]

For every mode it traces the fp32 patch graph, runs the gate volume of `cmc export`
through ONNX Runtime fp32 (the reference) and through candidates that must pass (ONNX
fp16, bf16 / fp16 emulated with normalisations in fp32, native OpenVINO bf16 / fp16 where
the CPU has them) and faults that must be refused (NaN, overflow, a sign-flipped layer,
swapped inputs, one class's logit shifted by --bias), and prints one markdown row each
with the gate's statistics and verdict. docs/GATES.md holds the results that set the
limits; the CPU's features are printed first, as every benchmark row names them.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
from engine import cpu_features, cpu_model  # bench/engine.py: every row names the CPU

from cmc_export.emulated_precision import emulate
from cmc_export.errors import GateFailed
from cmc_export.fault_injection import inject
from cmc_export.fp16 import FP32_OPS, convert_fp16
from cmc_export.gate_inputs import mode_inputs, synthetic_tiles
from cmc_export.gates import (
    RoundingNoise,
    Runner,
    run_batched,
    segmentation_parity,
    top_two_margin,
)
from cmc_export.onnx_export import onnxruntime_runner, trace_to_onnx
from cmc_export.openvino_export import export_openvino, openvino_runner, unsupported_reason
from cmc_export.patch_graph import patch_graph
from cmc_train.checkpoint import load_model
from cmc_train.config import PreprocessConfig

Candidate = Runner


def candidates(model: onnx.ModelProto, mode: str, bias: float, classes: int,
               workdir: Path) -> dict[str, tuple[str, bool, Candidate]]:
    """name -> (precision, must pass, runner)."""
    def ort(graph: onnx.ModelProto) -> Candidate:
        return onnxruntime_runner(graph)

    emulated = emulate(model, "bf16")
    found: dict[str, tuple[str, bool, Candidate]] = {
        "onnx fp16": ("fp16", True, ort(convert_fp16(model))),
        "emulated bf16, fp32 statistics": ("bf16", True, ort(emulate(model, "bf16", FP32_OPS))),
        "emulated fp16, fp32 statistics": ("fp16", True, ort(emulate(model, "fp16", FP32_OPS))),
    }
    onnx_path, xml = workdir / f"{mode}.onnx", workdir / f"{mode}.xml"
    onnx.save_model(model, str(onnx_path))
    export_openvino(onnx_path, xml, {})
    inputs = tuple(i.name for i in model.graph.input)
    for precision in ("bf16", "fp16"):
        if unsupported_reason(precision) is None:
            found[f"openvino {precision} (native)"] = (
                precision, True, openvino_runner(xml, precision, inputs, 4))
    faults = ["nan", "overflow", "wrong_layer"] + (["swapped_inputs"] if mode == "fused" else [])
    for fault in faults:
        found[f"fault: {fault}"] = ("bf16", False, ort(inject(emulated, fault)))
    for organ in range(1, classes):
        found[f"fault: class {organ} logit -{bias:g}"] = (
            "bf16", False, ort(inject(emulated, "class_bias", organ, bias)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--modes", default="fused,a,b")
    parser.add_argument("--bias", type=float, default=0.3,
                        help="logit shift of the class-bias fault (default 0.3)")
    args = parser.parse_args()
    net, metadata = load_model(args.checkpoint)
    preprocess = PreprocessConfig.from_dict(metadata["preprocessing"])
    classes = list(metadata["classes"])
    size = int(net.cfg.img_size)
    tiles = synthetic_tiles(preprocess, size)
    print(f"{args.checkpoint} on {cpu_model()} ({cpu_features()})\n")
    print("| mode | candidate | emulated noise p99.9 / max | prob error p99.9 / max | "
          "decided share | decided agreement | min Dice (class) | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="cmc-gates-") as tmp:
        for mode in args.modes.split(","):
            model = trace_to_onnx(patch_graph(net, mode), mode, size)
            inputs = mode_inputs(tiles, mode)
            reference = run_batched(onnxruntime_runner(model), inputs, 4)
            noise = {p: RoundingNoise.measure(
                p, reference, run_batched(onnxruntime_runner(emulate(model, p)), inputs, 4))
                for p in ("bf16", "fp16")}
            margin = np.quantile(top_two_margin(reference), [0.1, 0.5])
            print(f"| {mode} | (reference: top-two margin p10 {margin[0]:.3f}, "
                  f"median {margin[1]:.3f}) | | | | | | |")
            for name, (precision, must_pass, run) in candidates(
                    model, mode, args.bias, len(classes), Path(tmp)).items():
                probs = run_batched(run, inputs, 4)
                row = _row(name, reference, probs, classes, noise[precision])
                ok = row[-1].startswith("pass") == must_pass
                print(f"| {mode} | {name} | {noise[precision].prob_error_p999:.4f} / "
                      f"{noise[precision].prob_error_max:.4f} | " + " | ".join(row)
                      + ("" if ok else " **unexpected**") + " |")


def _row(name: str, reference: np.ndarray, probs: np.ndarray, classes: list[str],
         noise: RoundingNoise) -> list[str]:
    try:
        numbers = segmentation_parity(name, reference, probs, classes, noise)
        verdict = "pass"
    except GateFailed as exc:
        numbers, verdict = exc.numbers, "refused: " + str(exc).split("failed: ", 1)[1]
    if not numbers:  # non-finite output: nothing else was measured
        return ["-", "-", "-", "-", verdict]
    dice = numbers["dice"]
    worst = min(dice, key=lambda k: dice[k]) if dice else None
    return [f"{numbers['prob_error_p999']:.4f} / {numbers['prob_error_max']:.4f}",
            f"{numbers['decided_share']:.3f}", f"{numbers['decided_agreement']:.5f}",
            f"{dice[worst]:.4f} ({worst})" if worst else "-", verdict]


if __name__ == "__main__":
    main()
