"""int8 against fp32 and bf16 on an exported model: speed, and what quantisation costs.

    .venv/bin/python bench/int8.py MODEL_DIR [--mode fused] [--batch 4] [--rounds 9]
    .venv/bin/python bench/int8.py MODEL_DIR --variants [--datalist D]

Speed: the mode's OpenVINO graphs as `cmc segment` runs them (cmc_serve's OpenVinoRuntime:
fp32 IR at f32, at the bf16 hint where this CPU has it natively, the int8 IR), a batch of
`--batch` tiles per run, taking turns run by run (interleaved), so a shared host's drift
hits them alike; the median time per precision and the median of its per-round ratios to
fp32. Accuracy (`--variants`, instead of timing):
the mode's fp32 IR quantised again with the shipped NNCF settings, NNCF's defaults, and two
deliberately broken calibrations (tiles scaled x0.02 and x50), each judged by the int8 gate
on the held-out tiles of `--datalist` (default: the datalist cmc.json's int8 gate recorded).
Prints progress as it goes and a markdown table; the rows, with the host's CPU model and
features, are written to docs/benchmarks/perf_<cpu>.json under "int8".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from host_info import cpu_info, update_perf_rows

from cmc_common.contract import MODE_INPUTS, MODE_OUTPUTS
from cmc_export.calibration import tile_sets
from cmc_export.errors import GateFailed
from cmc_export.gates import run_batched
from cmc_export.int8_gate import INT8_THRESHOLDS, int8_parity
from cmc_export.onnx_export import onnxruntime_runner
from cmc_export.openvino_export import openvino_runner
from cmc_export.quantise import MODEL_TYPE, PRESET, quantise_ir
from cmc_serve.model_dir import ModelInfo
from cmc_serve.runtimes.openvino_rt import OpenVinoRuntime, unsupported_reason

FEATURES = ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16",
            "amx_int8")
# name -> (calibration tile scale, NNCF model type, preset)
VARIANTS: dict[str, tuple[float, str | None, str]] = {
    f"shipped ({MODEL_TYPE}, {PRESET})": (1.0, MODEL_TYPE, PRESET),
    "NNCF defaults (performance)": (1.0, None, "performance"),
    "broken: calibration tiles x0.02": (0.02, MODEL_TYPE, PRESET),
    "broken: calibration tiles x50": (50.0, MODEL_TYPE, PRESET),
}


def host() -> dict[str, Any]:
    """The CPU model and the instruction-set features that decide int8 / bf16 speed."""
    name, features = cpu_info(FEATURES)
    return {"cpu": name, "features": features}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def speed(info: ModelInfo, mode: str, batch: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per run of `batch` tiles per precision and round, interleaved run by run."""
    runtimes = {}
    for precision in ("fp32", "bf16", "int8"):
        if unsupported_reason(precision):
            say(f"speed: {precision} skipped ({unsupported_reason(precision)})")
            continue
        graph = info.graph(mode, "openvino", precision)
        runtimes[precision] = OpenVinoRuntime(graph.path, inputs=graph.inputs,
                                              output=graph.output, precision=precision,
                                              max_batch=batch)
    rng = np.random.default_rng(0)
    feed = {name: rng.standard_normal((batch, 1, *info.patch_size), dtype=np.float32)
            for name in MODE_INPUTS[mode]}
    for runtime in runtimes.values():
        runtime.run(feed)
    times: dict[str, list[float]] = {p: [] for p in runtimes}
    for round_ in range(rounds):
        for precision, runtime in runtimes.items():
            started = time.perf_counter()
            runtime.run(feed)
            times[precision].append(time.perf_counter() - started)
        say(f"speed: round {round_ + 1}/{rounds}: " + ", ".join(
            f"{p} {t[-1]:.3f} s" for p, t in times.items()))
    return times


def variants(info: ModelInfo, mode: str, datalist: Path, work: Path) -> list[dict[str, Any]]:
    """The int8 gate's numbers for each quantisation variant of the mode's fp32 IR."""
    tiles = tile_sets(datalist, info.modalities, info.preprocessing, info.patch_size[0])
    inputs, outputs = MODE_INPUTS[mode], MODE_OUTPUTS[mode]
    held_out = {name: tiles.gate[name] for name in inputs}
    reference = run_batched(onnxruntime_runner(info.graph(mode, "onnxruntime", "fp32").path,
                                               outputs=outputs), held_out, info.max_batch)
    fp32_xml = info.graph(mode, "openvino", "fp32").path
    rows = []
    for index, (name, (scale, model_type, preset)) in enumerate(VARIANTS.items()):
        say(f"variants: {index + 1}/{len(VARIANTS)}: {name}")
        xml = work / f"{mode}_{index}.xml"
        quantise_ir(fp32_xml, xml, {k: v * scale for k, v in tiles.calibration.items()},
                    inputs, {}, model_type=model_type, preset=preset)
        candidate = run_batched(openvino_runner(xml, "int8", inputs, info.max_batch,
                                                outputs=outputs), held_out, info.max_batch)
        try:
            numbers, verdict = int8_parity(name, reference, candidate, outputs,
                                           list(info.classes), INT8_THRESHOLDS), "passed"
        except GateFailed as exc:
            numbers, verdict = exc.numbers, "refused"
        rows.append({"variant": name, "verdict": verdict, **summary(numbers)})
    return rows


def summary(numbers: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of a gate record the tables show (probs output)."""
    dice_all = numbers.get("dice_all_voxels", {})
    smallest = min(dice_all, key=dice_all.get) if dice_all else None
    return {"decided_agreement": numbers.get("decided_agreement"),
            "argmax_agreement": numbers.get("argmax_agreement"),
            "min_dice_decided": min(numbers.get("dice", {}).values(), default=None),
            "smallest_class_dice_all_voxels": dice_all.get(smallest) if smallest else None,
            "lowest_class": smallest}


def write_rows(part: str, record: dict[str, Any]) -> Path:
    """docs/benchmarks/perf_<cpu>.json: `int8.<part>` replaced, everything else kept."""
    return update_perf_rows(record["host"]["cpu"],
                            lambda document: document.setdefault("int8", {}).update({part: record}))


def speed_rows(info: ModelInfo, args: argparse.Namespace) -> dict[str, Any]:
    """Time per batch and ratio to fp32 per precision, printed as a table."""
    # The ratio is taken within each round (the runs a few seconds apart), then the median:
    # a busy host's speed drifts by 2x between rounds, much less within one.
    seconds = speed(info, args.mode, args.batch, args.rounds)
    rows = {p: {"seconds_per_batch": statistics.median(s),
                "vs_fp32": statistics.median(f / t for f, t in zip(seconds["fp32"], s,
                                                                    strict=True))}
            for p, s in seconds.items()}
    print(f"\n{args.mode} graph, batch {args.batch}, {args.rounds} interleaved rounds: median "
          "time, median of the per-round ratios\n\n| precision | s / batch | vs fp32 |\n"
          "|---|---|---|")
    for precision, row in rows.items():
        print(f"| {precision} | {row['seconds_per_batch']:.3f} | {row['vs_fp32']:.2f}x |")
    return {"batch": args.batch, "rounds": args.rounds, "precisions": rows}


def variant_rows(info: ModelInfo, args: argparse.Namespace, datalist: Path) -> dict[str, Any]:
    """The int8 gate's verdict and numbers per quantisation variant, printed as a table."""
    with tempfile.TemporaryDirectory(prefix="cmc-int8-") as work:
        rows = variants(info, args.mode, datalist, Path(work))
    print("\n| quantisation | gate | decided agreement | all-voxel agreement | min Dice "
          "(decided) | lowest class Dice (all voxels) |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['verdict']} | {row['decided_agreement']:.5f} | "
              f"{row['argmax_agreement']:.5f} | {row['min_dice_decided']:.4f} | "
              f"{row['lowest_class']} {row['smallest_class_dice_all_voxels']:.4f} |")
    return {"datalist": str(datalist), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--mode", default="fused")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--variants", action="store_true",
                        help="judge the quantisation variants instead of timing")
    parser.add_argument("--datalist", type=Path, default=None)
    args = parser.parse_args(argv)
    info = ModelInfo.load(args.model_dir)
    int8 = info.graph(args.mode, "openvino", "int8")
    record: dict[str, Any] = {"host": host(), "command": " ".join(["bench/int8.py", *sys.argv[1:]]),
                              "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
                              "mode": args.mode, "exported_gate": summary(int8.gate)}
    say(f"host: {record['host']['cpu']} ({', '.join(record['host']['features'])})")
    if args.variants:
        datalist = args.datalist or Path(int8.gate["calibration"]["datalist"])
        record.update(variant_rows(info, args, datalist))
    else:
        record.update(speed_rows(info, args))
    say(f"rows written to {write_rows('variants' if args.variants else 'speed', record)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
