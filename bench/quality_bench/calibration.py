"""How long a run takes here: a few timed steps and one scored split, and the steps that
fit the benchmark's wall-time budget."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cmc_train.config import RunConfig
from cmc_train.evaluate import evaluate
from cmc_train.run_state import LAST, iter_metrics
from cmc_train.trainer import train
from quality_bench.plan import ARMS, BASELINE, CMC, CONVERGED_STEPS, Job, Scale
from quality_bench.runs import Recipe


@dataclass(frozen=True)
class Timing:
    """Measured costs: seconds per step without / with the unlabelled batch, per scored case."""

    step_labelled_s: float
    step_unlabelled_s: float
    eval_case_s: float


def calibrate(datalist: Path, base: RunConfig, train_options: dict[str, Any],
              calib_steps: int = 4) -> Timing:
    """Time a few steps of `fusion` and `cmc` (the first, which loads the data, left out)
    and one validation-split evaluation."""
    per_step = []
    recipe = Recipe(base, train_options, steps=1000)  # the schedule of a long run
    with tempfile.TemporaryDirectory() as tmp:
        for key in (BASELINE, CMC):
            train(datalist, Path(tmp) / key, recipe.run_config(ARMS[key][0], seed=0),
                  progress=False, stop_after=calib_steps)
            seconds = [r["seconds"] for r in iter_metrics(Path(tmp) / key) if r["kind"] == "train"]
            per_step.append((seconds[-1] - seconds[0]) / (len(seconds) - 1))
        started = time.perf_counter()
        result = evaluate(Path(tmp) / CMC / LAST, datalist, "validation", ("a", "b", "fused"),
                          torch.device("cpu"))
        cases = sum(mode["num_cases"] for mode in result["modes"].values())
        eval_case = (time.perf_counter() - started) / max(1, cases)
    return Timing(per_step[0], per_step[1], eval_case)


def estimate_seconds(jobs: Sequence[Job], steps: int, timing: Timing, scale: Scale,
                     parallel: int = 1) -> float:
    """Training plus the final validation and the test evaluation of every job, `parallel` of
    them at a time (`timing` measured at the threads each one gets)."""
    total = 0.0
    for job in jobs:
        per_step = timing.step_unlabelled_s if job.arm.uses_unlabelled else timing.step_labelled_s
        eval_cases = scale.val_cases * len(job.modes[:2]) + scale.test_cases * len(job.modes)
        total += steps * per_step + eval_cases * timing.eval_case_s
    return total / parallel


def steps_for_budget(jobs: Sequence[Job], timing: Timing, scale: Scale, budget_s: float,
                     parallel: int = 1) -> int:
    """The most steps (a multiple of 10, at least 20) whose estimate fits `budget_s`."""
    fixed = estimate_seconds(jobs, 0, timing, scale, parallel)
    per_step = estimate_seconds(jobs, 1, timing, scale, parallel) - fixed
    return max(20, int((budget_s - fixed) / per_step) // 10 * 10)


def under_converged(steps: int, difficulty: str | None) -> str | None:
    """Why `steps` are too few for the generated study of `difficulty` (None: a user's
    datalists, whose convergence only `bench/learning_curve.py` can tell), or None."""
    converged = CONVERGED_STEPS.get(difficulty or "")
    if converged is None or steps >= converged:
        return None
    return (f"{steps} steps are fewer than the {converged} that supervised fusion needs to "
            f"converge on the {difficulty} study: the 10 % -> 100 % gap would measure the step "
            f"budget, not the labels; pass --steps {converged} with fewer --arms or --offsets ''")
