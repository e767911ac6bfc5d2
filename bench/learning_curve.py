"""Learning curve: test Dice of one arm after N training steps, for several N, at the lowest
and the highest labelled ratio of `bench/quality.py`'s generated study.

Each N is its own run (the LR warms up and decays over N steps, as in the benchmark), so a
point says what a benchmark with `--steps N` would measure. Where the curve of the highest
ratio still climbs, a "10 % = 100 %" row of the benchmark is a step budget, not a finding.

    .venv/bin/python bench/learning_curve.py --steps 125,250,500,1000 \
        [--difficulty hard] [--ratios 10,100] [--arm fusion] [--seed 0] [--jobs 2] \
        [--out bench/results/learning_curve] [--data FOLDER]

`--data` reuses the studies a `bench/quality.py` run generated (its OUT/data; they are
checked to be the same settings) instead of generating them again. Writes
learning_curve.md and learning_curve.json to `--out`, and one run folder per point.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from quality_bench.cli import int_list
from quality_bench.plan import ARMS, FULL, Job, Study, data_info, ratio_study
from quality_bench.runs import Recipe, run_all

from cmc_train.data.datalist import Datalist
from cmc_train.synth import PAIR_MAKERS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=str(__doc__).split("\n\n")[0])
    parser.add_argument("--steps", type=int_list, required=True, help="e.g. 125,250,500,1000")
    parser.add_argument("--ratios", type=int_list, default=(10, 100))
    parser.add_argument("--arm", choices=[k for k in ARMS if k != "single"], default="fusion")
    parser.add_argument("--difficulty", choices=tuple(PAIR_MAKERS), default="hard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--data", type=Path, help="a bench/quality.py OUT/data folder")
    parser.add_argument("--out", type=Path, default=Path("bench/results/learning_curve"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out: Path = args.out
    data_dir = args.data or out / "data"
    studies = [ratio_study(ratio, args.difficulty) for ratio in args.ratios]
    datalists: dict[Study, Path] = {study: study.datalist(FULL, data_dir) for study in studies}
    first = datalists[studies[0]]
    info = data_info(Datalist.load(first), first, args.config)
    (arm,) = ARMS[args.arm]
    rows = []
    for steps in args.steps:
        jobs = [Job(study, arm, args.seed, f"steps{steps}") for study in studies]
        records = run_all(jobs, datalists, out / "runs", Recipe(info.base, {}, steps),
                          args.jobs, args.threads)
        for record in records:
            for mode, scored in sorted(record["test"].items()):
                rows.append({"steps": steps, "ratio": record["ratio"], "arm": args.arm,
                             "seed": args.seed, "mode": mode,
                             "modality": info.modalities[0 if mode == "a" else 1],
                             "dice": scored["dice"], "mean_fg_dice": scored["mean_fg_dice"],
                             "train_seconds": record["train_seconds"]})
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    text = report(rows, args.ratios, info.modalities, command)
    (out / "learning_curve.md").write_text(text)
    (out / "learning_curve.json").write_text(json.dumps({"command": command, "rows": rows},
                                                        indent=1))
    print(text)
    return 0


def report(rows: list[dict[str, Any]], ratios: tuple[int, ...], modalities: tuple[str, str],
           command: str) -> str:
    """One line per step count: mean foreground Dice per ratio and modality and, given two
    ratios or more, the gap between the highest and the lowest."""
    ordered = sorted(set(ratios))
    gap_columns = modalities if len(ordered) > 1 else ()
    score = {(r["steps"], r["ratio"], r["modality"]): r["mean_fg_dice"] for r in rows}
    header = [f"{m} {ratio} %" for m in modalities for ratio in ordered]
    header += [f"{m} gap" for m in gap_columns]
    lines = [f"`{command}`", "", "| steps | " + " | ".join(header) + " |",
             "|---" * (len(header) + 1) + "|"]
    for steps in sorted({r["steps"] for r in rows}):
        cells = [f"{score[(steps, ratio, m)]:.3f}" for m in modalities for ratio in ordered]
        cells += [f"{score[(steps, ordered[-1], m)] - score[(steps, ordered[0], m)]:+.3f}"
                  for m in gap_columns]
        lines.append(f"| {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
