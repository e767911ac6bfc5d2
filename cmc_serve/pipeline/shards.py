"""Shards sharing one output folder: each keeps its own records, the finishing ones merge.

`cmc segment IN -o OUT --shard I/N` is meant to run as N concurrent jobs (a Slurm array, a
Kubernetes Indexed Job) into one OUT on a shared filesystem. Case folders are disjoint by
construction (each case belongs to one shard), but a run's records are not, so:

- shard I of N writes its report.json and failures.csv only in its own folder,
  OUT/.cmc-shards/shard-I-of-N/ (no other shard ever writes there);
- when a shard finishes it merges every shard-J-of-N record into OUT/report.json and
  OUT/failures.csv (`merge_shards`; `cmc merge-shards OUT` runs the same merge by hand).
  The merged report lists every case of the shards found, says per shard whether it is
  finished, running or missing, and is `finished` only when all N are.

Several shards may merge at the same time. Each merge is a pure function of the shard
reports it read, written by atomic rename; after writing, the merger checks that no shard
report changed since it read them (a new report is a new inode), and merges again if one
did. The last shard to write its final report therefore also writes the last merge, and no
merge that saw an older state can end up on disk after it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmc_common.errors import CmcError
from cmc_serve.pipeline import outputs
from cmc_serve.pipeline.html_report import write_batch_report_html
from cmc_serve.pipeline.report import STAGES, read_report, report_document, write_report

SHARDS_DIR = ".cmc-shards"
_SHARD_NAME = re.compile(r"^shard-(?P<index>\d+)-of-(?P<count>\d+)$")
# Merges redone because a shard report changed meanwhile; each redo needs another shard to
# have written, so this bound is only reached by a shard that keeps writing (not finished).
MAX_MERGE_ROUNDS = 20


class ShardMergeError(CmcError, ValueError):
    """OUT holds no shard records to merge, or records of several different shardings."""


def shard_dir(out: Path, index: int, count: int) -> Path:
    """Where shard `index` of `count` keeps its report.json and failures.csv."""
    return out / SHARDS_DIR / f"shard-{index}-of-{count}"


@dataclass(frozen=True)
class MergedReport:
    """The result of a merge: the paths written and what they say."""

    report: Path  # OUT/report.json
    failures: Path | None  # OUT/failures.csv, None when no case failed
    count: int  # N of the shards merged
    complete: bool  # every shard 1..N found and finished
    counts: dict[str, int]


def shard_counts(out: Path) -> list[int]:
    """The N of every sharding that left records in OUT (usually one)."""
    folder = out / SHARDS_DIR
    found = {int(m["count"]) for p in (folder.iterdir() if folder.is_dir() else ())
             if (m := _SHARD_NAME.match(p.name))}
    return sorted(found)


def _fingerprints(out: Path, count: int) -> dict[int, tuple[int, int, int] | None]:
    """(inode, size, mtime) of each shard's report.json, None where there is none yet."""
    prints: dict[int, tuple[int, int, int] | None] = {}
    for index in range(1, count + 1):
        try:
            st = (shard_dir(out, index, count) / outputs.REPORT).stat()
            prints[index] = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            prints[index] = None
    return prints


def _read(out: Path, count: int) -> dict[int, dict[str, Any] | None]:
    return {index: read_report(shard_dir(out, index, count) / outputs.REPORT)
            for index in range(1, count + 1)}


def _same_in_all(reports: list[dict[str, Any]], key: str) -> Any:
    """A value every shard agrees on (engine, versions, platform), else {} (see `shards`)."""
    values = [r.get(key) for r in reports]
    return values[0] if values and all(v == values[0] for v in values) else {}


def _shard_entry(out: Path, index: int, count: int, report: dict[str, Any] | None
                 ) -> dict[str, Any]:
    entry: dict[str, Any] = {"shard": f"{index}/{count}",
                             "report": (shard_dir(out, index, count) / outputs.REPORT)
                             .relative_to(out).as_posix()}
    if report is None:
        return {**entry, "state": "missing"}
    return {**entry, "state": "finished" if report.get("finished") else "running",
            "shard_source": report.get("options", {}).get("shard_source"),
            **{k: report.get(k) for k in ("started", "wall_seconds", "command", "counts",
                                           "engine", "versions", "platform")}}


def merged_report(out: Path, count: int, reports: dict[int, dict[str, Any] | None]
                  ) -> dict[str, Any]:
    """One report.json over the shard reports: every case, the counts summed, per shard
    what ran where, and whether all N shards have finished."""
    present = [r for r in reports.values() if r is not None]
    cases = sorted((c for r in present for c in r.get("cases", [])),
                   key=lambda c: str(c.get("case_id")))
    shards = [_shard_entry(out, i, count, reports[i]) for i in range(1, count + 1)]
    options = dict(present[0].get("options", {})) if present else {}
    options["shard"] = options["shard_source"] = None  # per shard, in "shards"
    head = {
        "merged_shards": count,
        "finished": all(s["state"] == "finished" for s in shards),
        "started": min((str(r.get("started")) for r in present), default=None),
        "model": present[0].get("model", {}) if present else {},
        "engine": _same_in_all(present, "engine"),
        "versions": _same_in_all(present, "versions"),
        "platform": _same_in_all(present, "platform"),
        "options": options, "shards": shards,
    }
    return report_document(head, cases, {
        s: round(sum(r.get("stage_seconds", {}).get(s, 0.0) for r in present), 4)
        for s in STAGES})


def merge_shards(out: Path, count: int | None = None) -> MergedReport:
    """Merge the records of shards 1..N in OUT into OUT/report.json, OUT/failures.csv and
    OUT/report.html.

    `count` None takes the one sharding OUT holds; ShardMergeError when there is none or
    several (then name N).
    """
    out = Path(out)
    if count is None:
        counts = shard_counts(out)
        if len(counts) != 1:
            raise ShardMergeError(
                f"{out}: no shard records in {SHARDS_DIR}/ (was it written with --shard?)"
                if not counts else
                f"{out}: records of several shardings ({', '.join(f'N={n}' for n in counts)})"
                " in " + SHARDS_DIR + "/; say which to merge")
        count = counts[0]
    merged: dict[str, Any] = {}
    for _ in range(MAX_MERGE_ROUNDS):
        before = _fingerprints(out, count)
        merged = merged_report(out, count, _read(out, count))
        write_report(out, merged)
        if _fingerprints(out, count) == before:
            break
    write_batch_report_html(out)  # the page a person opens shows every shard's cases
    return MergedReport(report=out / outputs.REPORT,
                        failures=out / outputs.FAILURES if merged["counts"]["failed"] else None,
                        count=count, complete=merged["finished"], counts=merged["counts"])
