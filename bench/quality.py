"""Semi-supervised quality benchmark: does CMC beat plain supervised training?

    .venv/bin/python bench/quality.py [--quick] [--out bench/results/quality] [--steps N]
        [--seeds N] [--ratios 10,20,50,100] [--arms single,fusion,cmc,cmc-no-csc,cmc-no-cac]
        [--offsets 0,5,10,20] [--jobs 2] [--threads 1] [--train KEY=VALUE ...]
        [--resume-from FOLDER] [--config tiny|small|sam-med3d|RUN.yaml]
    .venv/bin/python bench/quality.py --datalist 10=amos10.json --datalist 100=amos100.json
        [--config small] [--seeds N] [--steps N] ...

Data (generated with `write_synthetic_study`, one study per labelled ratio, same seed so the
images are identical and only the labelled split changes): CT and MR of *different* subjects
(`unpaired=True`, as in AMOS), misaligned, with a fixed validation and test split.

Arms, all with the same steps and batch sizes (the budget), trained by
`cmc_train.trainer.train` and scored on the test split by `cmc_train.evaluate.evaluate` with
the final checkpoint (the LR decays to 0; the validation split is scored once, at the end, and
recorded: four validations per run cost as much as 60 training steps, 20 % of the budget):
  single      supervised, one modality (one branch, no fusion): two runs, one per modality
  fusion      supervised, both branches + fusion, no consistency losses
  cmc         CMC: CSC + CAC on the unlabelled data
  cmc-no-csc  CMC without CSC
  cmc-no-cac  CMC without CAC
A misalignment sweep at the lowest ratio trains `cmc` and `fusion` on *paired* studies whose
rigid offset between CT and MR is varied (rotation 0.75 deg per mm, no elastic field, so the
offset alone changes) and also scores the fused (CT + MR) prediction.

The lowest ratio and the sweep are repeated over `--seeds` training seeds (mean +- std); the
other ratios use the first seed. Without `--steps`, the steps are chosen from the steps/s
measured here so the whole benchmark fits the budget (15 min `--quick`, 3 h full); the
estimate is printed before training starts. Writes to the output folder: results.md (tables
and the plain list of where CMC does not beat `fusion`), quality.png, results.json (every raw
number, the command and the wall time), data/ (studies) and runs/ (one folder per training
run, holding test_metrics.json once scored, which `--resume-from` uses to skip it).

`--train KEY=VALUE` changes one setting of `--config` (a loss weight, the consistency
schedule, the CSC temperature, the spacing; the keys of `cmc train --set`) for every arm: the investigations behind the
defaults of `cmc train` run through this same benchmark. Each run's config.yaml records the
settings, and a resumed run must use the same ones.

Real data: `--datalist RATIO=PATH`, once per labelled ratio, replaces the generated studies
with yours, e.g. AMOS imported at 10 % and 100 % with one seed (`cmc import amos ROOT
--labelled-ratio 0.1 --out amos10.json`), so every ratio has the same training, validation
and test cases (checked by id) and only the labels differ. Classes and modalities come from
the datalists. The sweep is skipped: real pairs carry no known offset to vary.
`--config` picks the model preset (sized to the data) or a run config YAML, as for `cmc
train`.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import multiprocessing
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

from cmc_train.config import RunConfig, named_or_yaml_run_config
from cmc_train.data.datalist import Datalist, DatalistError
from cmc_train.evaluate import evaluate
from cmc_train.settings import SettingError, apply_settings, parse_settings
from cmc_train.synth import write_synthetic_study
from cmc_train.trainer import CONFIG, LAST, file_sha256, iter_metrics, train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

TEST_METRICS = "test_metrics.json"
BEST = "checkpoint_best.pt"
BASELINE, CMC = "fusion", "cmc"
ROTATION_PER_MM = 0.75  # sweep: 20 mm comes with 15 degrees
DATA_SEED = 0
PR_SET_PDEATHSIG = 1  # prctl(2) option: signal this process when its parent dies
# Run-config fields the benchmark sets itself (the arms and the budget); --train may not.
SET_BY_BENCHMARK = ("steps", "seed", "use_csc", "use_cac", "val_every", "warmup_steps")


class BenchmarkError(Exception):
    """The benchmark cannot run as asked (the message names the folder or option)."""


@dataclass(frozen=True)
class Arm:
    """One training recipe; `single_modality` set means one branch on its own labels only."""

    key: str
    title: str
    use_csc: bool = False
    use_cac: bool = False
    single_modality: str | None = None

    @property
    def uses_unlabelled(self) -> bool:
        return self.use_csc or self.use_cac


ARMS: dict[str, tuple[Arm, ...]] = {
    "single": (Arm("single", "supervised, single modality", single_modality="a"),
               Arm("single", "supervised, single modality", single_modality="b")),
    "fusion": (Arm("fusion", "supervised, both branches + fusion"),),
    "cmc": (Arm("cmc", "CMC (CSC + CAC)", use_csc=True, use_cac=True),),
    "cmc-no-csc": (Arm("cmc-no-csc", "CMC without CSC", use_cac=True),),
    "cmc-no-cac": (Arm("cmc-no-cac", "CMC without CAC", use_csc=True),),
}


@dataclass(frozen=True)
class Scale:
    """How big the benchmark is: data, seeds, sweep and the wall-time budget it must fit."""

    cases: int
    val_cases: int
    test_cases: int
    size: int
    ratios: tuple[int, ...]
    offsets: tuple[float, ...]
    seeds: int
    budget_s: float


FULL = Scale(cases=40, val_cases=6, test_cases=10, size=48, ratios=(10, 20, 50, 100),
             offsets=(0.0, 5.0, 10.0, 20.0), seeds=3, budget_s=3 * 3600)
QUICK = Scale(cases=20, val_cases=2, test_cases=4, size=40, ratios=(10, 100),
              offsets=(0.0, 20.0), seeds=1, budget_s=15 * 60)


@dataclass(frozen=True)
class SyntheticStudy:
    """One generated data set: a labelled ratio of the AMOS-like study, or a sweep point."""

    name: str
    ratio: int
    unpaired: bool
    offset_mm: float
    rotation_deg: float
    elastic_mm: float

    def spec(self, scale: Scale) -> dict[str, Any]:
        """Everything `write_synthetic_study` is given (recorded to refuse stale reuse)."""
        return {"cases": scale.cases, "seed": DATA_SEED, "size": scale.size,
                "labelled_ratio": self.ratio / 100, "val_cases": scale.val_cases,
                "test_cases": scale.test_cases, "unpaired": self.unpaired,
                "offset_mm": self.offset_mm, "rotation_deg": self.rotation_deg,
                "elastic_mm": self.elastic_mm}

    def datalist(self, scale: Scale, data_dir: Path) -> Path:
        """Generate the study once; reuse an existing one only if made with the same spec."""
        folder = data_dir / self.name
        spec_path = folder / "study.json"
        spec = self.spec(scale)
        if spec_path.is_file():
            if json.loads(spec_path.read_text()) != spec:
                raise BenchmarkError(f"{spec_path}: existing study was generated with other "
                                     "settings; use a fresh --out folder")
            return folder / "datalist.json"
        datalist = write_synthetic_study(folder, **spec)
        spec_path.write_text(json.dumps(spec, indent=1))
        return datalist


@dataclass(frozen=True)
class DatalistStudy:
    """A user's datalist at one labelled ratio (e.g. `cmc import amos --labelled-ratio`),
    used as it is: no misalignment is known, so it joins the ratio table only. `loaded` is
    the datalist as validated once by `parse_datalists` (loading re-checks every file)."""

    ratio: int
    path: Path
    loaded: Datalist = field(compare=False, repr=False)
    offset_mm: None = None

    @property
    def name(self) -> str:
        return f"ratio{self.ratio}"

    def datalist(self, scale: Scale, data_dir: Path) -> Path:
        return self.path


Study = SyntheticStudy | DatalistStudy


@dataclass(frozen=True)
class Job:
    """One training run followed by its test-split evaluation."""

    study: Study
    arm: Arm
    seed: int
    part: str  # "ratio" | "sweep"

    @property
    def name(self) -> str:
        arm = self.arm.key + (f"-{self.arm.single_modality}" if self.arm.single_modality else "")
        return f"{self.part}_{self.study.name}_{arm}_seed{self.seed}"

    @property
    def modes(self) -> tuple[str, ...]:
        if self.arm.single_modality is not None:
            return (self.arm.single_modality,)
        return ("a", "b", "fused") if self.part == "sweep" else ("a", "b")


def ratio_study(ratio: int) -> SyntheticStudy:
    """AMOS-like: CT and MR of different subjects, the synthetic study's default motion."""
    return SyntheticStudy(f"ratio{ratio}", ratio, unpaired=True, offset_mm=10.0,
                          rotation_deg=5.0, elastic_mm=2.0)


def sweep_study(ratio: int, offset_mm: float) -> SyntheticStudy:
    """Paired subjects; only the rigid CT-MR offset (and its rotation) varies."""
    return SyntheticStudy(f"offset{offset_mm:g}mm", ratio, unpaired=False, offset_mm=offset_mm,
                          rotation_deg=ROTATION_PER_MM * offset_mm, elastic_mm=0.0)


def plan(ratio_studies: Sequence[Study], sweep_studies: Sequence[Study], seeds: int,
         arm_keys: Sequence[str]) -> list[Job]:
    """All runs: every arm at every ratio, then the sweep (CMC vs fusion); the lowest ratio
    and the sweep repeat over `seeds`."""
    low = min(study.ratio for study in ratio_studies)
    jobs = []
    for study in ratio_studies:
        for seed in range(seeds if study.ratio == low else 1):
            for key in arm_keys:
                jobs += [Job(study, arm, seed, "ratio") for arm in ARMS[key]]
    for study in sweep_studies:
        for seed in range(seeds):
            for key in (BASELINE, CMC):
                jobs += [Job(study, arm, seed, "sweep") for arm in ARMS[key]]
    return jobs


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


@dataclass(frozen=True)
class DataInfo:
    """What the runs share: the data's classes and modalities and the run configuration
    (preset or YAML) that every arm starts from."""

    classes: tuple[str, ...]
    modalities: tuple[str, str]
    base: RunConfig


def parse_datalists(pairs: Sequence[str]) -> list[DatalistStudy]:
    """--datalist RATIO=PATH pairs -> studies, checked to be comparable: the same classes,
    modalities, validation and test cases in every one (only the labelled split may differ),
    so that the ratio curve varies the labels alone."""
    studies: dict[int, DatalistStudy] = {}
    reference: tuple[Path, Datalist] | None = None
    for pair in pairs:
        text, sep, path = pair.partition("=")
        try:
            ratio = int(text)
        except ValueError:
            ratio = 0
        if not sep or not path or not 0 < ratio <= 100:
            raise BenchmarkError(f"--datalist {pair}: expected RATIO=PATH with RATIO a whole "
                                 "percentage in (0, 100]")
        if ratio in studies:
            raise BenchmarkError(f"--datalist {pair}: ratio {ratio} given twice")
        try:
            datalist = Datalist.load(path)
        except DatalistError as exc:
            raise BenchmarkError(str(exc)) from None
        if not datalist.labelled or not datalist.test:
            raise BenchmarkError(f"{path}: needs labelled and test cases")
        share = 100 * len(datalist.labelled) / (len(datalist.labelled) + len(datalist.unlabelled))
        if abs(share - ratio) > 5:
            print(f"warning: {path}: {share:.0f} % of the training cases are labelled, given "
                  f"as {ratio} %", flush=True)
        if reference is not None:
            _check_comparable(reference, (Path(path), datalist))
        reference = reference or (Path(path), datalist)
        studies[ratio] = DatalistStudy(ratio, Path(path).resolve(), datalist)
    return [studies[ratio] for ratio in sorted(studies)]


def _check_comparable(first: tuple[Path, Datalist], other: tuple[Path, Datalist]) -> None:
    """Refuse datalists that differ in more than their labelled / unlabelled split."""
    (path_a, a), (path_b, b) = first, other
    for what in ("modalities", "classes"):
        if getattr(a, what) != getattr(b, what):
            raise BenchmarkError(f"{path_b}: {what} {list(getattr(b, what))} differ from "
                                 f"{path_a}'s {list(getattr(a, what))}")
    for split in ("validation", "test"):
        if {e.id for e in a.split(split)} != {e.id for e in b.split(split)}:
            raise BenchmarkError(f"{path_b}: {split} cases differ from {path_a}'s; the ratios "
                                 "must be scored on the same cases (cmc import with one --seed)")
    if {e.id for e in (*a.labelled, *a.unlabelled)} != {e.id for e in (*b.labelled,
                                                                       *b.unlabelled)}:
        raise BenchmarkError(f"{path_b}: training cases differ from {path_a}'s; only the "
                             "labelled split may change between ratios")


def data_info(loaded: Datalist, datalist: Path, config: str) -> DataInfo:
    """Classes and modalities of `loaded` (read from `datalist`) and the run configuration
    `config` sizes to them."""
    try:
        base = named_or_yaml_run_config(config, len(loaded.classes), loaded.modalities)
    except ValueError as exc:
        raise BenchmarkError(str(exc)) from None
    if base.model.num_classes != len(loaded.classes) \
            or tuple(base.preprocess.modalities) != loaded.modalities:
        raise BenchmarkError(f"--config {config}: {base.model.num_classes} classes and "
                             f"modalities {list(base.preprocess.modalities)}, but {datalist} "
                             f"has {len(loaded.classes)} and {list(loaded.modalities)}")
    return DataInfo(loaded.classes, loaded.modalities, base)


def parse_train_options(pairs: Sequence[str]) -> dict[str, Any]:
    """--train KEY=VALUE pairs (`cmc train --set`'s keys and parser, less the fields the
    benchmark sets itself) -> {"section.field": value} for every arm."""
    try:
        return parse_settings(pairs, fixed=SET_BY_BENCHMARK)
    except SettingError as exc:
        raise BenchmarkError(f"--train {exc}") from None


def run_job(job: Job, datalist: Path, runs_dir: Path, recipe: Recipe) -> dict[str, Any]:
    """Train (or finish an interrupted run), score the best checkpoint on the test split."""
    run_dir = runs_dir / job.name
    metrics_path = run_dir / TEST_METRICS
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
    mode_names = {"a": info.modalities[0], "b": info.modalities[1],
                  "fused": "+".join(info.modalities)}
    key_field = "ratio" if part == "ratio" else "offset_mm"
    groups: dict[tuple[float, str, str], list[dict[str, Any]]] = {}
    for rec in records:
        if rec["part"] != part:
            continue
        for mode, scored in rec["test"].items():
            if scored.get("num_cases"):
                groups.setdefault((rec[key_field], rec["arm"], mode_names[mode]),
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
    """Labelled-ratio curves per modality and, when measured, the misalignment sweep;
    error bars = std."""
    panels = [(m, ratio_sum, "labelled ratio (%)") for m in modalities]
    if sweep_sum:
        fused = "+".join(modalities)
        panels.append((fused, sweep_sum, f"{fused} rigid offset (mm)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (modality, summary, xlabel) in zip(axes[0], panels, strict=True):
        for arm in dict.fromkeys(a for _, a, _ in summary):
            pts = sorted((p, s["mean"]) for (p, a, m), s in summary.items()
                         if a == arm and m == modality)
            if pts:
                ax.errorbar([p for p, _ in pts], [s[0] for _, s in pts],
                            yerr=[s[1] for _, s in pts], marker="o", capsize=3, label=arm)
        ax.set(title=f"test Dice, {modality}", xlabel=xlabel, ylabel="mean foreground Dice")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(records: Sequence[dict[str, Any]], out: Path, header: str, info: DataInfo,
           data_kind: str) -> tuple[str, list[str]]:
    """Write results.md and quality.png; return the markdown and the CMC shortfall lines."""
    ratio_sum = summarise(records, "ratio", info)
    sweep_sum = summarise(records, "sweep", info)
    shortfalls = cmc_shortfalls(ratio_sum, "labelled ratio (%)") \
        + cmc_shortfalls(sweep_sum, "offset (mm)")
    verdict = shortfalls or ["CMC beats supervised fusion at every point measured."]
    sections = [header, f"## Labelled ratio ({data_kind}, test split, Dice)",
                markdown_table(ratio_sum, "%", info.classes)]
    if sweep_sum:
        sections += ["## Misalignment sweep (paired, lowest ratio, test split, Dice)",
                     markdown_table(sweep_sum, "offset mm", info.classes)]
    sections += ["## Where CMC does not beat supervised fusion",
                 "\n".join(f"- {v}" for v in verdict)]
    text = "\n\n".join(sections) + "\n"
    (out / "results.md").write_text(text)
    plot(ratio_sum, sweep_sum, info.modalities, out / "quality.png")
    return text, shortfalls


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _float_list(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/quality"))
    parser.add_argument("--quick", action="store_true",
                        help="small variant (< 15 min on 2 cores): 10%% and 100%%, 1 seed")
    parser.add_argument("--steps", type=int, help="training steps per run (default: from budget)")
    parser.add_argument("--seeds", type=int, help="seeds of the lowest ratio and the sweep")
    parser.add_argument("--ratios", type=_int_list, help="labelled ratios in %%, e.g. 10,100")
    parser.add_argument("--offsets", type=_float_list, help="sweep offsets in mm, e.g. 0,20")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"subset of {','.join(ARMS)}")
    parser.add_argument("--cases", type=int, help="training cases (smoke tests)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings run side by side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training")
    parser.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config setting for every arm (repeatable; cmc train --set's "
                             "keys), e.g. w_cac=0.1 or spacing=1.5")
    parser.add_argument("--resume-from", type=Path, metavar="FOLDER",
                        help="continue an earlier output folder: scored runs are skipped")
    parser.add_argument("--datalist", action="append", default=[], metavar="RATIO=PATH",
                        help="your datalist at a labelled ratio in %% (repeatable), e.g. "
                             "10=amos10.json, instead of generated studies; no sweep")
    parser.add_argument("--config", default="tiny",
                        help="model preset (tiny | small | sam-med3d) or run config YAML, as "
                             "for cmc train")
    return parser.parse_args(argv)


def scale_from(args: argparse.Namespace) -> Scale:
    """The preset, narrowed by the command-line options."""
    scale = QUICK if args.quick else FULL
    overrides = {"seeds": args.seeds, "ratios": args.ratios, "offsets": args.offsets,
                 "cases": args.cases}
    scale = dataclasses.replace(scale, **{k: v for k, v in overrides.items() if v is not None})
    if scale.seeds < 1 or not scale.ratios or scale.cases < 1 or args.jobs < 1 \
            or args.threads < 1:
        raise BenchmarkError("need --seeds, --cases, --jobs and --threads >= 1 and at least "
                             "one ratio")
    if any(not 0 < r <= 100 for r in scale.ratios):
        raise BenchmarkError(f"--ratios must lie in (0, 100], got {list(scale.ratios)}")
    return scale


def studies_from(args: argparse.Namespace) -> tuple[Scale, list[Study], list[Study]]:
    """The scale and the ratio and sweep studies: generated ones (the preset narrowed by the
    options) or the user's datalists, whose split sizes replace the scale's."""
    scale = scale_from(args)
    if not args.datalist:
        low = min(scale.ratios)
        return (scale, [ratio_study(r) for r in scale.ratios],
                [sweep_study(low, offset) for offset in scale.offsets])
    generated_only = [f"--{name}" for name in ("ratios", "offsets", "cases")
                      if getattr(args, name) is not None]
    if generated_only:
        raise BenchmarkError(f"{', '.join(generated_only)}: apply to generated studies only; "
                             "with --datalist the datalists fix the ratios and cases")
    studies = parse_datalists(args.datalist)
    first = studies[0].loaded
    scale = dataclasses.replace(
        scale, ratios=tuple(study.ratio for study in studies), offsets=(), size=0,
        cases=len(first.labelled) + len(first.unlabelled), val_cases=len(first.validation),
        test_cases=len(first.test))
    return scale, list(studies), []


def describe_data(scale: Scale, ratio_studies: Sequence[Study]) -> str:
    """The data in one line for the report's header."""
    given = []
    for study in ratio_studies:
        if isinstance(study, DatalistStudy):
            given.append(f"{study.ratio} % = {study.path} ({len(study.loaded.labelled)} "
                         f"labelled, {len(study.loaded.unlabelled)} unlabelled)")
    if not given:
        return (f"generated: {scale.cases} training, {scale.val_cases} validation, "
                f"{scale.test_cases} test cases of {scale.size}^3 voxels")
    return (f"datalists {'; '.join(given)}; {scale.val_cases} validation, "
            f"{scale.test_cases} test cases")


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the studies, time the machine, train and score every run, write the report."""
    started = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    scale, ratio_studies, sweep_studies = studies_from(args)
    train_options = parse_train_options(args.train)
    arm_keys = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arm_keys if a not in ARMS]
    if unknown or BASELINE not in arm_keys or CMC not in arm_keys:
        raise BenchmarkError(f"--arms {args.arms}: unknown {unknown}; must include "
                             f"{BASELINE} and {CMC}; choose from {','.join(ARMS)}")
    out = args.resume_from or args.out
    if args.resume_from is None and (out / "runs").exists():
        raise BenchmarkError(f"{out / 'runs'}: earlier results exist; pass --resume-from {out} "
                             "to continue them or choose another --out")
    jobs = plan(ratio_studies, sweep_studies, scale.seeds, arm_keys)
    out.mkdir(parents=True, exist_ok=True)
    if args.datalist:
        print(f"using {len(ratio_studies)} datalists; no misalignment sweep", flush=True)
    else:
        print(f"generating {len({j.study for j in jobs})} studies of {scale.cases}+"
              f"{scale.val_cases}+{scale.test_cases} cases in {out / 'data'}", flush=True)
    datalists = {study: study.datalist(scale, out / "data") for study in
                 dict.fromkeys(j.study for j in jobs)}
    first = jobs[0].study
    info = data_info(first.loaded if isinstance(first, DatalistStudy)
                     else Datalist.load(datalists[first]), datalists[first], args.config)
    try:  # settings that do not fit this data (e.g. another modality) fail before training
        apply_settings(info.base, train_options)
    except SettingError as exc:
        raise BenchmarkError(f"--train {exc}") from None
    timing = calibrate(datalists[jobs[0].study], info.base, train_options)
    remaining = scale.budget_s - (time.perf_counter() - started)
    steps = args.steps or steps_for_budget(jobs, timing, scale, 0.9 * remaining, args.jobs)
    estimate = estimate_seconds(jobs, steps, timing, scale, args.jobs)
    print(f"{len(jobs)} runs x {steps} steps, {args.jobs} at a time; measured "
          f"{timing.step_labelled_s:.2f} s/step "
          f"(labelled only), {timing.step_unlabelled_s:.2f} s/step (with unlabelled), "
          f"{timing.eval_case_s:.2f} s per scored case; estimated {estimate / 60:.1f} min",
          flush=True)
    if estimate > scale.budget_s:
        print(f"warning: the estimate exceeds the {scale.budget_s / 60:.0f} min budget (minimum "
              "steps, or a busy machine); use --resume-from to continue if interrupted",
              flush=True)
    records = run_all(jobs, datalists, out / "runs", Recipe(info.base, train_options, steps),
                      args.jobs, args.threads)
    wall = time.perf_counter() - started
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    header = (f"# CMC quality benchmark\n\n`{command}`\n\nwall time {wall / 60:.1f} min; "
              f"{len(jobs)} runs x {steps} steps (--config {args.config}, {args.jobs} side by "
              f"side, {args.threads} thread(s) each); {describe_data(scale, ratio_studies)}; "
              f"training settings changed from --config: {train_options or 'none'}")
    data_kind = "the given datalists" if args.datalist else "unpaired CT / MR"
    text, shortfalls = report(records, out, header, info, data_kind)
    (out / "results.json").write_text(json.dumps(
        {"command": command, "wall_seconds": wall, "steps": steps, "train_options": train_options,
         "estimated_seconds": estimate, "timing": dataclasses.asdict(timing),
         "scale": dataclasses.asdict(scale), "arms": arm_keys, "cmc_shortfalls": shortfalls,
         "runs": records}, indent=1, allow_nan=False, default=_nan_free))
    print(text)
    return 0


def _nan_free(value: Any) -> Any:
    """json.dumps fallback for numpy scalars (NaN is already None in evaluate's output)."""
    if isinstance(value, np.generic):
        item = value.item()
        return None if isinstance(item, float) and math.isnan(item) else item
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as exc:
        sys.exit(f"error: {exc}")
