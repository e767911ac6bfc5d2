"""The benchmark's command line (`bench/quality.py`, options in the package docstring) and
`main`: generate the studies, time the machine, train and score every run, report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import quality_bench
from cmc_train.data.datalist import Datalist
from cmc_train.settings import SettingError, apply_settings
from cmc_train.synth import PAIR_MAKERS
from quality_bench.calibration import (
    calibrate,
    estimate_seconds,
    steps_for_budget,
    under_converged,
)
from quality_bench.floors import floor_records
from quality_bench.plan import (
    ARMS,
    BASELINE,
    CMC,
    FULL,
    QUICK,
    BenchmarkError,
    DatalistStudy,
    Scale,
    Study,
    data_info,
    parse_datalists,
    plan,
    ratio_study,
    sweep_study,
)
from quality_bench.results import _nan_free, report
from quality_bench.runs import Recipe, parse_train_options, run_all, scored_metrics


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def float_list(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=str(quality_bench.__doc__).split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/quality"))
    parser.add_argument("--quick", action="store_true",
                        help="small variant (< 15 min on 2 cores): 10%% and 100%%, 1 seed")
    parser.add_argument("--steps", type=int, help="training steps per run (default: from budget)")
    parser.add_argument("--seeds", type=int, help="seeds of the lowest ratio and the sweep")
    parser.add_argument("--ratios", type=int_list, help="labelled ratios in %%, e.g. 10,100")
    parser.add_argument("--offsets", type=float_list, help="sweep offsets in mm, e.g. 0,20")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"subset of {','.join(ARMS)}")
    parser.add_argument("--cases", type=int, help="training cases (smoke tests)")
    parser.add_argument("--difficulty", choices=tuple(PAIR_MAKERS), default="easy",
                        help="generated study: the easy phantom or `cmc synth --difficulty "
                             "hard` (subjects and scanners that vary, lesions, a CT/MR gap)")
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
        return (scale, [ratio_study(r, args.difficulty) for r in scale.ratios],
                [sweep_study(low, offset, args.difficulty) for offset in scale.offsets])
    generated_only = [f"--{name}" for name in ("ratios", "offsets", "cases")
                      if getattr(args, name) is not None]
    if args.difficulty != "easy":
        generated_only.append("--difficulty")
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
    if (warning := under_converged(steps, None if args.datalist else args.difficulty)):
        print(f"warning: {warning}", flush=True)
    if estimate > scale.budget_s:
        print(f"warning: the estimate exceeds the {scale.budget_s / 60:.0f} min budget (minimum "
              "steps, or a busy machine); use --resume-from to continue if interrupted",
              flush=True)
    reused = sum(scored_metrics(out / "runs", job).is_file() for job in jobs)
    records = run_all(jobs, datalists, out / "runs", Recipe(info.base, train_options, steps),
                      args.jobs, args.threads)
    records += floor_records(ratio_studies, datalists, info.base.preprocess)
    wall = time.perf_counter() - started
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    reuse = f" ({reused} of them scored earlier and reused)" if reused else ""
    header = (f"# CMC quality benchmark\n\n`{command}`\n\nwall time {wall / 60:.1f} min; "
              f"{len(jobs)} runs{reuse} x {steps} steps (--config {args.config}, {args.jobs} "
              f"side by side, {args.threads} thread(s) each); "
              f"{describe_data(scale, ratio_studies)}; "
              f"training settings changed from --config: {train_options or 'none'}")
    data_kind = "the given datalists" if args.datalist else "unpaired CT / MR"
    found = report(records, out, header, info, data_kind)
    (out / "results.json").write_text(json.dumps(
        {"command": command, "wall_seconds": wall, "reused_runs": reused, "steps": steps,
         "train_options": train_options, "estimated_seconds": estimate,
         "timing": dataclasses.asdict(timing),
         "scale": dataclasses.asdict(scale), "arms": arm_keys,
         "cmc_shortfalls": found.cmc_shortfalls,
         "gap_closure": [dataclasses.asdict(g) for g in found.gap_closures],
         "sweep_gain": [dataclasses.asdict(g) for g in found.sweep_gains],
         "runs": records}, indent=1, allow_nan=False, default=_nan_free))
    print(found.text)
    return 0
