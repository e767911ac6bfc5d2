"""The floor of every ratio table: reference arms that train nothing (`cmc_train.baselines`).

Multi-level intensity thresholds per modality and a majority-vote atlas, both fitted on the
labelled split of each ratio's study and scored on its test split like the trained arms. A
trained arm that does not beat them has learnt nothing a histogram or an average shape
would not give, and the report says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cmc_train.baselines import reference_arm
from cmc_train.config import PreprocessConfig
from quality_bench.plan import Study

REFERENCE_ARMS = ("thresholds", "atlas")


def floor_records(studies: Sequence[Study], datalists: Mapping[Study, Path],
                  preprocess: PreprocessConfig) -> list[dict[str, Any]]:
    """One record per ratio study and reference arm, shaped like a trained run's."""
    return [{"name": f"{study.name}_{arm}", "part": "ratio", "study": study.name,
             "ratio": study.ratio, "offset_mm": getattr(study, "offset_mm", 0.0), "arm": arm,
             "single_modality": None, "seed": 0,
             "test": reference_arm(arm, datalists[study], preprocess, "test")["modes"]}
            for study in studies for arm in REFERENCE_ARMS]


def below_floor(summary: Mapping[tuple[float, str, str], dict[str, Any]]) -> list[str]:
    """Every (ratio, trained arm, modality) whose mean Dice is not above the best floor."""
    lines = []
    for (point, arm, modality), stats in summary.items():
        floors = {f: summary[(point, f, modality)]["mean"][0] for f in REFERENCE_ARMS
                  if (point, f, modality) in summary}
        if arm in REFERENCE_ARMS or not floors:
            continue
        best = max(floors, key=lambda f: floors[f])
        if not stats["mean"][0] > floors[best]:
            lines.append(f"{arm} does NOT beat the {best} floor at labelled ratio {point:g} on "
                         f"{modality}: {stats['mean'][0]:.3f} vs {floors[best]:.3f}")
    return lines
