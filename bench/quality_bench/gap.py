"""How much of the labelled-data gap an arm closes, with an interval a reader can trust.

The gap is what supervised fusion gains from the lowest to the highest labelled ratio; an
arm's closure is its gain over fusion at the lowest ratio as a share of that gap:

    closure = (arm@low - fusion@low) / (fusion@high - fusion@low)

on mean foreground Dice per test case, averaged over seeds and cases, per single-modality
mode. The interval is a paired bootstrap: every resample draws the test cases once for all
arms (they are scored on the same cases) and draws seeds with replacement at each ratio,
keeping an arm's seed paired with fusion's seed at the lowest ratio.

The misalignment sweep gets the same kind of interval on CMC's gain over fusion at each
offset (`sweep_gain`): both arms train on one paired study per offset with the same seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from quality_bench.plan import BASELINE, CMC, mode_names

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


def _matrix(records: Sequence[dict[str, Any]], part: str, arm: str, point: tuple[str, float],
            mode: str, case_ids: Sequence[str]) -> np.ndarray:
    """[seeds, cases] of per-case scores of `arm`'s runs in `part` at `point` (the field that
    names a ratio or an offset, and its value), seeds in ascending order."""
    field, value = point
    rows = sorted((r for r in records if r["part"] == part and r["arm"] == arm
                   and r[field] == value and mode in r["test"]
                   and r["test"][mode].get("num_cases")), key=lambda r: r["seed"])
    return np.array([[case_scores(r, mode)[c] for c in case_ids] for r in rows],
                    dtype=np.float64).reshape(len(rows), len(case_ids))


def _case_ids(records: Sequence[dict[str, Any]], part: str, point: tuple[str, float],
              mode: str) -> list[str] | None:
    """The test cases fusion was scored on at `point`, the ones every arm is paired on."""
    field, value = point
    reference = next((r for r in records if r["part"] == part and r["arm"] == BASELINE
                      and r[field] == value and mode in r["test"]), None)
    if reference is None or not reference["test"][mode].get("num_cases"):
        return None
    return sorted(reference["test"][mode]["cases"])


def _bootstrap(estimate: Callable[..., tuple[float, ...]], sizes: Sequence[int],
               seed: int) -> list[Interval]:
    """Each estimate on every index and its percentile interval over RESAMPLES draws; a draw
    takes each axis (the seeds of one ratio, the test cases) with replacement, the same
    indices for every arm on that axis, which is what pairs them."""
    point = estimate(*(np.arange(n) for n in sizes))
    rng = np.random.default_rng(seed)
    draws = np.array([estimate(*(rng.integers(0, n, n) for n in sizes))
                      for _ in range(RESAMPLES)])
    tail = 100 * (1 - LEVEL) / 2
    return [Interval(float(value), *(float(q) for q in np.nanpercentile(draws[:, i],
                                                                        [tail, 100 - tail])))
            for i, value in enumerate(point)]


def gap_closure(records: Sequence[dict[str, Any]], arm: str, mode: str, modality: str,
                seed: int = 0) -> GapClosure | None:
    """The arm's closure of fusion's gap on `mode`, or None when a ratio end is missing."""
    ratios = sorted({r["ratio"] for r in records if r["part"] == "ratio"})
    if len(ratios) < 2:
        return None
    low, high = ratios[0], ratios[-1]
    case_ids = _case_ids(records, "ratio", ("ratio", low), mode)
    if case_ids is None:
        return None
    f_low = _matrix(records, "ratio", BASELINE, ("ratio", low), mode, case_ids)
    f_high = _matrix(records, "ratio", BASELINE, ("ratio", high), mode, case_ids)
    a_low = _matrix(records, "ratio", arm, ("ratio", low), mode, case_ids)
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

    fusion_gap, gain, closure = _bootstrap(estimates, (paired, len(f_high), len(case_ids)), seed)
    per_seed = tuple(float(np.nanmean(f_high[min(s, len(f_high) - 1)]) - np.nanmean(f_low[s]))
                     for s in range(paired))
    return GapClosure(arm, modality, low, high, paired, len(f_high), len(case_ids),
                      fusion_gap, gain, closure, per_seed)


@dataclass(frozen=True)
class SweepGain:
    """CMC against supervised fusion at one misalignment offset, on one mode."""

    offset_mm: float
    modality: str
    seeds: int
    cases: int
    fusion: float
    cmc: float
    gain: Interval
    gain_per_seed: tuple[float, ...]


def sweep_gain(records: Sequence[dict[str, Any]], offset_mm: float, mode: str, modality: str,
               seed: int = 0) -> SweepGain | None:
    """CMC - fusion at `offset_mm` on `mode`, paired over seeds and test cases (both arms
    train on the same data with the same seeds), or None when either arm is missing."""
    point = ("offset_mm", offset_mm)
    case_ids = _case_ids(records, "sweep", point, mode)
    if case_ids is None:
        return None
    fusion = _matrix(records, "sweep", BASELINE, point, mode, case_ids)
    cmc = _matrix(records, "sweep", CMC, point, mode, case_ids)
    paired = min(len(fusion), len(cmc))
    if not paired:
        return None
    fusion, cmc = fusion[:paired], cmc[:paired]

    def estimate(seeds: np.ndarray, cases: np.ndarray) -> tuple[float]:
        return (np.nanmean(cmc[np.ix_(seeds, cases)]) - np.nanmean(fusion[np.ix_(seeds, cases)]),)

    (gain,) = _bootstrap(estimate, (paired, len(case_ids)), seed)
    per_seed = tuple(float(np.nanmean(cmc[s]) - np.nanmean(fusion[s])) for s in range(paired))
    return SweepGain(offset_mm, modality, paired, len(case_ids), float(np.nanmean(fusion)),
                     float(np.nanmean(cmc)), gain, per_seed)


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


def sweep_table(records: Sequence[dict[str, Any]],
                modalities: Sequence[str]) -> tuple[str, list[SweepGain]]:
    """Markdown table of CMC's gain over fusion at every sweep offset and mode ("" when no
    sweep ran), and the rows."""
    offsets = sorted({r["offset_mm"] for r in records if r["part"] == "sweep"})
    rows = [g for offset in offsets for mode, modality in mode_names(modalities).items()
            if (g := sweep_gain(records, offset, mode, modality)) is not None]
    if not rows:
        return "", []
    lines = ["| offset mm | modality | seeds | test cases | fusion | CMC | CMC - fusion | "
             "per seed | CMC ahead in |", "|---|---|---|---|---|---|---|---|---|"]
    for g in rows:
        ahead = sum(v > 0 for v in g.gain_per_seed)
        per_seed = ", ".join(f"{v:+.3f}" for v in g.gain_per_seed)
        lines.append(f"| {g.offset_mm:g} | {g.modality} | {g.seeds} | {g.cases} | "
                     f"{g.fusion:.3f} | {g.cmc:.3f} | {g.gain.text()} | {per_seed} | "
                     f"{ahead} of {g.seeds} seeds |")
    return "\n".join(lines), rows
