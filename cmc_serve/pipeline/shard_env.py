"""Which share of the cases this process runs: `--shard I/N`, or `--shard auto` from the
scheduler that started it.

A user running N copies of `cmc segment` as a Slurm array or a Kubernetes Indexed Job should
not translate the scheduler's numbering into `--shard I/N` by hand: Slurm numbers tasks from
`--array`'s first index (0 or 1, or any other), Kubernetes from 0, `--shard` from 1, and an
off-by-one there silently drops one share of the cases and runs another twice. So:

- Slurm array: I = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP + 1,
  N = SLURM_ARRAY_TASK_COUNT (or (MAX - MIN) / STEP + 1 where COUNT is unset). `--array=1-4`,
  `0-3` and the stepped `0-6:2` all give shares 1..4 of 4. An array of listed indices
  (`--array=1,3,7`) has no position of a task in its list in the environment (Slurm sets
  MIN=1, MAX=7, STEP=1, COUNT=3 there), so it is refused rather than guessed.
- Kubernetes Indexed Job: I = JOB_COMPLETION_INDEX + 1 (0-based index), N from `--shard
  auto/N` or the CMC_SHARD_COUNT environment variable (Kubernetes does not put
  `completions` into a pod's environment; the manifest in deploy/kubernetes/ sets it).

Every count that is given (the N of `auto/N`, CMC_SHARD_COUNT, Slurm's own) must agree, the
index must lie inside it, and OUT must not already hold the records of another N
(`check_out_sharding`): each refusal is one line naming the variables read and their values.
`auto` is never the default: an array task that segments an input of its own (INPUT chosen by
SLURM_ARRAY_TASK_ID) would otherwise lose all but 1/N of its cases without a word.
The choice is recorded in each shard's report.json (`options.shard_source`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmc_serve.errors import SegmentOptionError
from cmc_serve.pipeline import shards

AUTO = "auto"
COUNT_ENV = "CMC_SHARD_COUNT"
SLURM_ID = "SLURM_ARRAY_TASK_ID"
SLURM_MIN = "SLURM_ARRAY_TASK_MIN"
SLURM_MAX = "SLURM_ARRAY_TASK_MAX"
SLURM_STEP = "SLURM_ARRAY_TASK_STEP"
SLURM_COUNT = "SLURM_ARRAY_TASK_COUNT"
KUBERNETES_INDEX = "JOB_COMPLETION_INDEX"
SLURM_VARIABLES = (SLURM_ID, SLURM_MIN, SLURM_MAX, SLURM_STEP, SLURM_COUNT)

_AUTO = re.compile(r"\s*auto\s*(?:/\s*(\d+)\s*)?")
_INDEX_OF_COUNT = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


class ShardChoiceError(SegmentOptionError):
    """The shard cannot be decided (malformed text, no or inconsistent scheduler environment,
    OUT holding another sharding); str() is the one line naming what was read. A refusal of
    the `shard` option whose message is the problem alone: it names --shard or the scheduler
    variables it read itself."""

    def __init__(self, problem: str) -> None:
        super().__init__("shard", problem)
        self.args = (problem,)


@dataclass(frozen=True)
class ShardSource:
    """Where a shard came from: `kind` is "option" (`--shard I/N`), "slurm-array" or
    "kubernetes-indexed-job"; `variables` the environment variables read, as (name, value)."""

    kind: str
    variables: tuple[tuple[str, str], ...] = ()

    def record(self) -> dict[str, Any]:
        """What report.json says (`options.shard_source`)."""
        return {"from": self.kind, "variables": dict(self.variables)}

    def describe(self) -> str:
        read = ", ".join(f"{k}={v}" for k, v in self.variables)
        return f"{self.kind} ({read})" if read else "--shard I/N"


@dataclass(frozen=True)
class ShardChoice:
    """Share `index` (1-based) of `count`, and where that came from."""

    index: int
    count: int
    source: ShardSource


def _read(environ: Mapping[str, str], names: tuple[str, ...]) -> dict[str, str]:
    """The set, non-empty variables among `names`, in that order."""
    return {n: environ[n].strip() for n in names if environ.get(n, "").strip()}


def _integer(name: str, read: dict[str, str], where: str) -> int:
    value = read[name]
    if not re.fullmatch(r"\d+", value):
        raise ShardChoiceError(f"--shard auto: {name}={value!r} is not a non-negative integer "
                               f"({where})")
    return int(value)


def _read_text(read: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in read.items())


def _slurm(environ: Mapping[str, str], given: int | None) -> ShardChoice:
    read = _read(environ, (*SLURM_VARIABLES, COUNT_ENV))
    where = "read " + _read_text(read)
    missing = [n for n in (SLURM_MIN, SLURM_MAX) if n not in read]
    if missing:
        raise ShardChoiceError(f"--shard auto: a Slurm array task needs {' and '.join(missing)} "
                               f"beside {SLURM_ID} ({where})")
    task, low, high = (_integer(n, read, where) for n in (SLURM_ID, SLURM_MIN, SLURM_MAX))
    step = _integer(SLURM_STEP, read, where) if SLURM_STEP in read else 1
    if step < 1:
        raise ShardChoiceError(f"--shard auto: {SLURM_STEP}={step} is not a step ({where})")
    if high < low or not low <= task <= high:
        raise ShardChoiceError(f"--shard auto: task {task} is outside the Slurm array "
                               f"{low}-{high}:{step} ({where})")
    span = (high - low) // step + 1
    count = _integer(SLURM_COUNT, read, where) if SLURM_COUNT in read else span
    if count != span or (task - low) % step:
        raise ShardChoiceError(f"--shard auto: the Slurm array is not one range MIN-MAX[:STEP] "
                               f"({count} tasks, {span} in {low}-{high}:{step}), so a task's "
                               f"share is unknown: use --array=A-B[:S] or --shard I/N ({where})")
    _agree(count, given, environ, f"the Slurm array's {count} tasks", where)
    return ShardChoice((task - low) // step + 1, count,
                       ShardSource("slurm-array", tuple(read.items())))


def _kubernetes(environ: Mapping[str, str], given: int | None) -> ShardChoice:
    read = _read(environ, (KUBERNETES_INDEX, COUNT_ENV))
    where = "read " + _read_text(read)
    index = _integer(KUBERNETES_INDEX, read, where)
    count = _integer(COUNT_ENV, read, where) if COUNT_ENV in read else given
    if count is None:
        raise ShardChoiceError(f"--shard auto: {KUBERNETES_INDEX} gives the index but not the "
                               f"number of shards: set {COUNT_ENV} to the Job's completions or "
                               f"give --shard auto/N ({where})")
    _agree(count, given, environ, f"{COUNT_ENV}={count}", where)
    if count < 1:
        raise ShardChoiceError(f"--shard auto: {COUNT_ENV} must be at least 1 ({where})")
    if not 0 <= index < count:
        raise ShardChoiceError(f"--shard auto: {KUBERNETES_INDEX}={index} is outside the "
                               f"{count} shard(s), whose indices are 0..{count - 1} ({where})")
    return ShardChoice(index + 1, count, ShardSource("kubernetes-indexed-job",
                                                     tuple(read.items())))


def _agree(count: int, given: int | None, environ: Mapping[str, str], what: str,
           where: str) -> None:
    """Refuse when the N of `--shard auto/N` or CMC_SHARD_COUNT differs from `count`."""
    if given is not None and given != count:
        raise ShardChoiceError(f"--shard auto/{given}: {what}, not {given} ({where})")
    stated = environ.get(COUNT_ENV, "").strip()
    if stated and stated != str(count):
        raise ShardChoiceError(f"--shard auto: {COUNT_ENV}={stated} but {what} ({where})")


def shard_from_environment(environ: Mapping[str, str], count: int | None = None) -> ShardChoice:
    """The shard a Slurm array task or Kubernetes Indexed Job pod runs (`--shard auto`, or
    `auto/N` with `count`); ShardChoiceError when neither or both say, or they disagree."""
    slurm, kubernetes = SLURM_ID in _read(environ, SLURM_VARIABLES), \
        KUBERNETES_INDEX in _read(environ, (KUBERNETES_INDEX,))
    if slurm and kubernetes:
        raise ShardChoiceError(f"--shard auto: both {SLURM_ID} and {KUBERNETES_INDEX} are set; "
                               "give --shard I/N")
    if slurm:
        return _slurm(environ, count)
    if kubernetes:
        return _kubernetes(environ, count)
    raise ShardChoiceError(f"--shard auto: neither {SLURM_ID} (Slurm array) nor "
                           f"{KUBERNETES_INDEX} (Kubernetes Indexed Job) is set; run it as an "
                           "array task or give --shard I/N")


def parse_shard_text(text: str, environ: Mapping[str, str]) -> ShardChoice:
    """`--shard` text: "I/N", "auto" or "auto/N" (N checked against the scheduler's)."""
    auto = _AUTO.fullmatch(text)
    if auto and (auto[1] is None or int(auto[1]) >= 1):
        return shard_from_environment(environ, int(auto[1]) if auto[1] else None)
    return ShardChoice(*parse_shard(text), ShardSource("option"))


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 1 <= I <= N."""
    m = _INDEX_OF_COUNT.fullmatch(text)
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise ShardChoiceError(f"--shard {text!r}: expected I/N with 1 <= I <= N (e.g. 2/4), "
                               "auto (from a Slurm array or Kubernetes Indexed Job) or auto/N")
    return int(m[1]), int(m[2])


def check_out_sharding(out: Path, index: int, count: int, source: ShardSource) -> None:
    """Refuse to add shard I of N to an OUT whose .cmc-shards/ already holds shards of
    another N: the two shardings split the cases differently, so cases would be run twice
    or never, and the merge would mix them."""
    others = [n for n in shards.shard_counts(Path(out)) if n != count]
    if others:
        found = ", ".join(f"N={n}" for n in others)
        raise ShardChoiceError(
            f"{out}: {shards.SHARDS_DIR}/ holds shards of {found}, but this run is shard "
            f"{index} of {count} from {source.describe()}; run every "
            "shard with the same N, or use a new output folder")
