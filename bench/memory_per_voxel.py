"""`cmc segment`'s peak RSS per input voxel: does memory grow with the depth of a CT series?

    .venv/bin/python bench/memory_per_voxel.py --work WORK [--depths 64 256] [--size 512]
        [--model MODEL_DIR] [--keep]

Writes one axial CT series of SIZE x SIZE x N slices per depth (16-bit, 0.7 x 0.7 mm pixels,
2.5 mm slices: a body ellipse, a bright ball, air; tests/dicom_factory.py's CT instances),
then runs the real command as a user would, `cmc segment SERIES --out OUT --model MODEL
--statistics --preview` (NIfTI + DICOM SEG, statistics, preview, quality control on;
`--segment-args ""` for the command's defaults), each
in its own process under `/usr/bin/time -v`, and reads its "Maximum resident set size".
The growth between two depths divided by the voxels added is the figure issue 29 bounds
(<= 6 bytes per input voxel; the input as float32 plus the uint8 label map is 5); the
intercept is the fixed base (interpreter, libraries, model).

Without `--model` the model is the tests' threshold model (tests/segment_fixtures.py: real
ONNX patch graphs, 16^3 patches at 2 mm, CT window pre-processing) with a fingerprint
reference measured on the first series, so the QC input fingerprint runs as it would for a
trained model. Prints progress as it goes and a table; the rows, with the host's CPU model
and features, go to docs/benchmarks/perf_<cpu>.json under "memory_per_voxel [OPTIONS]".
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from host_info import cpu_info, update_perf_rows

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the project's own DICOM writer and test model

PIXEL_MM = 0.7
SLICE_MM = 2.5
CPU_FEATURES = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512_fp16", "avx512_vnni")
TARGET_BYTES_PER_VOXEL = 6.0


def say(line: str) -> None:
    print(line, flush=True)


def host() -> dict[str, Any]:
    """The CPU's model name and which of CPU_FEATURES its flags list."""
    name, features = cpu_info(CPU_FEATURES)
    return {"cpu": name, "features": features}


def ct_slice(size: int, k: int, depth: int) -> np.ndarray:
    """Hounsfield units of slice k: air, a soft-tissue ellipse with noise and a bright ball
    that grows and shrinks along the series (so labels vary from slice to slice)."""
    rng = np.random.default_rng(k)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    hu = np.full((size, size), -1000.0, np.float32)
    body = (x / 0.42) ** 2 + (y / 0.32) ** 2 <= 1.0
    hu[body] = 40.0 + rng.normal(0.0, 15.0, int(body.sum()))
    radius = 0.15 * np.sin(np.pi * (k + 0.5) / depth)
    hu[(x - 0.1) ** 2 + (y + 0.05) ** 2 <= radius ** 2] = 200.0
    return hu


def write_ct_series(folder: Path, size: int, depth: int) -> None:
    """One file per slice, written by tests/dicom_factory.make_dataset (stored = HU + 1024)."""
    from dicom_factory import SeriesSpec, make_dataset

    spec = SeriesSpec(rows=size, cols=size, n_slices=depth, pixel_spacing=(PIXEL_MM, PIXEL_MM),
                      slice_spacing=SLICE_MM, origin=(-size * PIXEL_MM / 2, -size * PIXEL_MM / 2,
                                                      0.0), description="memory bench")
    folder.mkdir(parents=True)
    for k, position in enumerate(spec.positions()):
        stored = np.clip(np.round(ct_slice(size, k, depth) - spec.intercept), 0, 4095)
        make_dataset(spec, k, position, stored.astype(np.int32)).save_as(
            folder / f"IM{k:04d}.dcm", enforce_file_format=True)
        if (k + 1) % 64 == 0 or k + 1 == depth:
            say(f"  wrote {k + 1}/{depth} slices")


def threshold_model(root: Path, series: Path) -> Path:
    """The tests' threshold model, with a QC fingerprint reference of `series`."""
    from segment_fixtures import make_model_dir

    from cmc_serve.dicom.scan import scan_folder
    from cmc_serve.dicom.series import load_series
    from cmc_serve.qc.fingerprint import measure_image, summarise

    volume = load_series(scan_folder(series).volumes[0]).volume
    reference = {"version": 1,
                 "fingerprint": {"ct": summarise([measure_image(volume.array, volume.affine)])}}
    return make_model_dir(root, qc_reference=reference)


def peak_rss(args: list[str]) -> tuple[int, float]:
    """(maximum resident set size in bytes, wall seconds) of one command under time -v."""
    started = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-v", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)
    if not found:
        raise SystemExit(f"no peak RSS in /usr/bin/time's output:\n{run.stderr[-2000:]}")
    return int(found.group(1)) * 1024, seconds


def write_rows(record: dict[str, Any]) -> Path:
    """docs/benchmarks/perf_<cpu>.json, key "memory_per_voxel" plus the segment options
    replaced (other benchmarks' and other options' rows kept)."""
    key = " ".join(["memory_per_voxel", *record["segment_args"].split()])
    return update_perf_rows(record["host"]["cpu"], lambda document: document.update({key: record}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--depths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the series and outputs")
    parser.add_argument("--segment-args", default="--statistics --preview",
                        help="options given to cmc segment (\"\" for its defaults)")
    args = parser.parse_args(argv)
    if len(args.depths) < 2:
        parser.error("--depths needs at least two depths")
    args.work.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "host": host(), "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
        "command": shlex.join(["bench/memory_per_voxel.py", *(argv or sys.argv[1:])]),
        "series": {"size": args.size, "pixel_mm": PIXEL_MM, "slice_mm": SLICE_MM},
        "segment_args": args.segment_args,
        "rows": []}
    say(f"host: {record['host']['cpu']} ({', '.join(record['host']['features']) or 'none'})")
    cmc = str(Path(sys.executable).with_name("cmc"))
    model = args.model
    for depth in sorted(args.depths):
        series = args.work / f"ct_{args.size}x{args.size}x{depth}"
        if not series.is_dir():
            say(f"writing {series.name}")
            write_ct_series(series, args.size, depth)
        if model is None:
            say("making the threshold model")
            model = threshold_model(args.work / "model", series)
        out = args.work / f"out_{depth}"
        shutil.rmtree(out, ignore_errors=True)
        command = [cmc, "segment", str(series), "--out", str(out), "--model", str(model),
                   *args.segment_args.split()]
        say(f"cmc segment {series.name} under /usr/bin/time -v ...")
        rss, seconds = peak_rss(command)
        voxels = args.size * args.size * depth
        record["rows"].append({"slices": depth, "voxels": voxels, "peak_rss_bytes": rss,
                               "seconds": round(seconds, 1)})
        say(f"  {depth} slices: peak RSS {rss / 2**20:.0f} MiB, {seconds:.1f} s")
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    rows = record["rows"]
    slope, base = np.polyfit([float(r["voxels"]) for r in rows],
                             [float(r["peak_rss_bytes"]) for r in rows], 1)
    record["bytes_per_added_voxel"] = round(float(slope), 2)
    record["base_mib"] = round(float(base) / 2**20, 1)
    record["target_bytes_per_voxel"] = TARGET_BYTES_PER_VOXEL
    say("\n| slices | voxels | peak RSS MiB | s |\n|---|---|---|---|")
    for r in rows:
        say(f"| {r['slices']} | {r['voxels']} | {r['peak_rss_bytes'] / 2**20:.0f} | "
            f"{r['seconds']} |")
    verdict = "met" if slope <= TARGET_BYTES_PER_VOXEL else "NOT met"
    say(f"\n{slope:.2f} bytes per added voxel (target <= {TARGET_BYTES_PER_VOXEL}: {verdict}), "
        f"base {base / 2**20:.0f} MiB")
    say(f"rows written to {write_rows(record).relative_to(ROOT)}")
    if not args.keep:
        for depth in args.depths:
            shutil.rmtree(args.work / f"ct_{args.size}x{args.size}x{depth}", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
