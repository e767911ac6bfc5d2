"""OpenVINO's per-op profile of an exported patch graph: where the time goes, per kernel.

    .venv/bin/python bench/openvino_profile.py MODEL_DIR [--mode fused] [--precision bf16]
        [--tiles 16] [--threads 0]

Compiles the mode's OpenVINO IR as `cmc segment` does (one tile, static shape, the
precision as inference hint; native only), runs `--tiles` random tiles through one infer
request with PERF_COUNT on, and prints the share of time per operation type and the
kernel OpenVINO chose (e.g. brgconv_avx512_amx_bf16 on an AMX CPU, jit_avx512_bf16 without
AMX), with the CPU features the run had.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
from engine import cpu_features  # bench/engine.py: every row names the CPU

from cmc_serve.model_dir import ModelInfo
from cmc_serve.runtimes.openvino_rt import OV_PRECISION, one_tile_shape, unsupported_reason


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--mode", default="fused")
    parser.add_argument("--precision", default="bf16", choices=sorted(OV_PRECISION))
    parser.add_argument("--tiles", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="0: every core")
    args = parser.parse_args()
    reason = unsupported_reason(args.precision)
    if reason:
        parser.error(reason)
    import openvino as ov

    graph = ModelInfo.load(args.model_dir).graph(args.mode, "openvino", args.precision)
    core = ov.Core()
    model = core.read_model(str(graph.path))
    model.reshape({p.get_any_name(): one_tile_shape(p.get_partial_shape()) for p in model.inputs})
    config: dict[str, object] = {"INFERENCE_PRECISION_HINT": OV_PRECISION[args.precision],
                                 "PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY"}
    if args.threads:
        config["INFERENCE_NUM_THREADS"] = args.threads
    request = core.compile_model(model, "CPU", config).create_infer_request()
    rng = np.random.default_rng(0)
    feed = {p.get_any_name(): rng.standard_normal(tuple(p.get_shape()), dtype=np.float32)
            for p in model.inputs}
    request.infer(feed)  # first run: kernel creation, not profiled
    per_op: dict[tuple[str, str], float] = defaultdict(float)
    total_ms = 0.0
    for _ in range(args.tiles):
        request.infer(feed)
        for info in request.get_profiling_info():
            ms = info.real_time.total_seconds() * 1e3
            per_op[(info.node_type, info.exec_type)] += ms
            total_ms += ms
    print(f"{graph.path.name} {args.mode} {args.precision} on {cpu_features()}: "
          f"{total_ms / args.tiles:.1f} ms per tile (sum of op times, {args.tiles} tiles)\n")
    print("| op type | kernel | share | ms per tile |")
    print("|---|---|---|---|")
    for (node_type, exec_type), ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:15]:
        print(f"| {node_type} | {exec_type} | {ms / total_ms:.1%} | {ms / args.tiles:.2f} |")


if __name__ == "__main__":
    main()
