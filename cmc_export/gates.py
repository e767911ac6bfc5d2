"""Parity gates: an exported graph is written only if it reproduces its reference.

- fp32 ONNX graphs against PyTorch: max |probs difference| <= 5e-4 on a seeded random batch
  and on patches of a pre-processed synthetic volume. ONNX Runtime and PyTorch sum 3-D
  convolutions and instance norms in other orders; the demo's trained CT graph differed by
  1.1e-4 (2026-11-29, after 1e-4 had held on earlier checkpoints), so 1e-4 failed exports
  on rounding alone. 5e-4 of probability still only lets labels differ where two classes
  are that close.
- reduced-precision candidates (ONNX fp16, OpenVINO bf16/fp16, TensorRT fp16) against the
  fp32 ONNX graph on the synthetic volume (`segmentation_parity`). Half precision moves
  every probability a little, and how much depends on the model: the sharper its logits,
  the larger the rounding error in probability. So each candidate is judged against the
  rounding noise of the same fp32 graph with every weight and activation rounded to that
  precision in ONNX Runtime (`cmc_export.emulated_precision`, runs on any CPU): every
  output finite; the 99.9th percentile of the per-voxel probability error within a
  multiple of the emulation's; on *decided* voxels (the reference's top two probabilities
  further apart than that rounding can move them) the labels agree, and every class with
  enough decided voxels keeps its Dice. Voxels whose label is a coin toss at that precision,
  and classes with a handful of voxels, measure noise, not the graph. docs/GATES.md gives
  the measurements behind each limit.
- every output of a graph is gated, not only `probs`: the fused graph's branch outputs
  (`probs_a`, `probs_b`, read by quality control) against the same reference outputs, each
  judged on its own (its own rounding noise at half precision). A runner returns its
  outputs joined along the class axis (`join_outputs`); the gates split them again.
A failing gate raises `GateFailed` with the numbers; the exporter then writes nothing (or,
for a half precision it chose itself, records the refusal and goes on).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cmc_common.contract import GRAPH_OUTPUT
from cmc_export.errors import GateFailed

Runner = Callable[[Mapping[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class Thresholds:
    """Gate limits; docs/GATES.md gives the measurements behind each one."""

    max_abs_diff: float = 5e-4  # fp32 parity: max |probability difference| against PyTorch
    noise_factor: float = 3.0  # half precision: prob error p99.9 <= factor * emulated + floor
    noise_floor: float = 0.005
    decided_margin: tuple[float, float] = (0.05, 0.5)  # 2 x emulated max error, clipped to this
    min_decided_agreement: float = 0.999  # share of decided voxels with the reference's label
    min_class_share: float = 0.005  # decided voxels a class needs (share) for its Dice to count
    min_dice: float = 0.99  # Dice on decided voxels of every class with enough of them


@dataclass(frozen=True)
class RoundingNoise:
    """How far the same fp32 graph moves when rounded to the candidate's precision."""

    precision: str
    prob_error_p999: float
    prob_error_max: float

    @classmethod
    def measure(cls, precision: str, reference_probs: np.ndarray,
                emulated_probs: np.ndarray) -> RoundingNoise:
        error = np.abs(emulated_probs - reference_probs).max(axis=1)
        return cls(precision, float(np.quantile(error, 0.999)), float(error.max()))

    @classmethod
    def measure_outputs(cls, precision: str, reference: np.ndarray, emulated: np.ndarray,
                        outputs: Sequence[str]) -> dict[str, RoundingNoise]:
        """The noise of each output of joined runner results (`join_outputs`)."""
        ref, emu = split_outputs(reference, outputs), split_outputs(emulated, outputs)
        return {name: cls.measure(precision, ref[name], emu[name]) for name in outputs}

    def limits(self, thresholds: Thresholds) -> dict[str, float]:
        """The limits a candidate of this precision must meet, as cmc.json records them."""
        low, high = thresholds.decided_margin
        return {
            "max_prob_error_p999": thresholds.noise_factor * self.prob_error_p999
            + thresholds.noise_floor,
            "decided_margin": float(np.clip(2.0 * self.prob_error_max, low, high)),
            "min_decided_agreement": thresholds.min_decided_agreement,
            "min_class_share": thresholds.min_class_share,
            "min_dice": thresholds.min_dice,
        }


THRESHOLDS = Thresholds()


def join_outputs(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Graph outputs [N, K, ...] as one runner result [N, len * K, ...] (one: itself)."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=1)


def split_outputs(joined: np.ndarray, outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """A joined runner result back to its outputs by name (the inverse of `join_outputs`)."""
    if joined.ndim < 2 or joined.shape[1] % len(outputs):
        raise GateFailed(f"graph returned shape {joined.shape}, which does not hold "
                         f"{len(outputs)} outputs {list(outputs)} of equal class count")
    return dict(zip(outputs, np.split(joined, len(outputs), axis=1), strict=True))


def run_batched(runner: Runner, inputs: Mapping[str, np.ndarray], max_batch: int) -> np.ndarray:
    """Run `inputs` through `runner` in chunks of at most `max_batch` patches."""
    total = next(iter(inputs.values())).shape[0]
    return np.concatenate([runner({k: v[i:i + max_batch] for k, v in inputs.items()})
                           for i in range(0, total, max_batch)])


def fp32_parity(label: str, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                thresholds: Thresholds = THRESHOLDS,
                outputs: Sequence[str] = (GRAPH_OUTPUT,)) -> dict[str, Any]:
    """Max abs probability difference per input set and output; GateFailed if any exceeds
    the limit.

    `reference` / `candidate` map an input-set name (e.g. "random", "synthetic") to the
    graph's `outputs` joined (`join_outputs`). `max_abs_diff_<set>` is `probs`'s, as before
    graphs had more outputs; `max_abs_diff_<set>_<output>` that of each further output.
    """
    numbers: dict[str, Any] = {}
    for name, joined in reference.items():
        if candidate[name].shape != joined.shape:
            raise GateFailed(f"{label}: fp32 parity gate failed: output shape "
                             f"{candidate[name].shape} differs from the reference's "
                             f"{joined.shape}")
        ref, cand = split_outputs(joined, outputs), split_outputs(candidate[name], outputs)
        for output in outputs:
            key = f"max_abs_diff_{name}" + ("" if output == GRAPH_OUTPUT else f"_{output}")
            numbers[key] = float(np.abs(cand[output] - ref[output]).max())
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


def top_two_margin(probs: np.ndarray) -> np.ndarray:
    """Per voxel, the gap between the two largest class probabilities of probs [N, K, ...]."""
    top_two = np.partition(probs, probs.shape[1] - 2, axis=1)[:, -2:]
    return top_two[:, 1] - top_two[:, 0]


def segmentation_parity(label: str, reference_probs: np.ndarray, candidate_probs: np.ndarray,
                        classes: Sequence[str], noise: RoundingNoise,
                        thresholds: Thresholds = THRESHOLDS) -> dict[str, Any]:
    """Judge a half-precision candidate against the fp32 reference (see the module docstring).

    `noise` is the emulated rounding noise of the candidate's precision on the same graph.
    Returns the measured numbers with their limits; GateFailed names every limit missed.
    """
    limits = noise.limits(thresholds)
    if candidate_probs.shape != reference_probs.shape:
        raise GateFailed(f"{label}: precision gate failed: output shape {candidate_probs.shape} "
                         f"differs from the reference's {reference_probs.shape}")
    finite = np.isfinite(candidate_probs)
    if not finite.all():
        share = 1.0 - float(finite.mean())
        raise GateFailed(f"{label}: precision gate failed: the candidate returned NaN/inf in "
                         f"{share:.2%} of its outputs (overflow or an invalid operation)")
    error = np.abs(candidate_probs - reference_probs).max(axis=1)
    ref, cand = reference_probs.argmax(axis=1), candidate_probs.argmax(axis=1)
    decided = top_two_margin(reference_probs) >= limits["decided_margin"]
    n_decided = int(decided.sum())
    support = {name: int(np.count_nonzero(ref[decided] == index))
               for index, name in enumerate(classes)}
    needed = thresholds.min_class_share * n_decided
    scored = [name for name in classes if support[name] and support[name] >= needed]
    dice_all = dice_per_class(ref[decided], cand[decided], classes)
    dice = {name: dice_all[name] for name in scored}
    numbers: dict[str, Any] = {
        "prob_error_p999": float(np.quantile(error, 0.999)),
        "prob_error_max": float(error.max()),
        "decided_share": n_decided / ref.size,
        "decided_agreement": float((ref[decided] == cand[decided]).mean()) if n_decided else 1.0,
        "argmax_agreement": float((ref == cand).mean()),
        "dice": dice,
        "unscored_classes": [n for n in classes if n not in dice and support[n]],
        "voxels": int(ref.size),
    }
    missed = []
    if numbers["prob_error_p999"] > limits["max_prob_error_p999"]:
        missed.append(f"prob_error_p999 {numbers['prob_error_p999']:.4f} > "
                      f"{limits['max_prob_error_p999']:.4f} ({thresholds.noise_factor:g} x "
                      f"emulated {noise.precision} {noise.prob_error_p999:.4f} + "
                      f"{thresholds.noise_floor:g})")
    if numbers["decided_agreement"] < thresholds.min_decided_agreement:
        missed.append(f"decided_agreement {numbers['decided_agreement']:.5f} < "
                      f"{thresholds.min_decided_agreement}")
    missed += [f"dice {name} {value:.4f} < {thresholds.min_dice}"
               for name, value in dice.items() if value < thresholds.min_dice]
    numbers["noise"] = {"emulated": noise.precision, "prob_error_p999": noise.prob_error_p999,
                        "prob_error_max": noise.prob_error_max}
    numbers["limits"] = limits
    if missed:
        raise GateFailed(f"{label}: precision gate failed: {'; '.join(missed)}",
                         numbers=numbers)
    return numbers


def outputs_parity(label: str, reference: np.ndarray, candidate: np.ndarray,
                   outputs: Sequence[str], classes: Sequence[str],
                   noise: Mapping[str, RoundingNoise],
                   thresholds: Thresholds = THRESHOLDS) -> dict[str, Any]:
    """`segmentation_parity` of every output of joined results, each against its own
    rounding `noise`; `probs`'s numbers at the top level (the record of a graph with one
    output), the others' under "branch_outputs". The first output to fail raises."""
    if candidate.shape != reference.shape:
        raise GateFailed(f"{label}: precision gate failed: output shape {candidate.shape} "
                         f"differs from the reference's {reference.shape}")
    ref, cand = split_outputs(reference, outputs), split_outputs(candidate, outputs)
    numbers = {name: segmentation_parity(label if name == GRAPH_OUTPUT else f"{label} {name}",
                                         ref[name], cand[name], classes, noise[name],
                                         thresholds)
               for name in outputs}
    gate = numbers.pop(GRAPH_OUTPUT)
    if numbers:
        gate["branch_outputs"] = numbers
    return gate


def describe_gate(numbers: Mapping[str, Any]) -> str:
    """One line with a gate's numbers, for the export log and GateFailed messages."""
    parts = []
    for key, value in numbers.items():
        if key in ("limits", "tolerance", "noise", "calibration"):
            continue
        if key == "branch_outputs":
            parts += [f"{name} prob_error_p999 {v['prob_error_p999']:.4f} decided_agreement "
                      f"{v['decided_agreement']:.5f}" for name, v in value.items()]
        elif isinstance(value, dict):
            inner = ", ".join(f"{k} {v:.4f}" for k, v in value.items())
            parts.append(f"{key} {{{inner}}}")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.3g}" if value < 0.01 else f"{key} {value:.5f}")
        else:
            parts.append(f"{key} {value}")
    return "; ".join(parts)
