"""Peak RSS part of bench/engine.py: each stitching in its own process on one K-class
two-modality volume, with a 1x1x1-conv + softmax patch network (so that stitching, not
the network, sets the peak): the engine's bounded block-wise stitching (float32 and float16
accumulators) against MONAI's full-volume accumulation.

    .venv/bin/python bench/engine_rss.py KIND D H W CLASSES PATCH MODEL_DIR  (one worker;
    bench/engine.py starts them)
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from engine_common import Progress, synthetic_case, write_model_dir

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"engine": "engine, float32 block accumulators",
         "engine-fp16-acc": "engine, float16 block accumulators",
         "monai": "MONAI sliding_window_inference (full-volume float32 accumulation)"}


def rss_worker(kind: str, shape: tuple[int, int, int], classes: int, patch: int,
               model_dir: Path) -> dict[str, float]:
    """Segment one volume in this process; its peak RSS in MiB and the seconds taken.

    The peak is reset once the input exists: generating it needs several volumes of
    temporaries, which would otherwise set every row's peak.
    """
    a, b = synthetic_case(shape, seed=1)
    reset_peak_rss()
    t0 = time.perf_counter()
    if kind.startswith("engine"):
        from cmc_serve.engine import Segmenter

        accumulator = "float16" if kind == "engine-fp16-acc" else "float32"
        with Segmenter(model_dir, runtime="onnxruntime", batch_size=1,
                       accumulator_dtype=accumulator) as seg:
            seg.segment(a, b, mode="fused")
    else:
        import torch
        from monai.inferers import sliding_window_inference

        conv = conv_model(classes)
        vol = torch.from_numpy(np.stack([a, b])[None])
        del a, b
        with torch.no_grad():
            out = sliding_window_inference(
                vol, roi_size=(patch,) * 3, sw_batch_size=1, overlap=0.5, mode="gaussian",
                sigma_scale=0.125, predictor=lambda t: conv(t[:, :1], t[:, 1:]))
            assert isinstance(out, torch.Tensor)
            out.argmax(1).to(torch.uint8)
    return {"peak_rss_mib": peak_rss_mib(), "seconds": time.perf_counter() - t0}


def reset_peak_rss() -> None:
    """Start VmHWM afresh at the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    """This process's peak RSS. Not getrusage: Linux carries ru_maxrss across execve, so a
    child of a big parent would report the parent's peak; VmHWM starts afresh at exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def conv_model(classes: int) -> Any:
    """A 1x1x1 convolution of the two images to `classes` channels and the exported graphs'
    class softmax: a patch network whose cost and memory are negligible."""
    import torch

    from cmc_train.network.cmc_net import class_softmax

    class Pointwise(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv3d(2, classes, 1)

        def forward(self, image_a: torch.Tensor, image_b: torch.Tensor) -> torch.Tensor:
            # As in the exported CMC graphs (see `class_softmax`).
            return class_softmax(self.conv(torch.cat([image_a, image_b], 1)))

    return Pointwise().eval()


def peak_rss(shape: tuple[int, int, int], classes: int, patch: int,
             progress: Progress) -> list[dict[str, Any]]:
    """One row per stitching (`KINDS`), each from its own process, and the inputs' size."""
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="cmc_bench_rss_"))
    x = torch.zeros(2, 1, patch, patch, patch)
    model_dir = write_model_dir(tmp / "pointwise", {"fused": conv_model(classes)}, (x, x),
                                classes, patch, openvino=False)
    rows: list[dict[str, Any]] = []
    for kind, name in KINDS.items():
        progress(f"rss: {name} ...")
        done = subprocess.run([sys.executable, __file__, kind, *map(str, shape), str(classes),
                               str(patch), str(model_dir)],
                              capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            error = (done.stderr.strip().splitlines() or ["no output"])[-1]
            progress(f"rss: {name} failed: {error}")
            rows.append({"stitching": name, "failed": error})
            continue
        out = json.loads(done.stdout.strip().splitlines()[-1])
        progress(f"rss: {name}: peak {out['peak_rss_mib']:.0f} MiB, {out['seconds']:.0f} s")
        rows.append({"stitching": name, **out})
    monai = next((r["peak_rss_mib"] for r in rows if r["stitching"] == KINDS["monai"]
                  and "peak_rss_mib" in r), None)
    for row in rows:
        if monai and "peak_rss_mib" in row:
            row["vs_monai"] = row["peak_rss_mib"] / monai
    rows.append({"stitching": "(the two input volumes alone)",
                 "peak_rss_mib": 2 * float(np.prod(shape)) * 4 / 2**20})
    return rows


def print_rss(rows: list[dict[str, Any]], shape: tuple[int, ...], classes: int,
              patch: int) -> None:
    print(f"\n## Peak RSS: 2 x {' x '.join(map(str, shape))} float32 input, K={classes}, "
          f"1x1x1 patch net, patch {patch}^3, separate processes\n")
    print("| stitching | peak RSS MiB | vs MONAI | seconds |\n|---|---|---|---|")
    for row in rows:
        if "failed" in row:
            print(f"| {row['stitching']} | failed: {row['failed']} | - | - |")
            continue
        ratio = f"{row['vs_monai']:.3f}" if "vs_monai" in row else "-"
        seconds = f"{row['seconds']:.0f}" if "seconds" in row else "-"
        print(f"| {row['stitching']} | {row['peak_rss_mib']:.0f} | {ratio} | {seconds} |")


if __name__ == "__main__":
    kind, d, h, w, k, p, model = sys.argv[1:]
    print(json.dumps(rss_worker(kind, (int(d), int(h), int(w)), int(k), int(p), Path(model))))
