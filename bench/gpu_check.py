"""GPU check of `cmc train` (run by bench/gpu_check.sh; see there for what it needs).

    python bench/gpu_check.py --out DIR [--small-steps 300] [--timing-steps 40]

On one CUDA device, with PyTorch only (no network, no onnxruntime-gpu, no TensorRT):
1. timing: steps/s and peak GPU memory (torch.cuda.max_memory_allocated) of the tiny,
   small and sam-med3d presets, each trained for --timing-steps steps on a generated study
   (the first 5 steps, which build kernels and caches, left out of steps/s), with the
   trainer's AMP (bf16 where the GPU has it, else fp16 with loss scaling);
2. training: the small preset for --small-steps steps with AMP, validating every 100;
3. parity: that run's best checkpoint exported to ONNX fp32 (`cmc_export.export`, which
   gates the graph against PyTorch on the CPU) and the graph, run by ONNX Runtime on the
   CPU, compared with the same network on the GPU in fp32 (TF32 off) on the gate's
   phantom tiles: max |probs difference| must be within the export gate's 5e-4.
Prints one table and writes DIR/gpu_check.json. Exit 0 when everything ran and the parity
holds, 1 otherwise, 2 when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmc_train.config import RunConfig, preset_run_config
from cmc_train.data.datalist import Datalist
from cmc_train.run_state import BEST, iter_metrics
from cmc_train.synth import write_synthetic_study
from cmc_train.trainer import train

PRESETS = ("tiny", "small", "sam-med3d")
PARITY_GATE = 5e-4  # the export's ONNX fp32 vs PyTorch gate (docs/DESIGN.md)
WARMUP_STEPS = 5


def _config(name: str, datalist: Datalist, steps: int, val_every: int) -> RunConfig:
    cfg = preset_run_config(name, len(datalist.classes), datalist.modalities)
    return replace(cfg, train=replace(cfg.train, steps=steps, val_every=val_every))


def time_preset(name: str, datalist_path: Path, out: Path, steps: int) -> dict[str, Any]:
    """Steps/s (after warm-up) and peak GPU memory of `steps` training steps of a preset."""
    datalist = Datalist.load(datalist_path)
    cfg = _config(name, datalist, steps=10_000, val_every=10_000)  # long-run schedule
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    train(datalist_path, out / f"timing_{name}", cfg, progress=False, stop_after=steps)
    seconds = [r["seconds"] for r in iter_metrics(out / f"timing_{name}") if r["kind"] == "train"]
    timed = seconds[WARMUP_STEPS - 1:]
    return {"preset": name, "steps": len(seconds),
            "steps_per_s": (len(timed) - 1) / (timed[-1] - timed[0]),
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}


def train_small(datalist_path: Path, out: Path, steps: int) -> dict[str, Any]:
    datalist = Datalist.load(datalist_path)
    cfg = _config("small", datalist, steps=steps, val_every=100)
    torch.cuda.reset_peak_memory_stats()
    summary = train(datalist_path, out / "small", cfg, progress=False)
    return {"steps": summary.steps_done, "steps_per_s": summary.steps_per_second,
            "best_val_dice": summary.best_metric, "best_step": summary.best_step,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20,
            "amp": "bf16" if torch.cuda.is_bf16_supported() else "fp16 + loss scaling"}


def parity(checkpoint: Path, out: Path) -> dict[str, Any]:
    """Exported ONNX fp32 (ONNX Runtime, CPU) vs the network on the GPU (fp32, no TF32)."""
    import onnxruntime as ort

    from cmc_export.exporter import export
    from cmc_export.gate_inputs import mode_inputs, synthetic_tiles
    from cmc_train.checkpoint import load_model
    from cmc_train.config import PreprocessConfig

    model_dir = out / "model"
    export(checkpoint, model_dir, formats=("onnx",), precisions=("fp32",), force=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    net, metadata = load_model(checkpoint)
    net = net.cuda().eval()
    patch = int(metadata["model"]["img_size"])
    tiles = synthetic_tiles(PreprocessConfig.from_dict(metadata["preprocessing"]), patch)
    result = {}
    for mode in ("fused", "a", "b"):
        inputs = mode_inputs(tiles, mode)
        session = ort.InferenceSession(str(model_dir / "onnx" / f"{mode}_fp32.onnx"),
                                       providers=["CPUExecutionProvider"])
        graph = session.run(["probs"], inputs)[0]
        with torch.no_grad():
            a = torch.from_numpy(inputs["image_a"]).cuda() if "image_a" in inputs else None
            b = torch.from_numpy(inputs["image_b"]).cuda() if "image_b" in inputs else None
            gpu = net.predict(a, b, mode).float().cpu().numpy()
        result[mode] = float(np.max(np.abs(graph - gpu)))
    return {"max_abs_diff": result, "gate": PARITY_GATE,
            "passed": all(v <= PARITY_GATE for v in result.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--small-steps", type=int, default=300)
    parser.add_argument("--timing-steps", type=int, default=40)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda}); this check needs an NVIDIA GPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    device = torch.cuda.get_device_name(0)
    print(f"gpu_check: {device}, torch {torch.__version__}, CUDA {torch.version.cuda}",
          flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    datalist = write_synthetic_study(args.out / "study", cases=12, seed=0, size=64,
                                     labelled_ratio=0.25, val_cases=2, test_cases=0)
    report: dict[str, Any] = {"device": device, "torch": torch.__version__,
                              "cuda": torch.version.cuda, "timing": []}
    for name in PRESETS:
        row = time_preset(name, datalist, args.out, args.timing_steps)
        report["timing"].append(row)
        print(f"  {name:10s} {row['steps_per_s']:7.2f} steps/s  peak "
              f"{row['peak_gpu_mib']:8.0f} MiB", flush=True)
    report["small"] = train_small(datalist, args.out, args.small_steps)
    print(f"  small, {report['small']['steps']} steps with AMP ({report['small']['amp']}): "
          f"{report['small']['steps_per_s']:.2f} steps/s, best validation Dice "
          f"{report['small']['best_val_dice']:.3f} at step {report['small']['best_step']}",
          flush=True)
    report["parity"] = parity(args.out / "small" / BEST, args.out)
    diffs = ", ".join(f"{m} {v:.2e}" for m, v in report["parity"]["max_abs_diff"].items())
    print(f"  ONNX fp32 (CPU) vs torch on the GPU, max |probs diff|: {diffs} "
          f"(gate {PARITY_GATE:g}): {'pass' if report['parity']['passed'] else 'FAIL'}")
    report["wall_seconds"] = time.perf_counter() - started
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(f"gpu_check: {report['wall_seconds']:.0f} s; {args.out / 'gpu_check.json'}")
    return 0 if report["parity"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
