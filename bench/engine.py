"""Benchmark: the torch-free engine against MONAI sliding-window inference, end to end.

    .venv/bin/python bench/engine.py [--size 96] [--preset tiny|small | --checkpoint CKPT]
        [--rounds 1] [--rss-shape 400 512 512] [--rss-classes 8]

1. Speed on one pre-processed two-modality volume (size^3) with the tiny (patch 32^3) or
   small (patch 64^3) CMC network (random init, seeded) or a trained checkpoint's, every
   pipeline warmed up on a volume of two patches' edge first: MONAI
   `sliding_window_inference` + torch eager fp32 (and under `torch.autocast` bf16, what a
   user who knows their CPU would run, where the CPU has native bf16) versus `Segmenter` on
   ONNX Runtime fp32, OpenVINO fp32 and OpenVINO bf16 (where the CPU has native bf16), all
   in this one run, with the ratios, the label agreement (Dice of bf16 vs fp32 labels:
   meaningful with --checkpoint, a random network's labels are noise) and the achieved
   FLOP/s of the patch network next to numpy's fp32 GEMM FLOP/s measured in the same run.
2. Peak RSS, each in its own process, of segmenting a K-class two-modality volume with a
   cheap 1x1x1 patch network (so that stitching, not the network, dominates): the engine's
   slab-wise stitching versus MONAI's full-volume accumulation.

Prints a markdown table plus the CPU model and thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from cmc_common.contract import GRAPH_OUTPUT, MODE_INPUTS
from cmc_serve.model_dir import graph_entry, write_model_json

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def gemm_flops(n: int = 2048, repeats: int = 5) -> float:
    a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
    b = a.T.copy()
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def write_model_dir(root: Path, graphs: dict[str, object], example: object, classes: int,
                    patch: int, openvino: bool) -> Path:
    """Export `graphs` (mode -> torch module) to ONNX (+ OpenVINO IR) with a cmc.json."""
    import torch

    (root / "onnx").mkdir(parents=True)
    entries = []
    for mode, module in graphs.items():
        inputs = list(MODE_INPUTS[mode])
        onnx_file = f"onnx/{mode}_fp32.onnx"
        with torch.no_grad():
            torch.onnx.export(module, example, str(root / onnx_file), input_names=inputs,
                              output_names=[GRAPH_OUTPUT], opset_version=17, dynamo=False,
                              dynamic_axes={n: {0: "batch"} for n in [*inputs, GRAPH_OUTPUT]})
        entries.append(graph_entry(mode, "onnxruntime", "fp32", onnx_file))
        if openvino:
            import openvino as ov

            (root / "openvino").mkdir(exist_ok=True)
            xml = f"openvino/{mode}_fp32.xml"
            ov.save_model(ov.convert_model(str(root / onnx_file)), str(root / xml),
                          compress_to_fp16=False)
            entries.append(graph_entry(mode, "openvino", "fp32", xml))
    write_model_json(root, name="bench", cmc_version="0.1.0", modalities=["ct", "mr"],
                     classes=[f"c{i}" for i in range(classes)], patch_size=[patch] * 3,
                     max_batch=4, preprocessing={}, graphs=entries)
    return root


def synthetic_case(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape],
                             indexing="ij")
    blob = np.exp(-4 * (zz**2 + yy**2 + xx**2))
    a = blob + 0.3 * rng.standard_normal(shape, dtype=np.float32)
    b = np.sin(3 * zz) * blob + 0.3 * rng.standard_normal(shape, dtype=np.float32)
    return a.astype(np.float32), b.astype(np.float32)


def dice(x: np.ndarray, y: np.ndarray, classes: int) -> float:
    scores = []
    for c in range(1, classes):
        denom = (x == c).sum() + (y == c).sum()
        if denom:
            scores.append(2 * ((x == c) & (y == c)).sum() / denom)
    return float(np.mean(scores)) if scores else 1.0


def fused_graph(net: object) -> object:
    """The fused predict graph of a CMCNet as a module (image_a, image_b) -> probs."""
    import torch

    class FusedGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, image_a: torch.Tensor, image_b: torch.Tensor) -> torch.Tensor:
            return self.net.predict(image_a, image_b, "fused")  # type: ignore[attr-defined]

    return FusedGraph()


def cpu_features() -> str:
    """The CPU flags that decide half precision (every benchmark row names them)."""
    flags = set(Path("/proc/cpuinfo").read_text().split())
    found = [f for f in ("amx_bf16", "avx512_bf16", "avx512_fp16", "avx512_vnni") if f in flags]
    return ", ".join(found) or "none of amx_bf16/avx512_bf16/avx512_fp16/avx512_vnni"


def load_network(preset: str, checkpoint: Path | None) -> tuple[object, int, object]:
    """(network in eval mode, classes, its PreprocessConfig or None): a trained checkpoint's,
    or the preset's seeded random init."""
    import torch

    from cmc_train.config import PreprocessConfig, model_config
    from cmc_train.network import build_cmc

    if checkpoint is not None:
        from cmc_train.checkpoint import load_model

        net, metadata = load_model(checkpoint)
        return (net.eval(), len(metadata["classes"]),
                PreprocessConfig.from_dict(metadata["preprocessing"]))
    torch.manual_seed(0)
    return build_cmc(model_config(preset, 5)).eval(), 5, None


def phantom_case(preprocess: object, patch: int, shape: tuple[int, int, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic CT/MR pair pre-processed as the checkpoint was trained (anatomy a trained
    network recognises), centred in `shape`."""
    from cmc_export.gate_inputs import centre_fit, preprocessed_phantom

    volumes = preprocessed_phantom(preprocess, patch)  # type: ignore[arg-type]
    return centre_fit(volumes["image_a"], shape), centre_fit(volumes["image_b"], shape)


def speed(size: int, preset: str, rounds: int, checkpoint: Path | None = None,
          ) -> tuple[list[tuple[str, str, str, str, str]], dict[str, object]]:
    import torch
    from monai.data.utils import dense_patch_slices
    from monai.inferers import sliding_window_inference
    from torch.utils.flop_counter import FlopCounterMode

    from cmc_serve.engine import Segmenter
    from cmc_serve.runtimes import RuntimeUnavailable
    from cmc_serve.runtimes.openvino_rt import unsupported_reason
    from cmc_serve.tiling import TileGrid

    net, classes, preprocess = load_network(preset, checkpoint)
    roi = net.cfg.img_size  # type: ignore[attr-defined]
    graph = fused_graph(net)
    x = torch.randn(1, 1, roi, roi, roi)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        graph(x, x)  # type: ignore[operator]
    tile_flops = counter.get_total_flops()
    tmp = Path(tempfile.mkdtemp(prefix="cmc_bench_"))
    model_dir = write_model_dir(tmp / preset, {"fused": graph}, (x.repeat(2, 1, 1, 1, 1),) * 2,
                                classes, roi, openvino=True)
    a, b = (phantom_case(preprocess, roi, (size,) * 3) if preprocess is not None
            else synthetic_case((size,) * 3))
    shape = a.shape
    info: dict[str, object] = {"tile_gflop": tile_flops / 1e9, "patch": roi}

    monai_tiles = len(dense_patch_slices(shape, (roi,) * 3, (roi // 2,) * 3))
    engine_tiles = len(TileGrid.build(shape, (roi,) * 3, 0.5))

    def monai(a: np.ndarray, b: np.ndarray, autocast: bool = False) -> np.ndarray:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            probs = sliding_window_inference(
                torch.from_numpy(np.stack([a, b])[None]), roi_size=(roi,) * 3, sw_batch_size=4,
                overlap=0.5, mode="gaussian", sigma_scale=0.125,
                predictor=lambda t: net.predict(t[:, :1], t[:, 1:], "fused"))
        return probs[0].float().argmax(0).numpy().astype(np.uint8)

    anchor = ("MONAI sliding_window + torch eager", "fp32")
    autocast_key = ("MONAI sliding_window + torch eager", "bf16 autocast")
    pipelines: dict[tuple[str, str], Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
        anchor: monai}
    unavailable: dict[tuple[str, str], str] = {}
    bf16_reason = unsupported_reason("bf16")
    if bf16_reason is None:
        pipelines[autocast_key] = lambda a, b: monai(a, b, autocast=True)
    else:
        unavailable[autocast_key] = bf16_reason
    times: dict[tuple[str, str], list[float]] = {}
    labels: dict[tuple[str, str], np.ndarray] = {}
    with ExitStack() as stack, torch.no_grad():
        for runtime, precision in (("onnxruntime", "fp32"), ("openvino", "fp32"),
                                   ("openvino", "bf16")):
            key = (f"engine {runtime}", precision)
            seg = stack.enter_context(Segmenter(model_dir, runtime=runtime, precision=precision))
            try:
                seg.runtime_for("fused")
            except RuntimeUnavailable as exc:
                unavailable[key] = str(exc)
                continue
            pipelines[key] = lambda a, b, seg=seg: seg.segment(a, b, mode="fused").labels
        # Every pipeline first segments a small volume untimed: torch's first batches of a
        # shape run ~1.4x slower (oneDNN primitive creation), as OpenVINO's compilation would.
        warm_a, warm_b = synthetic_case((2 * roi,) * 3, seed=1)
        for run in pipelines.values():
            run(warm_a, warm_b)
        # Rounds take the pipelines in turn, so that a drift of the machine's speed (shared
        # hosts move by 1.5x within minutes) hits them all alike; the median is reported.
        # The GEMM reference is measured in every round too.
        gemms = []
        for _ in range(rounds):
            gemms.append(gemm_flops())
            for key, run in pipelines.items():
                t0 = time.perf_counter()
                labels[key] = run(a, b)
                times.setdefault(key, []).append(time.perf_counter() - t0)
    seconds = {key: statistics.median(values) for key, values in times.items()}
    rows = []
    for key in pipelines:
        tiles = monai_tiles if key[0] == anchor[0] else engine_tiles
        rows.append((*key, f"{seconds[key]:.1f}", f"{seconds[anchor] / seconds[key]:.2f}",
                     f"{tiles * tile_flops / seconds[key] / 1e9:.1f}"))
    for key, reason in unavailable.items():
        rows.append((*key, "unavailable", "-", "-"))
        info[f"{key[0]} {key[1]} unavailable"] = reason
    info["argmax agreement engine ORT vs MONAI"] = float(
        (labels[("engine onnxruntime", "fp32")] == labels[anchor]).mean())
    if ("engine openvino", "bf16") in labels:
        info["Dice bf16 vs fp32 labels (OpenVINO)"] = dice(
            labels[("engine openvino", "bf16")], labels[("engine openvino", "fp32")], classes)
    if autocast_key in labels:
        info["Dice bf16 autocast vs fp32 labels (torch)"] = dice(
            labels[autocast_key], labels[anchor], classes)
    info["network"] = str(checkpoint) if checkpoint else f"{preset} preset, random init"
    info["rounds"] = rounds
    info["gemm_gflops"] = statistics.median(gemms) / 1e9
    info["tiles"] = {"monai": monai_tiles, "engine": engine_tiles}
    return rows, info


def rss_worker(kind: str, shape: tuple[int, int, int], classes: int, patch: int,
               model_dir: Path) -> None:
    """Runs in its own process: segment one volume, print the peak RSS in MiB.

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
            out.argmax(1).to(torch.uint8)
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "seconds": time.perf_counter() - t0}))


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


def conv_model(classes: int) -> object:
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


def peak_rss(shape: tuple[int, int, int], classes: int,
             patch: int) -> list[tuple[str, str, str]]:
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="cmc_bench_rss_"))
    x = torch.zeros(2, 1, patch, patch, patch)
    model_dir = write_model_dir(tmp / "pointwise", {"fused": conv_model(classes)}, (x, x),
                                classes, patch, openvino=False)
    input_mib = 2 * np.prod(shape) * 4 / 2**20
    rows = []
    for kind in ("engine", "engine-fp16-acc", "monai"):
        done = subprocess.run([sys.executable, __file__, "--rss-worker", kind, "--rss-shape",
                               *map(str, shape), "--rss-classes", str(classes),
                               "--rss-patch", str(patch),
                               "--model-dir", str(model_dir)],
                              capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            rows.append((kind, "failed", done.stderr.strip().splitlines()[-1]))
            continue
        out = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append((kind, f"{out['peak_rss_mib']:.0f}", f"{out['seconds']:.0f}"))
    rows.append(("(input volumes alone)", f"{input_mib:.0f}", "-"))
    return rows


def print_speed(size: int, preset: str, rounds: int, checkpoint: Path | None) -> None:
    rows, info = speed(size, preset, rounds, checkpoint)
    print(f"## Speed: {info['network']} (patch {info['patch']}^3), two-modality {size}^3 volume, "
          f"overlap 0.5, gaussian blending, labels out; median of {info['rounds']} round(s), "
          "pipelines in turn\n")
    print("| pipeline | precision | seconds | speed-up vs MONAI | patch-net GFLOP/s |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nnumpy fp32 GEMM (2048^2): {info['gemm_gflops']:.0f} GFLOP/s; patch network "
          f"{info['tile_gflop']:.2f} GFLOP per tile; tiles {info['tiles']}")
    for key, value in info.items():
        if key not in ("gemm_gflops", "tile_gflop", "tiles", "patch", "rounds", "network"):
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96, help="edge of the speed-test volume")
    parser.add_argument("--preset", choices=("tiny", "small"), default="tiny",
                        help="network of the speed test (patch 32^3 or 64^3)")
    parser.add_argument("--checkpoint", type=Path,
                        help="a trained checkpoint's network instead of the preset's random "
                             "init (for the bf16 vs fp32 label Dice)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="speed-test rounds, pipelines in turn; the median is reported")
    parser.add_argument("--rss-shape", type=int, nargs=3, default=(400, 512, 512))
    parser.add_argument("--rss-classes", type=int, default=8)
    parser.add_argument("--rss-patch", type=int, default=128)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--rss-worker", choices=("engine", "engine-fp16-acc", "monai"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    shape = tuple(args.rss_shape)
    if args.rss_worker:
        rss_worker(args.rss_worker, shape, args.rss_classes, args.rss_patch, args.model_dir)
        return

    import torch

    print(f"CPU: {cpu_model()} ({cpu_features()}), {os.cpu_count()} logical CPUs, torch "
          f"threads {torch.get_num_threads()}, python {platform.python_version()}\n")
    if not args.skip_speed:
        print_speed(args.size, args.preset, args.rounds, args.checkpoint)
    if args.skip_rss:
        return
    print(f"\n## Peak RSS: 2 x {' x '.join(map(str, shape))} float32 input, K={args.rss_classes}, "
          f"1x1x1 patch net, patch {args.rss_patch}^3, separate processes\n")
    print("| stitching | peak RSS MiB | seconds |")
    print("|---|---|---|")
    for row in peak_rss(shape, args.rss_classes, args.rss_patch):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
