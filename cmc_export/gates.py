"""Parity gates: an exported graph is written only if it reproduces its reference.

- fp32 ONNX graphs against PyTorch: max |probs difference| <= 5e-4 on a seeded random batch
  and on patches of a pre-processed synthetic volume. ONNX Runtime and PyTorch sum 3-D
  convolutions and instance norms in other orders; the demo's trained CT graph differed by
  1.1e-4 (2026-11-29, after 1e-4 had held on earlier checkpoints), so 1e-4 failed exports
  on rounding alone. 5e-4 of probability still only lets labels differ where two classes
  are that close.
- reduced-precision candidates (ONNX fp16, OpenVINO bf16/fp16, TensorRT fp16) against the
  fp32 ONNX graph on the synthetic volume: argmax agreement >= 99.5% and Dice >= 0.99 for
  every class present in either segmentation (probabilities may drift, labels may not).
A failing gate raises `GateFailed` with the numbers; the exporter then writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cmc_export.errors import GateFailed

Runner = Callable[[Mapping[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class Thresholds:
    """Gate limits (docs/DESIGN.md 'cmc export')."""

    max_abs_diff: float = 5e-4
    min_argmax_agreement: float = 0.995
    min_dice: float = 0.99


THRESHOLDS = Thresholds()


def run_batched(runner: Runner, inputs: Mapping[str, np.ndarray], max_batch: int) -> np.ndarray:
    """Run `inputs` through `runner` in chunks of at most `max_batch` patches."""
    total = next(iter(inputs.values())).shape[0]
    return np.concatenate([runner({k: v[i:i + max_batch] for k, v in inputs.items()})
                           for i in range(0, total, max_batch)])


def fp32_parity(label: str, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                thresholds: Thresholds = THRESHOLDS) -> dict[str, Any]:
    """Max abs probability difference per input set; GateFailed if any exceeds the limit.

    `reference` / `candidate` map an input-set name (e.g. "random", "synthetic") to probs.
    """
    numbers: dict[str, Any] = {f"max_abs_diff_{name}": float(np.abs(candidate[name] - ref).max())
                               for name, ref in reference.items()}
    numbers["tolerance"] = thresholds.max_abs_diff
    worst = max(v for k, v in numbers.items() if k.startswith("max_abs_diff_"))
    if not np.isfinite(worst) or worst > thresholds.max_abs_diff:
        raise GateFailed(f"{label}: fp32 parity gate failed: {describe_gate(numbers)} "
                         f"(limit {thresholds.max_abs_diff:g})")
    return numbers


def dice_per_class(reference: np.ndarray, candidate: np.ndarray,
                   classes: Sequence[str]) -> dict[str, float]:
    """Dice of each class present in either label map (absent in both: not scored)."""
    scores = {}
    for index, name in enumerate(classes):
        ref, cand = reference == index, candidate == index
        total = int(ref.sum()) + int(cand.sum())
        if total:
            scores[name] = 2.0 * int(np.logical_and(ref, cand).sum()) / total
    return scores


def segmentation_parity(label: str, reference_probs: np.ndarray, candidate_probs: np.ndarray,
                        classes: Sequence[str], thresholds: Thresholds = THRESHOLDS) -> dict[str, Any]:
    """Argmax agreement and per-class Dice of a candidate against the fp32 reference."""
    if not np.isfinite(candidate_probs).all():
        raise GateFailed(f"{label}: precision gate failed: the candidate returned NaN/inf")
    ref, cand = reference_probs.argmax(axis=1), candidate_probs.argmax(axis=1)
    dice = dice_per_class(ref, cand, classes)
    numbers: dict[str, Any] = {
        "argmax_agreement": float((ref == cand).mean()),
        "dice": dice,
        "min_dice": min(dice.values()),
        "max_abs_diff": float(np.abs(candidate_probs - reference_probs).max()),
        "voxels": int(ref.size),
        "min_argmax_agreement": thresholds.min_argmax_agreement,
        "min_dice_required": thresholds.min_dice,
    }
    if (numbers["argmax_agreement"] < thresholds.min_argmax_agreement
            or numbers["min_dice"] < thresholds.min_dice):
        raise GateFailed(f"{label}: precision gate failed: {describe_gate(numbers)} (limits: argmax "
                         f"agreement >= {thresholds.min_argmax_agreement}, Dice >= "
                         f"{thresholds.min_dice})")
    return numbers


def describe_gate(numbers: Mapping[str, Any]) -> str:
    """One line with a gate's numbers, for the export log and GateFailed messages."""
    parts = []
    for key, value in numbers.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k} {v:.4f}" for k, v in value.items())
            parts.append(f"{key} {{{inner}}}")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.3g}" if value < 0.01 else f"{key} {value:.5f}")
        else:
            parts.append(f"{key} {value}")
    return "; ".join(parts)
