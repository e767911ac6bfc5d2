"""Quality-control benchmark: does the QC score find the cases whose answer is wrong?

    .venv/bin/python bench/qc.py --work WORK [--model MODEL_DIR | --checkpoint CKPT
        --study DATALIST] [--out docs/benchmarks] [--size 64] [--timing-cases 8]

Without `--model` it makes the model `make demo` makes (the demo's study, `cmc train
--config tiny --seed 0`, `cmc export --format onnx,openvino`) in WORK; a checkpoint
trained before quality control existed gets its reference recorded first
(`cmc_train.qc_reference.record_reference`, on its validation split). Then it renders the
failure set and the in-distribution set (`qc_bench.cases`), segments them through the real
pipeline (`cmc_serve.pipeline.segment`, QC at its default), scores each case's true Dice
against the truth and reports (`qc_bench.scoring`): AUROC of the QC score for a failed case
(mean foreground Dice more than 0.15 below the model's validation mean) and for Dice < 0.5,
the flag rate on in-distribution cases, the share of swapped-role and non-abdominal inputs
flagged, and the wall time QC adds to `cmc segment` (--qc off / on / full, on the same
in-distribution cases, alternating, median of the rounds). Writes qc_results.json and
qc_results.md into `--out`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from host_info import cpu_info
from qc_bench import cases as case_set
from qc_bench import scoring

QC_SETTINGS = ("off", "on", "full")  # SegmentOptions.qc; "on" is the default
CPU_FEATURES = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512_fp16", "avx512_vnni")


def prepare_model(work: Path, model: Path | None, checkpoint: Path | None,
                  study: Path | None) -> tuple[Path, dict[str, Any]]:
    """The model directory to benchmark and how it was made."""
    if model is not None:
        return model, {"model": str(model)}
    from cmc_export.exporter import export
    from cmc_train.checkpoint import load_checkpoint
    from cmc_train.config import PreprocessConfig
    from cmc_train.data.datalist import Datalist
    from cmc_train.evaluate import ValidationSet
    from cmc_train.qc_reference import record_reference

    if checkpoint is None:
        study = _demo_training(work)
        checkpoint = work / "run" / "checkpoint_best.pt"
    assert study is not None, "--checkpoint needs --study (its datalist)"
    metadata = load_checkpoint(checkpoint).metadata
    if "qc_reference" not in metadata:
        import torch

        datalist = Datalist.load(study)
        val_set = ValidationSet.from_datalist(
            datalist, PreprocessConfig.from_dict(metadata["preprocessing"]))
        record_reference([checkpoint], datalist, val_set, torch.device("cpu"), say=print)
    out = work / "model"
    if out.exists():
        shutil.rmtree(out)
    export(checkpoint, out, formats=("onnx", "openvino"))
    return out, {"checkpoint": str(checkpoint), "study": str(study)}


def _demo_training(work: Path) -> Path:
    """`make demo`'s study and training (cli/demo.py), into WORK."""
    import subprocess

    study = work / "study"
    for args in (["synth", str(study), "--cases", "24", "--labelled-ratio", "0.25",
                  "--val-cases", "4", "--test-cases", "0", "--calibration-cases", "20",
                  "--seed", "0"],
                 ["train", "--data", str(study / "datalist.json"), "--out", str(work / "run"),
                  "--config", "tiny", "--seed", "0"]):
        subprocess.run([sys.executable, "-m", "cmc_cli.main", *args], check=True)
    return study / "datalist.json"


def segment_set(cases_dir: Path, out: Path, model: Path, qc: str) -> float:
    """`cmc segment` on every case through the library API; returns the wall time."""
    from cmc_serve.pipeline.api import SegmentOptions, segment

    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    segment(cases_dir, out, model, options=SegmentOptions(qc=qc))
    return time.perf_counter() - started


def score_cases(set_dir: Path, out: Path, built: list[case_set.BenchCase],
                classes: Sequence[str]) -> list[dict[str, Any]]:
    """One row per case: kind, severity, true Dice (mean and per structure), QC score,
    flagged, flag codes and the structures the flags name."""
    report = json.loads((out / "report.json").read_text())
    records = {c["case_id"]: c for c in report["cases"]}
    rows = []
    for case in built:
        record = records[case.case_id]
        qc = record["qc"]
        pred = _voxels(out / case.case_id / "seg.nii.gz")
        truth = _voxels(set_dir / "truth" / f"{case.case_id}.nii.gz")
        dice = scoring.fg_dice(pred, truth, len(classes))
        rows.append({"case": case.case_id, "kind": case.kind, "severity": case.severity,
                     "dice": round(float(np.mean(dice)), 4),
                     "structure_dice": {n: round(d, 4) for n, d in zip(classes[1:], dice,
                                                                       strict=True)},
                     "score": qc["score"], "flagged": qc["flagged"],
                     "flags": sorted({f["code"] for f in qc["flags"]}),
                     "flagged_structures": sorted({f["structure"] for f in qc["flags"]
                                                   if f.get("structure")})})
    return rows


def _voxels(path: Path) -> np.ndarray:
    image: Any = nib.load(str(path))  # a NIfTI image (nibabel types it as any file image)
    return np.asarray(image.dataobj)


def time_settings(set_dir: Path, work: Path, model: Path, built: list[case_set.BenchCase],
                  count: int, rounds: int) -> dict[str, Any]:
    """Wall time of `cmc segment` on `count` in-distribution cases per QC setting, the
    settings in turn for `rounds` rounds (a shared machine's drift hits them alike)."""
    timing_dir = work / "timing_cases"
    if timing_dir.exists():
        shutil.rmtree(timing_dir)
    timing_dir.mkdir(parents=True)
    chosen = [c for c in built if c.kind == "in_distribution"][:count]
    for case in chosen:
        for channel in ("0000", "0001"):
            name = f"{case.case_id}_{channel}.nii.gz"
            shutil.copy(set_dir / "cases" / name, timing_dir / name)
    seconds: dict[str, list[float]] = {s: [] for s in QC_SETTINGS}
    for _ in range(rounds):
        for setting in QC_SETTINGS:
            seconds[setting].append(segment_set(timing_dir, work / f"timing_{setting}", model,
                                                setting))
    median = {s: statistics.median(v) for s, v in seconds.items()}
    return {"cases": len(chosen), "rounds": rounds,
            "seconds": {s: [round(x, 2) for x in v] for s, v in seconds.items()},
            "median_seconds": {s: round(v, 2) for s, v in median.items()},
            "added": {s: round(median[s] / median["off"] - 1.0, 4) for s in ("on", "full")}}


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    st = s["structures_in_distribution"]

    def share(d: dict[str, Any]) -> str:
        return f"{d['flagged']}/{d['cases']}" + (f" ({d['share']:.0%})" if d["cases"] else "")

    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    lines = [
        "# Quality-control benchmark (`bench/qc.py`)", "",
        f"Run {result['date']} on {result['host']['cpu']} (features: "
        f"{', '.join(result['host']['cpu_features']) or 'none of ' + ', '.join(CPU_FEATURES)};"
        f" {result['host']['cores']} cores, shared: timings are noisy, ratios come from one "
        "run).", "",
        f"Command: `{result['command']}`", "",
        f"Model: {json.dumps(result['model'])}; validation mean foreground Dice (fused) "
        f"{s['validation_mean_dice']:.3f}, so a case failed below {s['failure_threshold']:.3f};"
        f" QC calibrated on {result['calibration_cases']} held-out cases.",
        "",
        "| figure | measured | target |", "|---|---|---|",
        f"| AUROC, failed (Dice > 0.15 below validation) | {num(s['auroc_failed'])} | >= 0.95 |",
        f"| AUROC, Dice < 0.5 | {num(s['auroc_dice_below_0.5'])} | |",
        f"| in-distribution flagged | {share(s['flagged_in_distribution'])} | <= 5 % |",
        "| in-distribution flagged, of those not failed | "
        f"{share(s['flagged_in_distribution_not_failed'])} | |",
        "| in-distribution flagged, of those with every structure right | "
        f"{share(s['flagged_in_distribution_every_structure_right'])} | |",
        "| in-distribution structures a flag named / the others: median true Dice | "
        f"{num(st['flagged_median_dice'])} ({st['flagged']}) / "
        f"{num(st['others_median_dice'])} ({st['others']}) | |",
        f"| swapped roles + non-abdominal flagged | {share(s['flagged_ood'])} | 100 % |",
        f"| failed cases flagged | {share(s['flagged_among_failed'])} | |",
        f"| cases not failed flagged | {share(s['flagged_among_not_failed'])} | |",
    ]
    timing = result.get("timing")
    if timing:
        lines.append(f"| QC time added, default (on) | {timing['added']['on']:+.1%} | <= 15 % |")
        lines.append(f"| QC time added, full (cross-modal) | {timing['added']['full']:+.1%} | |")
    lines += ["", f"{s['cases']} cases, {s['failed']} failed.", "",
              "| kind | cases | failed | flagged | mean Dice | mean score |",
              "|---|---|---|---|---|---|"]
    for kind, k in s["kinds"].items():
        lines.append(f"| {kind} | {k['cases']} | {k['failed']} | {k['flagged']} | "
                     f"{k['mean_dice']:.3f} | {k['mean_score']:.3f} |")
    if timing:
        lines += ["", f"Timing: {timing['cases']} in-distribution cases, {timing['rounds']} "
                  "rounds, median seconds " + ", ".join(
                      f"{k} {v}" for k, v in timing["median_seconds"].items()) + "."]
    lines += ["", "| case | severity | Dice | worst structure | score | flags |",
              "|---|---|---|---|---|---|"]
    for r in result["cases"]:
        worst = min(r["structure_dice"].items(), key=lambda item: item[1])
        lines.append(f"| {r['case']} | {r['severity']} | {r['dice']:.3f} | "
                     f"{worst[0]} {worst[1]:.3f} | {r['score']:.3f} | "
                     f"{', '.join(r['flags']) or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--study", type=Path, help="the checkpoint's datalist")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=9000,
                        help="the cases' seed (a fresh one gives a set nothing was tuned on)")
    parser.add_argument("--timing-cases", type=int, default=8)
    parser.add_argument("--timing-rounds", type=int, default=2)
    args = parser.parse_args(argv)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, made = prepare_model(work, args.model, args.checkpoint, args.study)
    from cmc_serve.model_dir import ModelInfo

    info = ModelInfo.load(model)
    if not info.qc_reference or "calibration" not in info.qc_reference:
        raise SystemExit(f"{model}: cmc.json records no calibrated qc_reference")
    built = case_set.build_cases(case_set.DEFAULT_COUNTS, size=args.size, seed=args.seed)
    set_dir = work / "set"
    if set_dir.exists():
        shutil.rmtree(set_dir)
    for case in built:
        case.write(set_dir)
    out = work / "segment_on"
    segment_seconds = segment_set(set_dir / "cases", out, model, "on")
    rows = score_cases(set_dir, out, built, info.classes)
    validation = float(info.qc_reference["calibration"]["validation_mean_dice"])
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python bench/qc.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "host": dict(zip(("cpu", "cpu_features"), cpu_info(CPU_FEATURES), strict=True), cores=_cores()),
        "model": made, "counts": case_set.DEFAULT_COUNTS, "seed": args.seed,
        "calibration_cases": info.qc_reference["calibration"]["cases"],
        "segment_seconds_all_cases": round(segment_seconds, 1),
        "summary": scoring.summarise(rows, validation, case_set.OOD_KINDS),
        "cases": rows,
    }
    if args.timing_cases:
        result["timing"] = time_settings(set_dir, work, model, built, args.timing_cases,
                                         args.timing_rounds)
    result["bench_seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qc_results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "qc_results.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    raise SystemExit(main())
