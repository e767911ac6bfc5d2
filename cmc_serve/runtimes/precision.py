"""`--precision auto`: the fastest precision whose graph passed its gate and that runs natively here.

On a CPU with native bf16 (AMX, AVX512-BF16) OpenVINO's bf16 kernels segment faster than
fp32 (BENCHMARKS.md), so a user who does not name a precision should get them,
but only where the export gated a bf16 graph and the CPU really has the instructions
(OpenVINO would otherwise accept the hint and quietly run fp32). ONNX Runtime has no fast
half-precision CPU kernels (its fp16 graph is slower than fp32 on a CPU, BENCHMARKS.md), so
auto never picks it on a CPU. On a GPU, TensorRT's fp16 engine is the fast one.

An explicit precision is never replaced: it runs or fails (`cmc_serve.runtimes.select`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

# Fastest first, per (runtime, device); fp32 is always last and always allowed.
PREFERENCE: dict[tuple[str, str], tuple[str, ...]] = {
    ("openvino", "cpu"): ("bf16", "fp16", "fp32"),
    ("onnxruntime", "cpu"): ("fp32",),
    ("onnxruntime", "cuda"): ("fp16", "fp32"),
    ("tensorrt", "cuda"): ("fp16", "fp32"),
}


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision to run and why (recorded in report.json)."""

    precision: str
    reason: str


def native_reason(runtime: str, precision: str) -> str | None:
    """Why `runtime` cannot run `precision` natively on this host, or None if it can."""
    if runtime == "openvino" and precision != "fp32":
        from cmc_serve.runtimes.openvino_rt import unsupported_reason

        return unsupported_reason(precision)
    return None


def choose_precision(runtime: str, device: str, gated: Collection[str]) -> PrecisionChoice:
    """The first precision of PREFERENCE[runtime, device] that is gated and native."""
    passed_over = []
    for precision in PREFERENCE.get((runtime, device), ("fp32",)):
        if precision == "fp32":
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
    return PrecisionChoice("fp32", f"auto: fp32 ({why})")
