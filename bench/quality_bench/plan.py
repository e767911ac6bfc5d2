"""The plan of the benchmark: the arms, the data studies (generated, or the user's
datalists checked to be comparable) and the list of runs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmc_common.contract import ROLES
from cmc_common.errors import CmcError
from cmc_train.config import RunConfig, named_or_yaml_run_config
from cmc_train.data.datalist import Datalist, DatalistError
from cmc_train.synth import write_synthetic_study

BASELINE, CMC = "fusion", "cmc"
ROTATION_PER_MM = 0.75  # sweep: 20 mm comes with 15 degrees
DATA_SEED = 0


class BenchmarkError(CmcError):
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


# Steps supervised fusion needs at 100 % labels before its test Dice stops climbing
# (bench/learning_curve.py; BENCHMARKS.md, hard synthetic study). Fewer steps measure the
# budget rather than the labels.
CONVERGED_STEPS = {"hard": 500}


@dataclass(frozen=True)
class SyntheticStudy:
    """One generated data set: a labelled ratio of the AMOS-like study, or a sweep point."""

    name: str
    ratio: int
    unpaired: bool
    offset_mm: float
    rotation_deg: float
    elastic_mm: float
    difficulty: str = "easy"  # `cmc synth --difficulty`

    def spec(self, scale: Scale) -> dict[str, Any]:
        """Everything `write_synthetic_study` is given (recorded to refuse stale reuse; the
        easy phantom's spec keeps its old form, so earlier data folders stay reusable)."""
        spec = {"cases": scale.cases, "seed": DATA_SEED, "size": scale.size,
                "labelled_ratio": self.ratio / 100, "val_cases": scale.val_cases,
                "test_cases": scale.test_cases, "unpaired": self.unpaired,
                "offset_mm": self.offset_mm, "rotation_deg": self.rotation_deg,
                "elastic_mm": self.elastic_mm}
        return spec if self.difficulty == "easy" else {**spec, "difficulty": self.difficulty}

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
        return (*ROLES, "fused") if self.part == "sweep" else ROLES


def mode_names(modalities: Sequence[str]) -> dict[str, str]:
    """Scored mode -> the name tables and rows give it: a and b by their modality, the fused
    prediction as "a+b"."""
    return {"a": modalities[0], "b": modalities[1], "fused": "+".join(modalities)}


def ratio_study(ratio: int, difficulty: str = "easy") -> SyntheticStudy:
    """AMOS-like: CT and MR of different subjects, the synthetic study's default motion."""
    return SyntheticStudy(f"ratio{ratio}", ratio, unpaired=True, offset_mm=10.0,
                          rotation_deg=5.0, elastic_mm=2.0, difficulty=difficulty)


def sweep_study(ratio: int, offset_mm: float, difficulty: str = "easy") -> SyntheticStudy:
    """Paired subjects; only the rigid CT-MR offset (and its rotation) varies."""
    return SyntheticStudy(f"offset{offset_mm:g}mm", ratio, unpaired=False, offset_mm=offset_mm,
                          rotation_deg=ROTATION_PER_MM * offset_mm, elastic_mm=0.0,
                          difficulty=difficulty)


def plan(ratio_studies: Sequence[Study], sweep_studies: Sequence[Study], seeds: int,
         arm_keys: Sequence[str]) -> list[Job]:
    """All runs: every arm at every ratio, then the sweep (CMC vs fusion); the lowest and
    the highest ratio (the two ends of the labelled-data gap) and the sweep repeat over
    `seeds`."""
    ends = {min(study.ratio for study in ratio_studies), max(study.ratio for study in ratio_studies)}
    jobs = []
    for study in ratio_studies:
        for seed in range(seeds if study.ratio in ends else 1):
            for key in arm_keys:
                jobs += [Job(study, arm, seed, "ratio") for arm in ARMS[key]]
    for study in sweep_studies:
        for seed in range(seeds):
            for key in (BASELINE, CMC):
                jobs += [Job(study, arm, seed, "sweep") for arm in ARMS[key]]
    return jobs


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
