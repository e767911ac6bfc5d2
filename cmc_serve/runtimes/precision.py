"""`--precision auto`: the fastest precision whose graph passed its gate on this host.

Half precision by rule. On a CPU with native bf16 (AMX, AVX512-BF16) OpenVINO's bf16 kernels
segment faster than fp32 (BENCHMARKS.md), so a user who does not name a precision gets them,
but only where the export gated a bf16 graph and the CPU really has the instructions
(OpenVINO would otherwise accept the hint and quietly run fp32). ONNX Runtime has no fast
half-precision CPU kernels (its fp16 graph is slower than fp32 on a CPU, BENCHMARKS.md), so
auto never picks it on a CPU. On a GPU, TensorRT's fp16 engine is the fast one.

int8 by measurement. An int8 graph (NNCF-quantised at export, gated) runs on every x86 CPU,
but whether it beats the rule's choice depends on the host: 1.87x fp32 against bf16's 1.78x
on an AMD EPYC with AVX512-BF16, far ahead where VNNI is the only acceleration, and a
question of AMX-INT8 against AMX-BF16 on a Sapphire Rapids. No rule over CPU flags gets that
right, so when the model has a gated int8 graph, auto times a few tiles on it and on the
rule's choice, interleaved (`measure_tile_seconds`), and takes int8 only when it is at least
`INT8_MARGIN` faster (within that margin the timing is noise and the graph that moves
probabilities less wins). The measurement runs once per model, mode and process
(`cmc_serve.runtimes.select` caches it) and the figures go into `precision_reason`.

An explicit precision is never replaced: it runs or fails (`cmc_serve.runtimes.select`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cmc_common.contract import Device, Precision, Runtime
from cmc_serve.runtimes.base import PatchRuntime

FP32, INT8 = Precision.FP32, Precision.INT8
# Fastest first, per (runtime, device), by rule; fp32 is always last and always allowed.
PREFERENCE: dict[tuple[str, str], tuple[str, ...]] = {
    (Runtime.OPENVINO, Device.CPU): (Precision.BF16, Precision.FP16, FP32),
    (Runtime.ONNXRUNTIME, Device.CPU): (FP32,),
    (Runtime.ONNXRUNTIME, Device.CUDA): (Precision.FP16, FP32),
    (Runtime.TENSORRT, Device.CUDA): (Precision.FP16, FP32),
}
# Runtimes that run int8 graphs (cmc export quantises OpenVINO IR only).
INT8_RUNTIMES = (Runtime.OPENVINO,)
# int8 is chosen when the rule's precision takes at least this many times its time per tile.
INT8_MARGIN = 1.05
# The measurement: one untimed warm-up run per precision, then MEASURE_ROUNDS interleaved
# timed runs of MEASURE_TILES tiles each; the fastest run counts (the least disturbed by
# whatever else the host runs).
MEASURE_TILES = 2
MEASURE_ROUNDS = 3

# precisions -> seconds per tile of each
Measure = Callable[[Sequence[str]], Mapping[str, float]]


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision to run and why (recorded in report.json)."""

    precision: str
    reason: str


def native_reason(runtime: str, precision: str) -> str | None:
    """Why `runtime` cannot run `precision` natively on this host, or None if it can."""
    if runtime == Runtime.OPENVINO and precision != FP32:
        from cmc_serve.runtimes.openvino_rt import unsupported_reason

        return unsupported_reason(precision)
    return None


def rule_precision(runtime: str, device: str, gated: Collection[str]) -> PrecisionChoice:
    """The first precision of PREFERENCE[runtime, device] that is gated and native."""
    passed_over = []
    for precision in PREFERENCE.get((runtime, device), (FP32,)):
        if precision == FP32:
            break
        if precision not in gated:
            passed_over.append(f"{precision}: no gated {precision} graph in the model")
            continue
        reason = native_reason(runtime, precision)
        if reason is None:
            return PrecisionChoice(precision, f"auto: {precision}, the fastest gated graph "
                                              f"{runtime} runs natively on this {device}")
        passed_over.append(f"{precision}: not native here")
    why = "; ".join(passed_over) or f"{runtime} on {device} runs fp32 fastest"
    return PrecisionChoice(FP32, f"auto: fp32 ({why})")


def choose_precision(runtime: str, device: str, gated: Collection[str],
                     measure: Measure | None = None) -> PrecisionChoice:
    """The rule's precision, or int8 where the model has a gated int8 graph for `runtime`
    and `measure` (seconds per tile of each precision asked) finds it INT8_MARGIN faster.
    Without `measure` int8 is never chosen."""
    rule = rule_precision(runtime, device, gated)
    if INT8 not in gated or runtime not in INT8_RUNTIMES or measure is None:
        return rule
    seconds = measure((rule.precision, INT8))
    figures = (f"measured {1e3 * seconds[INT8]:.1f} ms per tile in int8, "
               f"{1e3 * seconds[rule.precision]:.1f} in {rule.precision}")
    if seconds[INT8] * INT8_MARGIN <= seconds[rule.precision]:
        return PrecisionChoice(INT8, f"auto: int8, the gated int8 graph is "
                                     f"{seconds[rule.precision] / seconds[INT8]:.2f}x "
                                     f"{rule.precision} on this {device} ({figures})")
    return PrecisionChoice(rule.precision, f"{rule.reason}; int8 not {INT8_MARGIN:g}x faster "
                                           f"here ({figures})")


def measure_tile_seconds(open_at: Callable[[str], PatchRuntime], precisions: Sequence[str],
                         inputs: Sequence[str], patch: Sequence[int]) -> dict[str, float]:
    """Seconds per tile of each precision's runtime (`open_at(precision)`, closed again):
    seeded N(0, 1) tiles (convolution and matmul kernels do not care what the values are),
    a warm-up run each, then MEASURE_ROUNDS interleaved timed runs; the fastest counts."""
    rng = np.random.default_rng(0)
    runtimes = {p: open_at(p) for p in precisions}
    try:
        batch = min(MEASURE_TILES, *(rt.max_batch for rt in runtimes.values()))
        feed = {name: rng.standard_normal((batch, 1, *patch), dtype=np.float32)
                for name in inputs}
        for runtime in runtimes.values():
            runtime.run(feed)
        best = dict.fromkeys(precisions, float("inf"))
        for _ in range(MEASURE_ROUNDS):
            for precision, runtime in runtimes.items():
                started = time.perf_counter()
                runtime.run(feed)
                best[precision] = min(best[precision], time.perf_counter() - started)
    finally:
        for runtime in runtimes.values():
            runtime.close()
    return {p: seconds / batch for p, seconds in best.items()}
