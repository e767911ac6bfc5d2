"""The int8 gate: an int8 graph's labels against fp32's, on tiles calibration never saw.

The half-precision gate (`cmc_export.gates.segmentation_parity`) judges a candidate against
the emulated rounding noise of its precision. That rule does not carry over to int8: its
error is not rounding of each value but ranges learnt from calibration tiles, which no
emulation of "the same graph in int8" reproduces without running the quantiser itself. So
int8 is judged on what a user sees, with fixed limits measured on correct and broken
quantisations (docs/GATES.md):

- every output finite;
- label agreement on *decided* voxels (the fp32 reference's top two probabilities at least
  `decided_margin` apart, so that only a real change of the graph can swap them);
- Dice on decided voxels of every class with at least `min_class_share` of them.

The probability error (99.9th percentile and max), the agreement and Dice over all voxels
are recorded beside, not gated: int8 moves probabilities near a boundary by more than half
precision does, and the labels there are a coin toss in fp32 too. Every output of the graph
is judged (the fused graph's `probs_a` / `probs_b` too), `probs`'s numbers at the top level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cmc_common.contract import GRAPH_OUTPUT
from cmc_export.errors import GateFailed
from cmc_export.gates import dice_per_class, split_outputs, top_two_margin


@dataclass(frozen=True)
class Int8Thresholds:
    """Limits of the int8 gate; docs/GATES.md gives the measurements behind each one."""

    decided_margin: float = 0.2  # reference top-two gap that makes a voxel "decided"
    min_decided_agreement: float = 0.995
    min_class_share: float = 0.005  # decided voxels a class needs for its Dice to count
    min_dice: float = 0.97


INT8_THRESHOLDS = Int8Thresholds()


def label_parity(label: str, reference: np.ndarray, candidate: np.ndarray,
                 classes: Sequence[str], thresholds: Int8Thresholds) -> dict[str, Any]:
    """The numbers of one output [N, K, ...]; GateFailed naming every limit missed."""
    if not np.isfinite(candidate).all():
        share = 1.0 - float(np.isfinite(candidate).mean())
        raise GateFailed(f"{label}: int8 gate failed: NaN/inf in {share:.2%} of the outputs",
                         numbers={"non_finite_share": share})
    ref, cand = reference.argmax(axis=1), candidate.argmax(axis=1)
    decided = top_two_margin(reference) >= thresholds.decided_margin
    n_decided = int(decided.sum())
    support = {name: int(np.count_nonzero(ref[decided] == k)) for k, name in enumerate(classes)}
    scored = [n for n in classes if support[n] and support[n] >= thresholds.min_class_share
              * n_decided]
    dice_decided = dice_per_class(ref[decided], cand[decided], classes)
    error = np.abs(candidate - reference).max(axis=1)
    numbers: dict[str, Any] = {
        "decided_share": n_decided / ref.size,
        "decided_agreement": float((ref[decided] == cand[decided]).mean()) if n_decided else 1.0,
        "dice": {n: dice_decided[n] for n in scored},
        "unscored_classes": [n for n in classes if n not in scored and support[n]],
        "argmax_agreement": float((ref == cand).mean()),
        "dice_all_voxels": dice_per_class(ref, cand, classes),
        "prob_error_p999": float(np.quantile(error, 0.999)),
        "prob_error_max": float(error.max()),
        "voxels": int(ref.size),
        "limits": asdict(thresholds),
    }
    missed = []
    if n_decided == 0:
        missed.append(f"no decided voxels (no reference top-two gap >= "
                      f"{thresholds.decided_margin})")
    if numbers["decided_agreement"] < thresholds.min_decided_agreement:
        missed.append(f"decided_agreement {numbers['decided_agreement']:.5f} < "
                      f"{thresholds.min_decided_agreement}")
    missed += [f"dice {n} {v:.4f} < {thresholds.min_dice}" for n, v in numbers["dice"].items()
               if v < thresholds.min_dice]
    if missed:
        raise GateFailed(f"{label}: int8 gate failed: {'; '.join(missed)}", numbers=numbers)
    return numbers


def int8_parity(label: str, reference: np.ndarray, candidate: np.ndarray,
                outputs: Sequence[str], classes: Sequence[str],
                thresholds: Int8Thresholds) -> dict[str, Any]:
    """`label_parity` of every output of joined runner results (`gates.join_outputs`);
    `probs`'s numbers at the top level, the others' under "branch_outputs"."""
    if candidate.shape != reference.shape:
        raise GateFailed(f"{label}: int8 gate failed: output shape {candidate.shape} differs "
                         f"from the reference's {reference.shape}")
    ref, cand = split_outputs(reference, outputs), split_outputs(candidate, outputs)
    numbers = {name: label_parity(label if name == GRAPH_OUTPUT else f"{label} {name}",
                                  ref[name], cand[name], classes, thresholds)
               for name in outputs}
    gate = numbers.pop(GRAPH_OUTPUT)
    if numbers:
        gate["branch_outputs"] = numbers
    return gate
