"""One benchmark run (train, then score the final checkpoint on the test split), the
worker processes that run them side by side, and the reuse of runs already scored."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cmc_train.config import RunConfig
from cmc_train.evaluate import evaluate
from cmc_train.run_state import CONFIG, LAST, file_sha256
from cmc_train.settings import SettingError, apply_settings, parse_settings
from cmc_train.trainer import train
from quality_bench.plan import Arm, BenchmarkError, Job, Study

TEST_METRICS = "test_metrics.json"
BEST = "checkpoint_best.pt"
PR_SET_PDEATHSIG = 1  # prctl(2) option: signal this process when its parent dies
# Run-config fields the benchmark sets itself (the arms and the budget); --train may not.
SET_BY_BENCHMARK = ("steps", "seed", "use_csc", "use_cac", "val_every", "warmup_steps")


@dataclass(frozen=True)
class Recipe:
    """What every run shares: the base run configuration (a preset sized to the data, or a
    YAML), the --train changes to it and the number of steps."""

    base: RunConfig
    train_options: dict[str, Any]
    steps: int

    def run_config(self, arm: Arm, seed: int) -> RunConfig:
        """The base with the --train changes, the arm's losses and the budget's schedule."""
        changed = apply_settings(self.base, self.train_options)
        train_cfg = dataclasses.replace(
            changed.train, steps=self.steps, seed=seed,
            use_csc=arm.use_csc, use_cac=arm.use_cac, val_every=self.steps,
            warmup_steps=max(1, min(30, self.steps // 10)))
        return dataclasses.replace(changed, train=train_cfg)


def parse_train_options(pairs: Sequence[str]) -> dict[str, Any]:
    """--train KEY=VALUE pairs (`cmc train --set`'s keys and parser, less the fields the
    benchmark sets itself) -> {"section.field": value} for every arm."""
    try:
        return parse_settings(pairs, fixed=SET_BY_BENCHMARK)
    except SettingError as exc:
        raise BenchmarkError(f"--train {exc}") from None


def scored_metrics(runs_dir: Path, job: Job) -> Path:
    """Where `job`'s test metrics are written once it is scored (and found on a resume)."""
    return runs_dir / job.name / TEST_METRICS


def run_job(job: Job, datalist: Path, runs_dir: Path, recipe: Recipe) -> dict[str, Any]:
    """Train (or finish an interrupted run), score the best checkpoint on the test split."""
    run_dir = runs_dir / job.name
    metrics_path = scored_metrics(runs_dir, job)
    data_sha256 = file_sha256(datalist)
    run_cfg = recipe.run_config(job.arm, job.seed)
    if metrics_path.is_file():
        record = json.loads(metrics_path.read_text())
        _check_same_run(record, run_dir, run_cfg, data_sha256)
        return record
    summary = train(datalist, run_dir, run_cfg, resume=(run_dir / LAST).is_file(),
                    progress=False, single_modality=job.arm.single_modality)
    started = time.perf_counter()
    result = evaluate(run_dir / BEST, datalist, "test", job.modes, torch.device("cpu"))
    record = {"name": job.name, "part": job.part, "study": job.study.name,
              "ratio": job.study.ratio, "offset_mm": job.study.offset_mm, "arm": job.arm.key,
              "single_modality": job.arm.single_modality, "seed": job.seed,
              "steps": recipe.steps, "train_options": recipe.train_options,
              "datalist_sha256": data_sha256,
              "best_step": summary.best_step, "val_mean_fg_dice": summary.best_metric,
              "train_seconds": summary.train_seconds,
              "eval_seconds": time.perf_counter() - started, "test": result["modes"]}
    metrics_path.write_text(json.dumps(record, indent=1))
    return record


def _check_same_run(record: dict[str, Any], run_dir: Path, run_cfg: RunConfig,
                    data_sha256: str) -> None:
    """A scored run is reused only if it was trained as this benchmark would train it: the
    same steps, the same run configuration (preset, --config, --train) and the same datalist
    (records from before --datalist carry no hash; their generated studies are checked by
    study.json)."""
    path = run_dir / TEST_METRICS
    if record["steps"] != run_cfg.train.steps:
        raise BenchmarkError(f"{path}: run was trained for {record['steps']} steps, this "
                             f"benchmark uses {run_cfg.train.steps}; pass --steps "
                             f"{record['steps']}")
    trained = RunConfig.load_yaml(run_dir / CONFIG)
    differing = [f"{section}.{key}" for section in ("model", "preprocess", "train")
                 for key, value in getattr(run_cfg, section).to_dict().items()
                 if getattr(trained, section).to_dict().get(key) != value]
    if differing or trained.preset != run_cfg.preset:
        raise BenchmarkError(f"{run_dir / CONFIG}: run was trained with other settings "
                             f"({', '.join(differing) or 'preset'}); use the same --config "
                             "and --train, or a fresh --out folder")
    if record.get("datalist_sha256", data_sha256) != data_sha256:
        raise BenchmarkError(f"{path}: run was trained on another version of its datalist; "
                             "use a fresh --out folder")


def run_all(jobs: Sequence[Job], datalists: dict[Study, Path], runs_dir: Path, recipe: Recipe,
            parallel: int, threads: int) -> list[dict[str, Any]]:
    """Every job's record, in plan order; `parallel` worker processes of `threads` torch
    threads each (spawned: a forked torch runtime is not safe to reuse)."""
    context = multiprocessing.get_context("spawn")
    started = time.perf_counter()
    records: dict[Job, dict[str, Any]] = {}
    with ProcessPoolExecutor(parallel, mp_context=context, initializer=_start_worker,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(run_job, job, datalists[job.study], runs_dir, recipe): job
                   for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                records[job] = future.result()
            except BaseException:
                pool.shutdown(cancel_futures=True)  # scored runs stay for --resume-from
                raise
            print(f"[{len(records)}/{len(jobs)}] {job.name} done at "
                  f"{(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return [records[job] for job in jobs]


def _start_worker(threads: int) -> None:
    """Set the worker's torch threads and, on Linux, have the kernel stop it when the
    benchmark process dies: an orphaned worker would go on training its queued runs into the
    same runs folder as a restarted benchmark."""
    torch.set_num_threads(threads)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:  # the parent died before prctl took effect
            sys.exit(1)
