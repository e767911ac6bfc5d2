"""Benchmark: the torch-free engine against MONAI sliding-window inference, end to end.

    .venv/bin/python bench/engine.py [--size 96] [--preset tiny|small | --checkpoint CKPT
        [--exported MODEL_DIR]] [--no-native-half] [--rounds 1]
        [--rss-shape 400 512 512] [--rss-classes 8] [--skip-speed] [--skip-rss]

1. Speed on one pre-processed two-modality volume (size^3) with the tiny (patch 32^3) or
   small (patch 64^3) CMC network (random init, seeded) or a trained checkpoint's, every
   pipeline warmed up on a volume of two patches' edge first: MONAI
   `sliding_window_inference` + torch eager fp32 (and under `torch.autocast` bf16, what a
   user who knows their CPU would run, where the CPU has native bf16) versus `Segmenter` on
   ONNX Runtime fp32, OpenVINO fp32 and OpenVINO bf16 (where the CPU has native bf16), all
   in this one run, with the ratios, the label agreement (Dice of bf16 vs fp32 labels:
   meaningful with --checkpoint, a random network's labels are noise) and the achieved
   FLOP/s of the patch network next to numpy's fp32 GEMM FLOP/s measured in the same run.
   With `--exported` (the `cmc export` of --checkpoint, int8 graph and gates included):
   the default row, `Segmenter(MODEL_DIR)` with runtime and precision "auto" as `cmc
   segment` runs it (int8 where gated and measured faster, cmc_serve.runtimes.precision),
   and its OpenVINO int8 graph by name. `--no-native-half` plays a host without native
   bf16 / fp16 (a VNNI-only Xeon) in this process: OpenVINO's capability list loses BF16
   and FP16, so auto and every bf16 row behave as there; the int8 graph's non-quantised
   ops then run at f32, as they do on such a host.
2. Peak RSS (bench/engine_rss.py), each stitching in its own process on a K-class volume.

Prints progress to stderr as it goes, markdown tables to stdout, and writes the rows, with
the host's CPU model and features, to docs/benchmarks/perf_<cpu>.json under "engine".
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from engine_common import Progress, synthetic_case, write_model_dir
from engine_rss import peak_rss, print_rss
from host_info import cpu_info, update_perf_rows

FEATURES = ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16",
            "amx_int8")
HALF = ("BF16", "FP16")  # OpenVINO capabilities that --no-native-half hides
ANCHOR = ("MONAI sliding_window + torch eager", "fp32")
AUTOCAST = ("MONAI sliding_window + torch eager", "bf16 autocast")


def cpu_model() -> str:
    """The CPU's model name (also read by the other benchmarks' headers)."""
    return cpu_info(())[0]


def cpu_features() -> str:
    """The CPU flags that decide half precision and int8 (every row names them)."""
    return ", ".join(cpu_info(FEATURES)[1]) or f"none of {'/'.join(FEATURES)}"


def hide_native_half() -> None:
    """Play a CPU without native bf16 / fp16 in this process: cmc asks OpenVINO's capability
    list in one place (`openvino_rt.cpu_capabilities`), as the tests do to play other hosts."""
    from cmc_serve.runtimes import openvino_rt

    name, capabilities = openvino_rt.cpu_capabilities()
    kept = tuple(c for c in capabilities if c not in HALF)
    setattr(openvino_rt, "cpu_capabilities",  # noqa: B010 (mypy: a cached function)
            lambda: (f"{name} (native {'/'.join(HALF)} hidden)", kept))


def gemm_flops(n: int = 2048, repeats: int = 5) -> float:
    """numpy's fp32 GEMM rate: what the patch networks' GFLOP/s are read against."""
    a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
    b = a.T.copy()
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def dice(x: np.ndarray, y: np.ndarray, classes: int) -> float:
    scores = []
    for c in range(1, classes):
        denom = (x == c).sum() + (y == c).sum()
        if denom:
            scores.append(2 * ((x == c) & (y == c)).sum() / denom)
    return float(np.mean(scores)) if scores else 1.0


def fused_graph(net: Any) -> Any:
    """The fused predict graph of a CMCNet as a module (image_a, image_b) -> probs."""
    import torch

    class FusedGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, image_a: torch.Tensor, image_b: torch.Tensor) -> torch.Tensor:
            return self.net.predict(image_a, image_b, "fused")

    return FusedGraph()


def load_network(preset: str, checkpoint: Path | None) -> tuple[Any, int, Any]:
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


def phantom_case(preprocess: Any, patch: int, shape: tuple[int, int, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic CT/MR pair pre-processed as the checkpoint was trained (anatomy a trained
    network recognises), centred in `shape`."""
    from cmc_export.gate_inputs import centre_fit, preprocessed_phantom

    volumes = preprocessed_phantom(preprocess, patch)
    return centre_fit(volumes["image_a"], shape), centre_fit(volumes["image_b"], shape)


Pipeline = Callable[[np.ndarray, np.ndarray], np.ndarray]


def fused_labels(seg: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return seg.segment(a, b, mode="fused").labels


def engine_pipelines(stack: ExitStack, model_dir: Path, exported: Path | None,
                     info: dict[str, Any]) -> tuple[dict[tuple[str, str], Pipeline],
                                                    dict[tuple[str, str], str]]:
    """The engine's pipelines that run here, and why the others do not: the benchmark's own
    fp32 export on ONNX Runtime and OpenVINO, OpenVINO bf16, and with `exported` the
    default (`Segmenter` with runtime and precision auto) and OpenVINO int8."""
    from cmc_serve.engine import Segmenter
    from cmc_serve.runtimes import RuntimeUnavailable

    wanted: list[tuple[tuple[str, str], Path, str, str]] = [
        (("engine onnxruntime", "fp32"), model_dir, "onnxruntime", "fp32"),
        (("engine openvino", "fp32"), model_dir, "openvino", "fp32"),
        (("engine openvino", "bf16"), model_dir, "openvino", "bf16")]
    if exported is not None:
        wanted += [(("engine openvino", "int8"), exported, "openvino", "int8"),
                   (("engine default", "auto"), exported, "auto", "auto")]
    pipelines: dict[tuple[str, str], Pipeline] = {}
    unavailable: dict[tuple[str, str], str] = {}
    for key, root, runtime_name, precision in wanted:
        seg = stack.enter_context(Segmenter(root, runtime=runtime_name, precision=precision))
        try:
            runtime = seg.runtime_for("fused")
        except RuntimeUnavailable as exc:
            unavailable[key] = str(exc)
            continue
        if precision == "auto":  # the default: name what auto chose, and why
            key = (f"engine default ({runtime.name})", f"auto: {runtime.precision}")
            info["default precision reason"] = seg.segment(
                *synthetic_case((2 * seg.model.patch_size[0],) * 3, seed=1)).precision_reason
        pipelines[key] = functools.partial(fused_labels, seg)
    return pipelines, unavailable


def speed(size: int, preset: str, rounds: int, checkpoint: Path | None, exported: Path | None,
          progress: Progress) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import torch
    from monai.data.utils import dense_patch_slices
    from monai.inferers import sliding_window_inference
    from torch.utils.flop_counter import FlopCounterMode

    from cmc_serve.runtimes.openvino_rt import unsupported_reason
    from cmc_serve.tiling import TileGrid

    net, classes, preprocess = load_network(preset, checkpoint)
    roi = net.cfg.img_size
    graph = fused_graph(net)
    x = torch.randn(1, 1, roi, roi, roi)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        graph(x, x)
    tile_flops = counter.get_total_flops()
    progress(f"speed: exporting the fused graph (patch {roi}^3) to ONNX and OpenVINO fp32")
    tmp = Path(tempfile.mkdtemp(prefix="cmc_bench_"))
    model_dir = write_model_dir(tmp / preset, {"fused": graph}, (x.repeat(2, 1, 1, 1, 1),) * 2,
                                classes, roi, openvino=True)
    a, b = (phantom_case(preprocess, roi, (size,) * 3) if preprocess is not None
            else synthetic_case((size,) * 3))
    shape = a.shape
    info: dict[str, Any] = {"tile_gflop": tile_flops / 1e9, "patch": roi}

    monai_tiles = len(dense_patch_slices(shape, (roi,) * 3, (roi // 2,) * 3))
    engine_tiles = len(TileGrid.build(shape, (roi,) * 3, 0.5))

    def monai(a: np.ndarray, b: np.ndarray, autocast: bool = False) -> np.ndarray:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            probs = sliding_window_inference(
                torch.from_numpy(np.stack([a, b])[None]), roi_size=(roi,) * 3, sw_batch_size=4,
                overlap=0.5, mode="gaussian", sigma_scale=0.125,
                predictor=lambda t: net.predict(t[:, :1], t[:, 1:], "fused"))
        assert isinstance(probs, torch.Tensor)
        return probs[0].float().argmax(0).numpy().astype(np.uint8)

    times: dict[tuple[str, str], list[float]] = {}
    labels: dict[tuple[str, str], np.ndarray] = {}
    with ExitStack() as stack, torch.no_grad():
        pipelines, unavailable = engine_pipelines(stack, model_dir, exported, info)
        pipelines = {ANCHOR: monai, **pipelines}
        bf16_reason = unsupported_reason("bf16")
        if bf16_reason is None:
            pipelines[AUTOCAST] = lambda a, b: monai(a, b, autocast=True)
        else:
            unavailable[AUTOCAST] = bf16_reason
        # Every pipeline first segments a small volume untimed: torch's first batches of a
        # shape run ~1.4x slower (oneDNN primitive creation), as OpenVINO's compilation would.
        warm_a, warm_b = synthetic_case((2 * roi,) * 3, seed=1)
        for key, run in pipelines.items():
            progress(f"speed: warm-up {' '.join(key)}")
            run(warm_a, warm_b)
        # Rounds take the pipelines in turn, so that a drift of the machine's speed (shared
        # hosts move by 1.5x within minutes) hits them all alike; the median is reported.
        # The GEMM reference is measured in every round too.
        gemms = []
        for round_ in range(rounds):
            gemms.append(gemm_flops())
            for key, run in pipelines.items():
                t0 = time.perf_counter()
                labels[key] = run(a, b)
                times.setdefault(key, []).append(time.perf_counter() - t0)
                progress(f"speed: round {round_ + 1}/{rounds}: {' '.join(key)} "
                         f"{times[key][-1]:.1f} s")
    # Each ratio is taken within its round (the pipelines minutes apart at most), then the
    # median over the rounds, as bench/int8.py does.
    rows = []
    for key, values in times.items():
        tiles = monai_tiles if key[0] == ANCHOR[0] else engine_tiles
        seconds = statistics.median(values)
        rows.append({"pipeline": key[0], "precision": key[1], "seconds": seconds,
                     "vs_monai": statistics.median(
                         m / s for m, s in zip(times[ANCHOR], values, strict=True)),
                     "patch_net_gflops": tiles * tile_flops / seconds / 1e9})
    for key, reason in unavailable.items():
        rows.append({"pipeline": key[0], "precision": key[1], "unavailable": reason})
    info["argmax agreement engine ORT vs MONAI"] = float(
        (labels[("engine onnxruntime", "fp32")] == labels[ANCHOR]).mean())
    comparisons = {
        "bf16 vs fp32 labels (OpenVINO)": (("engine openvino", "bf16"),
                                           ("engine openvino", "fp32")),
        "bf16 autocast vs fp32 labels (torch)": (AUTOCAST, ANCHOR),
        "int8 (OpenVINO) vs MONAI fp32 labels": (("engine openvino", "int8"), ANCHOR)}
    for key in labels:
        if key[0].startswith("engine default"):
            comparisons["default vs MONAI fp32 labels"] = (key, ANCHOR)
    for name, (key, reference) in comparisons.items():
        if key in labels:
            info[f"Dice {name}"] = dice(labels[key], labels[reference], classes)
    info["network"] = str(checkpoint) if checkpoint else f"{preset} preset, random init"
    info["rounds"] = rounds
    info["gemm_gflops"] = statistics.median(gemms) / 1e9
    info["tiles"] = {"monai": monai_tiles, "engine": engine_tiles}
    return rows, info


def print_speed(rows: list[dict[str, Any]], info: dict[str, Any], size: int) -> None:
    print(f"## Speed: {info['network']} (patch {info['patch']}^3), two-modality {size}^3 volume, "
          f"overlap 0.5, gaussian blending, labels out; median of {info['rounds']} round(s), "
          "pipelines in turn (speed-up: median of the per-round ratios)\n")
    print("| pipeline | precision | seconds | speed-up vs MONAI | patch-net GFLOP/s |")
    print("|---|---|---|---|---|")
    for row in rows:
        if "unavailable" in row:
            print(f"| {row['pipeline']} | {row['precision']} | unavailable | - | - |")
        else:
            print(f"| {row['pipeline']} | {row['precision']} | {row['seconds']:.1f} | "
                  f"{row['vs_monai']:.2f} | {row['patch_net_gflops']:.1f} |")
    print(f"\nnumpy fp32 GEMM (2048^2): {info['gemm_gflops']:.0f} GFLOP/s; patch network "
          f"{info['tile_gflop']:.2f} GFLOP per tile; tiles {info['tiles']}")
    for row in rows:
        if "unavailable" in row:
            print(f"{row['pipeline']} {row['precision']} unavailable: {row['unavailable']}")
    for key, value in info.items():
        if key not in ("gemm_gflops", "tile_gflop", "tiles", "patch", "rounds", "network"):
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


def record(args: argparse.Namespace, played: str | None) -> dict[str, Any]:
    """What every row set written to perf_<cpu>.json carries: host, command, date, load."""
    name, features = cpu_info(FEATURES)
    return {"host": {"cpu": name, "features": features, "logical_cpus": os.cpu_count(),
                     "played": played},
            "command": " ".join(["bench/engine.py", *sys.argv[1:]]),
            "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
            "load_average_1min_at_start": os.getloadavg()[0]}


def write_rows(key: str, rows: dict[str, Any]) -> Path:
    """docs/benchmarks/perf_<cpu>.json: `engine.<key>` replaced, everything else kept."""
    rows["load_average_1min_at_end"] = os.getloadavg()[0]
    return update_perf_rows(rows["host"]["cpu"],
                            lambda document: document.setdefault("engine", {}).update({key: rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96, help="edge of the speed-test volume")
    parser.add_argument("--preset", choices=("tiny", "small"), default="tiny",
                        help="network of the speed test (patch 32^3 or 64^3)")
    parser.add_argument("--checkpoint", type=Path,
                        help="a trained checkpoint's network instead of the preset's random "
                             "init (for the label Dice)")
    parser.add_argument("--exported", type=Path,
                        help="the `cmc export` of --checkpoint: adds the default (auto) and "
                             "int8 rows")
    parser.add_argument("--no-native-half", action="store_true",
                        help="play a host without native bf16/fp16 (a VNNI-only Xeon)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="speed-test rounds, pipelines in turn; the median is reported")
    parser.add_argument("--rss-shape", type=int, nargs=3, default=(400, 512, 512))
    parser.add_argument("--rss-classes", type=int, default=8)
    parser.add_argument("--rss-patch", type=int, default=128)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.exported is not None:
        check_exported(parser, args.exported, args.checkpoint)
    played = None
    if args.no_native_half:
        hide_native_half()
        played = f"no native half precision: OpenVINO capabilities without {', '.join(HALF)}"

    import torch

    progress = Progress()
    print(f"CPU: {cpu_model()} ({cpu_features()}), {os.cpu_count()} logical CPUs, torch "
          f"threads {torch.get_num_threads()}, python {platform.python_version()}, load "
          f"average {os.getloadavg()[0]:.1f}" + (f"; played: {played}" if played else "") + "\n")
    if not args.skip_speed:
        rows = record(args, played)
        speed_rows, info = speed(args.size, args.preset, args.rounds, args.checkpoint,
                                 args.exported, progress)
        print_speed(speed_rows, info, args.size)
        network = "checkpoint" if args.checkpoint else args.preset
        key = f"speed {network} {args.size}^3" + (" no native half" if played else "")
        rows.update({"size": args.size, "rows": speed_rows, "info": info})
        progress(f"speed rows written to {write_rows(key, rows)} under engine.{key}")
    if args.skip_rss:
        return
    shape = tuple(args.rss_shape)
    rows = record(args, played)
    rss_rows = peak_rss(shape, args.rss_classes, args.rss_patch, progress)
    print_rss(rss_rows, shape, args.rss_classes, args.rss_patch)
    key = f"peak rss {'x'.join(map(str, shape))} k{args.rss_classes} p{args.rss_patch}"
    rows.update({"shape": list(shape), "classes": args.rss_classes, "patch": args.rss_patch,
                 "rows": rss_rows})
    progress(f"rss rows written to {write_rows(key, rows)} under engine.{key}")


def check_exported(parser: argparse.ArgumentParser, exported: Path,
                   checkpoint: Path | None) -> None:
    """--exported must be the export of --checkpoint (its cmc.json records the checkpoint's
    SHA-256): the default row is compared with MONAI running that checkpoint's network."""
    from cmc_serve.model_dir import ModelInfo

    if checkpoint is None:
        parser.error("--exported needs --checkpoint (the checkpoint it was exported from)")
    recorded = ModelInfo.load(exported).checkpoint_sha256
    actual = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    if recorded != actual:
        parser.error(f"{exported} was exported from another checkpoint (cmc.json records "
                     f"sha256 {recorded}, {checkpoint} has {actual})")


if __name__ == "__main__":
    main()
