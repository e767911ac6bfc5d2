"""`make demo`: the whole product on the built-in default, as a user would run it.

Runs the same `cmc` commands a user types (printed as they run), so the demo doubles as a
walk-through: synthesise a two-modality study -> train the tiny model -> evaluate it ->
export ONNX/OpenVINO with parity gates -> segment a DICOM study (SEG, NIfTI, statistics,
preview). The output folder is refused if it exists and was not made by an earlier demo.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

MARKER = ".cmc-demo"


def _cmc(*args: str) -> None:
    """Run one `cmc` command in a subprocess, echoing it first; stop the demo on failure."""
    cmd = [sys.executable, "-m", "cmc_cli.main", *args]
    print(f"\n$ cmc {shlex.join(args)}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        sys.exit(f"demo: `cmc {args[0]}` failed with exit code {result.returncode}")
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def _prepare(out: Path) -> None:
    if out.exists():
        if not (out / MARKER).exists():
            sys.exit(f"demo: {out} exists and was not written by `make demo`; "
                     "choose another DEMO_DIR")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by make demo; safe to delete\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: the tiny preset's)")
    args = parser.parse_args(argv)
    out: Path = args.out
    _prepare(out)
    started = time.perf_counter()

    study, run, model, clinic, seg = (out / "study", out / "run", out / "model",
                                      out / "clinic", out / "segment")
    _cmc("synth", str(study), "--cases", "24", "--labelled-ratio", "0.25", "--val-cases", "4",
         "--test-cases", "0", "--calibration-cases", "20", "--seed", "0")
    train = ["train", "--data", str(study / "datalist.json"), "--out", str(run),
             "--config", "tiny", "--seed", "0"]
    if args.steps:
        train += ["--steps", str(args.steps)]
    _cmc(*train)
    ckpt = run / "checkpoint_best.pt"
    _cmc("evaluate", str(ckpt), "--data", str(study / "datalist.json"), "--split",
         "validation", "--out", str(run / "validation_metrics.json"))
    # --precision auto (the default): fp32, each half precision this host runs and int8
    # (calibrated on the study's training images, recorded in the checkpoint) that pass
    # their gates; one that does not is listed in cmc.json instead of failing the demo.
    _cmc("export", str(ckpt), "--out", str(model), "--format", "onnx,openvino")
    # A separate "clinic" study stands in for a hospital's DICOM export: CT + MR series.
    _cmc("synth", str(clinic), "--cases", "1", "--val-cases", "0", "--test-cases", "0",
         "--labelled-ratio", "1", "--seed", "1234", "--dicom")
    _cmc("segment", str(clinic / "dicom"), "-o", str(seg), "--model", str(model),
         "--statistics", "--preview")

    metrics = json.loads((run / "validation_metrics.json").read_text())
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    print(f"  validation Dice (foreground mean): {_summary(metrics)}")
    print(f"  checkpoint:        {ckpt}")
    print(f"  metrics:           {run / 'validation_metrics.json'}")
    print(f"  exported model:    {model} (cmc.json, onnx/, openvino/, repository/)")
    print("  segmentations:     " + ", ".join(str(p) for p in sorted(seg.glob("*/seg.*"))))
    print(f"  run report:        {seg / 'report.json'}")
    return 0


def _summary(metrics: dict) -> str:
    """'fused 0.83, a 0.80, b 0.78' from `cmc evaluate`'s JSON (mean foreground Dice per mode)."""
    parts = []
    for mode, result in metrics.get("modes", {}).items():
        value = result.get("mean_fg_dice")
        parts.append(f"{mode} {value:.3f}" if isinstance(value, float) else f"{mode} n/a")
    return ", ".join(parts) or json.dumps(metrics)[:200]


if __name__ == "__main__":
    raise SystemExit(main())
