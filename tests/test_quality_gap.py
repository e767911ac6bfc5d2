"""The benchmark's gap closure: the share of supervised fusion's 10 % -> 100 % gap an arm
closes, and its paired bootstrap interval, on records shaped like bench/quality.py's."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from learning_curve import report
from quality_bench.gap import closure_table, gap_closure, sweep_table

CASES = [f"case_{i}" for i in range(8)]


def record(arm: str, ratio: int, seed: int, per_case: list[float]) -> dict[str, Any]:
    """A scored run whose CT test cases have these mean foreground Dice (two classes each,
    the second NaN where the class is absent: it must not count)."""
    cases = {c: {"dice": {"organ": v, "absent": None}} for c, v in zip(CASES, per_case,
                                                                      strict=True)}
    return {"part": "ratio", "arm": arm, "ratio": ratio, "seed": seed,
            "test": {"a": {"num_cases": len(cases), "cases": cases}}}


def study(noise: float, cmc_gain: float, gap: float = 0.2) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    case_level = rng.uniform(0.4, 0.6, len(CASES))  # hard and easy cases, shared by all arms

    def scores(offset: float) -> list[float]:
        return list(case_level + offset + rng.normal(0, noise, len(CASES)))

    return ([record("fusion", 10, s, scores(0.0)) for s in range(3)]
            + [record("fusion", 100, s, scores(gap)) for s in range(3)]
            + [record("cmc", 10, s, scores(cmc_gain)) for s in range(3)])


def test_closure_is_the_gain_over_the_gap_with_a_tight_interval_without_noise() -> None:
    closure = gap_closure(study(noise=0.0, cmc_gain=0.13), "cmc", "a", "ct")
    assert closure is not None
    assert closure.fusion_gap.value == pytest.approx(0.2)
    assert closure.gain.value == pytest.approx(0.13)
    assert closure.closure.value == pytest.approx(0.65)
    # Case-level differences are shared by every arm (paired), so they cancel exactly.
    assert closure.closure.low == pytest.approx(0.65) and closure.closure.high == pytest.approx(0.65)
    assert closure.fusion_gap_per_seed == pytest.approx((0.2, 0.2, 0.2))
    assert (closure.seeds_low, closure.seeds_high, closure.cases) == (3, 3, 8)


def test_noise_widens_the_interval_around_the_estimate() -> None:
    closure = gap_closure(study(noise=0.05, cmc_gain=0.1), "cmc", "a", "ct")
    assert closure is not None
    assert closure.closure.low < closure.closure.value < closure.closure.high
    assert closure.closure.high - closure.closure.low > 0.1
    assert closure.closure.low < 0.5 < closure.closure.high


def test_table_names_each_arm_and_needs_two_ratios() -> None:
    text, rows = closure_table(study(noise=0.0, cmc_gain=0.1), ["fusion", "cmc"], ["ct", "mr"])
    assert [(g.arm, g.modality) for g in rows] == [("cmc", "ct")]  # MR was not scored
    assert "| cmc | ct | 3/3 | 8 |" in text and "**50 %** [50, 50]" in text
    text, rows = closure_table(study(noise=0.05, cmc_gain=0.1, gap=0.0), ["cmc"], ["ct", "mr"])
    assert rows[0].fusion_gap.low <= 0 and "undefined: fusion's gap interval reaches 0" in text
    only_low = [r for r in study(0.0, 0.1) if r["ratio"] == 10]
    assert closure_table(only_low, ["cmc"], ["ct", "mr"])[1] == []


def sweep(noise: float, cmc_gain: float) -> list[dict[str, Any]]:
    """A sweep at 0 and 20 mm: CMC level with fusion at 0 mm, `cmc_gain` ahead at 20 mm."""
    rng = np.random.default_rng(1)
    case_level = rng.uniform(0.4, 0.6, len(CASES))
    rows = []
    for offset, gain in ((0.0, 0.0), (20.0, cmc_gain)):
        for arm, level in (("fusion", 0.0), ("cmc", gain)):
            for seed in range(3):
                scores = case_level + level + rng.normal(0, noise, len(CASES))
                rows.append({**record(arm, 10, seed, list(scores)), "part": "sweep",
                             "offset_mm": offset})
    return rows


def test_sweep_gain_is_paired_over_seeds_and_cases() -> None:
    text, rows = sweep_table(sweep(noise=0.0, cmc_gain=0.04), ["ct", "mr"])
    assert [(g.offset_mm, g.modality) for g in rows] == [(0.0, "ct"), (20.0, "ct")]
    level, ahead = rows
    assert level.gain.value == pytest.approx(0.0) and ahead.gain.value == pytest.approx(0.04)
    # The cases' shared difficulty cancels: without noise the interval is the point.
    assert ahead.gain.low == pytest.approx(0.04) and ahead.gain.high == pytest.approx(0.04)
    assert ahead.gain_per_seed == pytest.approx((0.04, 0.04, 0.04))
    assert "| 20 | ct | 3 | 8 |" in text and "3 of 3 seeds |" in text
    noisy = sweep_table(sweep(noise=0.05, cmc_gain=0.04), ["ct", "mr"])[1][1]
    assert noisy.gain.low < noisy.gain.value < noisy.gain.high
    fusion_only = [r for r in sweep(0.0, 0.04) if r["arm"] == "fusion"]
    assert sweep_table(fusion_only, ["ct", "mr"]) == ("", [])


def test_learning_curve_table_gives_each_step_count_its_gap() -> None:
    rows = [{"steps": steps, "ratio": ratio, "modality": modality, "mean_fg_dice": dice}
            for steps, ratio, modality, dice in [
                (250, 10, "ct", 0.40), (250, 100, "ct", 0.45), (250, 10, "mr", 0.5),
                (250, 100, "mr", 0.5), (1000, 10, "ct", 0.42), (1000, 100, "ct", 0.60),
                (1000, 10, "mr", 0.52), (1000, 100, "mr", 0.61)]]
    text = report(rows, (10, 100), ("ct", "mr"), "learning_curve.py --steps 250,1000")
    assert "| steps | ct 10 % | ct 100 % | mr 10 % | mr 100 % | ct gap | mr gap |" in text
    assert "| 250 | 0.400 | 0.450 | 0.500 | 0.500 | +0.050 | +0.000 |" in text
    assert "| 1000 | 0.420 | 0.600 | 0.520 | 0.610 | +0.180 | +0.090 |" in text
    # One ratio (e.g. the slow-converging 100 % alone): its columns once, no gap.
    high = [row for row in rows if row["ratio"] == 100]
    text = report(high, (100,), ("ct", "mr"), "learning_curve.py --ratios 100")
    assert "| steps | ct 100 % | mr 100 % |\n|---|---|---|" in text
    assert "| 1000 | 0.600 | 0.610 |" in text
