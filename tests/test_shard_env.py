"""`--shard auto`: the share of a Slurm array task or Kubernetes Indexed Job pod from its
environment (cmc_serve.pipeline.shard_env), its refusals, and the record it leaves.

The environments are the ones a real Slurm 22.05 sets (checked on the cluster of
tests/slurm_fixture.py: `--array=1,3,7` gives MIN=1, MAX=7, STEP=1, COUNT=3).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import segment_fixtures as fx

from cmc_serve.pipeline.api import SegmentOptionError, SegmentOptions, segment
from cmc_serve.pipeline.shard_env import (
    ShardChoiceError,
    parse_shard_text,
    shard_from_environment,
)


def slurm(task: int, low: int, high: int, step: int = 1, count: int | None = None
          ) -> dict[str, str]:
    """The SLURM_ARRAY_* variables of task `task` of `--array=low-high:step`."""
    return {"SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": str(task),
            "SLURM_ARRAY_TASK_MIN": str(low), "SLURM_ARRAY_TASK_MAX": str(high),
            "SLURM_ARRAY_TASK_STEP": str(step),
            "SLURM_ARRAY_TASK_COUNT": str(count if count is not None
                                          else (high - low) // step + 1)}


@pytest.mark.parametrize(("low", "high", "step"), [(0, 3, 1), (1, 4, 1), (0, 6, 2), (5, 20, 5)])
def test_every_slurm_range_gives_shares_1_to_n_once(low: int, high: int, step: int) -> None:
    tasks = range(low, high + 1, step)
    got = [shard_from_environment(slurm(t, low, high, step)) for t in tasks]
    assert [(c.index, c.count) for c in got] == [(i, 4) for i in range(1, 5)]
    assert got[0].source.kind == "slurm-array"
    assert dict(got[0].source.variables)["SLURM_ARRAY_TASK_ID"] == str(low)


def test_kubernetes_index_is_zero_based_and_needs_a_count() -> None:
    pods = [shard_from_environment({"JOB_COMPLETION_INDEX": str(i), "CMC_SHARD_COUNT": "3"})
            for i in range(3)]
    assert [(c.index, c.count) for c in pods] == [(1, 3), (2, 3), (3, 3)]
    assert pods[0].source.record() == {"from": "kubernetes-indexed-job", "variables": {
        "JOB_COMPLETION_INDEX": "0", "CMC_SHARD_COUNT": "3"}}
    given = parse_shard_text("auto/3", {"JOB_COMPLETION_INDEX": "2"})
    assert (given.index, given.count) == (3, 3)


@pytest.mark.parametrize(("text", "environ", "names"), [
    ("auto", {}, ["SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"]),
    ("auto", {"JOB_COMPLETION_INDEX": "1"}, ["JOB_COMPLETION_INDEX=1", "CMC_SHARD_COUNT"]),
    ("auto", {"JOB_COMPLETION_INDEX": "3", "CMC_SHARD_COUNT": "3"},
     ["JOB_COMPLETION_INDEX=3", "CMC_SHARD_COUNT=3", "0..2"]),
    ("auto/4", {"JOB_COMPLETION_INDEX": "0", "CMC_SHARD_COUNT": "3"},
     ["auto/4", "CMC_SHARD_COUNT=3"]),
    ("auto/8", slurm(2, 1, 4), ["auto/8", "4 tasks", "SLURM_ARRAY_TASK_COUNT=4"]),
    ("auto", {**slurm(2, 1, 4), "CMC_SHARD_COUNT": "8"}, ["CMC_SHARD_COUNT=8", "4 tasks"]),
    ("auto", slurm(3, 1, 7, 1, count=3), ["one range", "SLURM_ARRAY_TASK_MAX=7",
                                          "SLURM_ARRAY_TASK_COUNT=3"]),
    ("auto", slurm(9, 1, 4), ["outside", "SLURM_ARRAY_TASK_ID=9"]),
    ("auto", {"SLURM_ARRAY_TASK_ID": "2"}, ["SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_MAX"]),
    ("auto", {**slurm(1, 1, 4), "SLURM_ARRAY_TASK_MIN": "x"}, ["SLURM_ARRAY_TASK_MIN='x'"]),
    ("auto", {**slurm(1, 1, 4), "JOB_COMPLETION_INDEX": "0"}, ["both"]),
    ("0/4", {}, ["'0/4'", "auto"]),
    ("auto/0", {}, ["'auto/0'"]),
])
def test_refusals_are_one_line_naming_what_was_read(text: str, environ: dict[str, str],
                                                    names: list[str]) -> None:
    with pytest.raises(ShardChoiceError) as caught:
        parse_shard_text(text, environ)
    message = str(caught.value)
    assert "\n" not in message
    for name in names:
        assert name in message, (name, message)


def test_segment_options_resolve_auto_from_the_process_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in slurm(3, 1, 4).items():
        monkeypatch.setenv(name, value)
    options = SegmentOptions(shard="auto")
    assert options.shard == options.share == (3, 4)
    assert options.report_options(Path("in"), None)["shard_source"]["from"] == "slurm-array"
    assert SegmentOptions(shard=(2, 4)).shard_source.record() == {  # type: ignore[union-attr]
        "from": "option", "variables": {}}
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    with pytest.raises(SegmentOptionError, match="neither SLURM_ARRAY_TASK_ID"):
        SegmentOptions(shard="auto")


def _cases(folder: Path, n: int) -> Path:
    shape = (10, 10, 8)
    affine = fx.ras_affine(fx.SPACING, shape)
    for i in range(n):
        fx.write_nifti(folder / f"case{i}_ct.nii.gz", fx.phantom(shape, affine, "ct"), affine)
    return folder


def test_shard_record_says_where_it_came_from_and_another_n_is_refused(
        tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    studies, out = _cases(tmp_path / "in", 3), tmp_path / "out"
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    monkeypatch.setenv("CMC_SHARD_COUNT", "2")
    result = segment(studies, out, model_dir, options=SegmentOptions(
        runtime="onnxruntime", shard="auto"))
    assert result.done == 1  # case1 of case0..2: every second id from the second
    own = json.loads((out / ".cmc-shards" / "shard-2-of-2" / "report.json").read_text())
    assert own["options"]["shard"] == "2/2"
    assert own["options"]["shard_source"] == {"from": "kubernetes-indexed-job", "variables": {
        "JOB_COMPLETION_INDEX": "1", "CMC_SHARD_COUNT": "2"}}
    merged = json.loads((out / "report.json").read_text())
    assert [s.get("shard_source") for s in merged["shards"]] == [None, own["options"]["shard_source"]]

    before = fx.case_files(out)
    monkeypatch.setenv("CMC_SHARD_COUNT", "3")  # a pod of another Job into the same OUT
    r = fx.segment(studies, "-o", out, "--model", model_dir, "--runtime", "onnxruntime",
                   "--shard", "auto")
    assert r.exit_code == 2
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith("cmc segment: error: ")
    for name in ("N=2", "shard 2 of 3", "JOB_COMPLETION_INDEX=1", "CMC_SHARD_COUNT=3"):
        assert name in line, line
    assert fx.case_files(out) == before  # refused before anything was written

    r = fx.segment(studies, "-o", tmp_path / "other", "--model", model_dir, "--shard", "auto/2")
    assert r.exit_code == 2 and "auto/2: CMC_SHARD_COUNT=3, not 2" in r.stderr
    assert not (tmp_path / "other").exists()
