"""How much of the labelled-data gap an arm closes, with an interval a reader can trust.

The gap is what supervised fusion gains from the lowest to the highest labelled ratio; an
arm's closure is its gain over fusion at the lowest ratio as a share of that gap:

    closure = (arm@low - fusion@low) / (fusion@high - fusion@low)

on mean foreground Dice per test case, averaged over seeds and cases, per single-modality
mode. The interval is a paired bootstrap: every resample draws the test cases once for all
arms (they are scored on the same cases) and draws seeds with replacement at each ratio,
keeping an arm's seed paired with fusion's seed at the lowest ratio.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from quality_bench.plan import BASELINE

RESAMPLES = 4000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval."""

    value: float
    low: float
    high: float

    def text(self, digits: int = 3) -> str:
        return f"{self.value:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


@dataclass(frozen=True)
class GapClosure:
    """One arm on one modality: fusion's gap, the arm's gain and the share it closes."""

    arm: str
    modality: str
    low_ratio: int
    high_ratio: int
    seeds_low: int
    seeds_high: int
    cases: int
    fusion_gap: Interval
    gain: Interval
    closure: Interval
    fusion_gap_per_seed: tuple[float, ...]


def case_scores(record: dict[str, Any], mode: str) -> dict[str, float]:
    """Test case id -> mean foreground Dice of that case (classes absent from both the
    reference and the prediction, scored NaN, are left out of the mean)."""
    cases = record["test"][mode]["cases"]
    out = {}
    for case_id, scores in cases.items():
        values = [v for v in scores["dice"].values() if v is not None and v == v]
        out[case_id] = float(np.mean(values)) if values else float("nan")
    return out


def _matrix(records: Sequence[dict[str, Any]], arm: str, ratio: int, mode: str,
            case_ids: Sequence[str]) -> np.ndarray:
    """[seeds, cases] of per-case scores, seeds in ascending order."""
    rows = sorted((r for r in records if r["part"] == "ratio" and r["arm"] == arm
                   and r["ratio"] == ratio and mode in r["test"]
                   and r["test"][mode].get("num_cases")), key=lambda r: r["seed"])
    return np.array([[case_scores(r, mode)[c] for c in case_ids] for r in rows],
                    dtype=np.float64).reshape(len(rows), len(case_ids))


def gap_closure(records: Sequence[dict[str, Any]], arm: str, mode: str, modality: str,
                seed: int = 0) -> GapClosure | None:
    """The arm's closure of fusion's gap on `mode`, or None when a ratio end is missing."""
    ratios = sorted({r["ratio"] for r in records if r["part"] == "ratio"})
    if len(ratios) < 2:
        return None
    low, high = ratios[0], ratios[-1]
    reference = next((r for r in records if r["part"] == "ratio" and r["arm"] == BASELINE
                      and r["ratio"] == low and mode in r["test"]), None)
    if reference is None or not reference["test"][mode].get("num_cases"):
        return None
    case_ids = sorted(reference["test"][mode]["cases"])
    f_low = _matrix(records, BASELINE, low, mode, case_ids)
    f_high = _matrix(records, BASELINE, high, mode, case_ids)
    a_low = _matrix(records, arm, low, mode, case_ids)
    if not (len(f_low) and len(f_high) and len(a_low)):
        return None
    paired = min(len(f_low), len(a_low))
    f_low, a_low = f_low[:paired], a_low[:paired]

    def estimates(low_seeds: np.ndarray, high_seeds: np.ndarray,
                  cases: np.ndarray) -> tuple[float, float, float]:
        fl = np.nanmean(f_low[np.ix_(low_seeds, cases)])
        al = np.nanmean(a_low[np.ix_(low_seeds, cases)])
        fh = np.nanmean(f_high[np.ix_(high_seeds, cases)])
        gap = fh - fl
        return gap, al - fl, (al - fl) / gap if gap != 0 else float("nan")

    n_cases = len(case_ids)
    point = estimates(np.arange(paired), np.arange(len(f_high)), np.arange(n_cases))
    rng = np.random.default_rng(seed)
    draws = np.array([estimates(rng.integers(0, paired, paired),
                                rng.integers(0, len(f_high), len(f_high)),
                                rng.integers(0, n_cases, n_cases))
                      for _ in range(RESAMPLES)])
    tail = 100 * (1 - LEVEL) / 2

    def interval(i: int) -> Interval:
        lo, hi = np.nanpercentile(draws[:, i], [tail, 100 - tail])
        return Interval(float(point[i]), float(lo), float(hi))

    per_seed = tuple(float(np.nanmean(f_high[min(s, len(f_high) - 1)]) - np.nanmean(f_low[s]))
                     for s in range(paired))
    return GapClosure(arm, modality, low, high, paired, len(f_high), n_cases,
                      interval(0), interval(1), interval(2), per_seed)


def _share(g: GapClosure) -> str:
    """The closure as a percentage, or why there is none: a share of a gap whose interval
    reaches zero is a ratio of noise to noise."""
    if g.fusion_gap.low <= 0:
        return "undefined: fusion's gap interval reaches 0"
    return (f"**{100 * g.closure.value:.0f} %** [{100 * g.closure.low:.0f}, "
            f"{100 * g.closure.high:.0f}]")


def closure_table(records: Sequence[dict[str, Any]], arms: Sequence[str],
                  modalities: Sequence[str]) -> tuple[str, list[GapClosure]]:
    """Markdown table of every arm's closure per single-modality mode, and the rows."""
    rows = [g for arm in arms if arm != BASELINE
            for mode, modality in zip(("a", "b"), modalities, strict=True)
            if (g := gap_closure(records, arm, mode, modality)) is not None]
    if not rows:
        return "Needs fusion and another arm at two labelled ratios.", []
    lines = ["| arm | modality | seeds low/high | test cases | fusion gap high-low | "
             "gain over fusion at low | share of the gap closed |",
             "|---|---|---|---|---|---|---|"]
    for g in rows:
        per_seed = ", ".join(f"{v:+.3f}" for v in g.fusion_gap_per_seed)
        lines.append(f"| {g.arm} | {g.modality} | {g.seeds_low}/{g.seeds_high} | {g.cases} | "
                     f"{g.fusion_gap.text()} (per seed {per_seed}) | {g.gain.text()} | "
                     f"{_share(g)} |")
    return "\n".join(lines), rows
