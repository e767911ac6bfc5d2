"""The benchmark's results: Dice statistics over seeds, results.md, quality.png and the
list of points where CMC does not beat supervised fusion."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from quality_bench.floors import REFERENCE_ARMS, below_floor
from quality_bench.gap import GapClosure, SweepGain, closure_table, sweep_table
from quality_bench.plan import BASELINE, CMC, DataInfo, mode_names

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0, int(arr.size)


def _fmt(stat: tuple[float, float, int]) -> str:
    mean, std, n = stat
    return f"{mean:.3f} +- {std:.3f}" if n > 1 else f"{mean:.3f}"


def summarise(records: Sequence[dict[str, Any]], part: str,
              info: DataInfo) -> dict[tuple[float, str, str], dict[str, Any]]:
    """(ratio or offset, arm, modality or "a+b" for the fused prediction) -> per-class and
    mean Dice stats over seeds."""
    names = mode_names(info.modalities)
    key_field = "ratio" if part == "ratio" else "offset_mm"
    groups: dict[tuple[float, str, str], list[dict[str, Any]]] = {}
    for rec in records:
        if rec["part"] != part:
            continue
        for mode, scored in rec["test"].items():
            if scored.get("num_cases"):
                groups.setdefault((rec[key_field], rec["arm"], names[mode]),
                                  []).append(scored)
    classes = info.classes[1:]
    return {key: {"classes": {c: _stats([s["dice"][c] for s in scored]) for c in classes},
                  "mean": _stats([s["mean_fg_dice"] for s in scored])}
            for key, scored in sorted(groups.items())}


def markdown_table(summary: dict[tuple[float, str, str], dict[str, Any]], first: str,
                   classes: Sequence[str]) -> str:
    """One row per (ratio or offset, arm, modality): Dice per class (background excluded)
    and the foreground mean."""
    classes = classes[1:]
    lines = [f"| {first} | arm | modality | n | " + " | ".join(classes) + " | mean |",
             "|" + "---|" * (len(classes) + 5)]
    for (point, arm, modality), stats in summary.items():
        cells = [_fmt(stats["classes"][c]) for c in classes]
        lines.append(f"| {point:g} | {arm} | {modality} | {stats['mean'][2]} | "
                     + " | ".join(cells) + f" | **{_fmt(stats['mean'])}** |")
    return "\n".join(lines)


def cmc_shortfalls(summary: dict[tuple[float, str, str], dict[str, Any]], what: str) -> list[str]:
    """Every (point, modality) where CMC's mean Dice is not above the fusion baseline's."""
    lines = []
    for (point, arm, modality), stats in summary.items():
        base = summary.get((point, BASELINE, modality))
        if arm != CMC or base is None:
            continue
        cmc_mean, base_mean = stats["mean"][0], base["mean"][0]
        if not cmc_mean > base_mean:
            lines.append(f"CMC does NOT beat supervised fusion at {what} {point:g} on {modality}: "
                         f"{cmc_mean:.3f} vs {base_mean:.3f}")
    return lines


def plot(ratio_sum: dict[tuple[float, str, str], dict[str, Any]],
         sweep_sum: dict[tuple[float, str, str], dict[str, Any]], modalities: Sequence[str],
         path: Path) -> None:
    """Labelled-ratio curves per modality (when more than one ratio was measured) and the
    misalignment sweep per modality and fused; one colour per arm in every panel; error
    bars = std."""
    several_ratios = len({point for point, _, _ in ratio_sum}) > 1
    panels = [(m, ratio_sum, "labelled ratio (%)") for m in modalities
              if several_ratios or not sweep_sum]
    if sweep_sum:
        panels += [(m, sweep_sum, f"rigid {'-'.join(modalities)} offset (mm), sweep")
                   for m in (*modalities, "+".join(modalities))]
    arms = dict.fromkeys(arm for summary in (ratio_sum, sweep_sum) for _, arm, _ in summary)
    colour = {arm: f"C{i}" for i, arm in enumerate(arms)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (modality, summary, xlabel) in zip(axes[0], panels, strict=True):
        for arm in arms:
            pts = sorted((p, s["mean"]) for (p, a, m), s in summary.items()
                         if a == arm and m == modality)
            if pts:
                ax.errorbar([p for p, _ in pts], [s[0] for _, s in pts],
                            yerr=[s[1] for _, s in pts], marker="o", capsize=3, label=arm,
                            color=colour[arm])
        ax.set(title=f"test Dice, {modality}", xlabel=xlabel, ylabel="mean foreground Dice")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dice_rows(records: Sequence[dict[str, Any]], info: DataInfo) -> list[dict[str, Any]]:
    """One row per trained run and scored mode: arm, ratio, offset, seed, mode, modality,
    per-class test Dice and the foreground mean (quality_results.json, for readers who
    recompute the tables or their own statistics)."""
    names = mode_names(info.modalities)
    return [{"part": rec["part"], "arm": rec["arm"], "ratio": rec["ratio"],
             "offset_mm": rec["offset_mm"], "seed": rec["seed"], "mode": mode,
             "modality": names[mode], "dice": dict(scored["dice"]),
             "mean_fg_dice": scored["mean_fg_dice"], "cases": scored["num_cases"]}
            for rec in records for mode, scored in sorted(rec["test"].items())
            if scored.get("num_cases")]


@dataclass(frozen=True)
class Report:
    """What the benchmark found, as written to results.md and results.json."""

    text: str
    cmc_shortfalls: list[str]
    gap_closures: list[GapClosure]
    sweep_gains: list[SweepGain]


def report(records: Sequence[dict[str, Any]], out: Path, header: str, info: DataInfo,
           data_kind: str) -> Report:
    """Write results.md, quality_results.json (`dice_rows`) and quality.png; return what
    they say."""
    ratio_sum = summarise(records, "ratio", info)
    sweep_sum = summarise(records, "sweep", info)
    shortfalls = cmc_shortfalls(ratio_sum, "labelled ratio (%)") \
        + cmc_shortfalls(sweep_sum, "offset (mm)")
    verdict = shortfalls or ["CMC beats supervised fusion at every point measured."]
    sections = [header, f"## Labelled ratio ({data_kind}, test split, Dice)",
                markdown_table(ratio_sum, "%", info.classes)]
    sweep_md, sweep_gains = sweep_table(records, info.modalities)
    if sweep_sum:
        sections += ["## Misalignment sweep (paired, lowest ratio, test split, Dice)",
                     markdown_table(sweep_sum, "offset mm", info.classes),
                     "CMC's gain over supervised fusion per offset, mean foreground Dice per "
                     "test case; [95 % paired bootstrap interval over seeds and test cases] "
                     "(`quality_bench.gap`).",
                     sweep_md]
    arms = list(dict.fromkeys(rec["arm"] for rec in records
                              if rec["part"] == "ratio" and rec["arm"] not in REFERENCE_ARMS))
    closures_md, closures = closure_table(records, arms, info.modalities)
    sections += ["## Share of fusion's labelled-data gap each arm closes at the lowest ratio",
                 "(arm - fusion at the lowest ratio) / (fusion at the highest - fusion at the "
                 "lowest), mean foreground Dice per test case; [95 % paired bootstrap interval "
                 "over seeds and test cases] (`quality_bench.gap`).",
                 closures_md]
    sections += ["## Where CMC does not beat supervised fusion",
                 "\n".join(f"- {v}" for v in verdict)]
    floor_misses = below_floor(ratio_sum)
    sections += ["## Trained arms that do not beat the floor (thresholds, atlas)",
                 "\n".join(f"- {v}" for v in floor_misses)
                 or "Every trained arm beats both reference arms at every ratio."]
    text = "\n\n".join(sections) + "\n"
    (out / "results.md").write_text(text)
    (out / "quality_results.json").write_text(
        json.dumps(dice_rows(records, info), indent=1, default=_nan_free) + "\n")
    plot(ratio_sum, sweep_sum, info.modalities, out / "quality.png")
    return Report(text, shortfalls, closures, sweep_gains)


def _nan_free(value: Any) -> Any:
    """json.dumps fallback for numpy scalars (NaN is already None in evaluate's output)."""
    if isinstance(value, np.generic):
        item = value.item()
        return None if isinstance(item, float) and math.isnan(item) else item
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
