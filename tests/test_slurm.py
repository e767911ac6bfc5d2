"""The shipped Slurm scripts (deploy/slurm/) submitted to a real single-node Slurm cluster
(tests/slurm_fixture.py): an array of `cmc segment --shard auto` tasks over one folder of
studies into one OUT, then `cmc merge-shards` as a job depending on the array.

The scripts are submitted unchanged: paths go in through the environment the scripts read
(CMC_INPUT, CMC_OUT, CMC_MODEL, CMC_SERVER), the number of tasks through sbatch's own
`--array`, which overrides the script's #SBATCH line as it would for a user. Every case
must be in the merged report exactly once with the labels a single process gives; a task
cancelled mid-run and requeued must lose nothing and redo nothing it had finished.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import segment_fixtures as fx
from slurm_fixture import SlurmCluster

from cmc_serve.pipeline.cases import discover_cases, select_shard

ROOT = Path(__file__).resolve().parents[1]
ARRAY_SCRIPT = ROOT / "deploy" / "slurm" / "segment-array.sh"
MERGE_SCRIPT = ROOT / "deploy" / "slurm" / "merge-shards.sh"
CMC = Path(sys.executable).with_name("cmc")  # the venv's console script


def test_readme_shows_the_shipped_array_script() -> None:
    """README's "Scaling out" quotes deploy/slurm/segment-array.sh whole: what users read is
    what these tests submit."""
    readme = (ROOT / "README.md").read_text()
    assert f"```bash\n{ARRAY_SCRIPT.read_text()}```" in readme


def write_studies(folder: Path, count: int, shape: tuple[int, int, int]) -> Path:
    """`count` two-modality cases (nnU-Net channel suffixes) of the threshold phantom, each
    shifted a little so that no two label maps are alike."""
    for i in range(count):
        affine = fx.ras_affine(fx.SPACING, shape)
        affine[:3, 3] += (2.0 * i, -1.0 * i, 0.5 * i)
        fx.write_nifti(folder / f"case{i:02d}_0000.nii.gz", fx.phantom(shape, affine, "ct"),
                       affine)
        fx.write_nifti(folder / f"case{i:02d}_0001.nii.gz", fx.phantom(shape, affine, "mr"),
                       affine)
    return folder


def job_env(studies: Path, out: Path, model: Path, **more: str) -> dict[str, str]:
    """What a user exports before `sbatch`: the scripts' paths, `cmc` on PATH."""
    return {"PATH": f"{CMC.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "CMC_INPUT": str(studies), "CMC_OUT": str(out), "CMC_MODEL": str(model), **more}


def single_process(studies: Path, out: Path, model: Path, *extra: str) -> float:
    """`cmc segment` over the whole folder in one process; its wall time in seconds."""
    started = time.monotonic()
    done = subprocess.run([str(CMC), "segment", str(studies), "-o", str(out), "--model",
                           str(model), *extra], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return time.monotonic() - started


def assert_merged_equals(out: Path, reference: Path, shards: int) -> dict[str, Any]:
    """OUT/report.json: every case of the reference run exactly once, all shards finished,
    and each case's labels identical to the reference's."""
    merged = json.loads((out / "report.json").read_text())
    want = json.loads((reference / "report.json").read_text())
    ids = [c["case_id"] for c in merged["cases"]]
    assert sorted(ids) == sorted(c["case_id"] for c in want["cases"])
    assert len(ids) == len(set(ids))  # exactly once
    assert merged["finished"] and merged["merged_shards"] == shards
    assert [s["state"] for s in merged["shards"]] == ["finished"] * shards
    for case_id in ids:
        np.testing.assert_array_equal(fx.read_labels(out / case_id / "seg.nii.gz")[0],
                                      fx.read_labels(reference / case_id / "seg.nii.gz")[0])
        assert (out / case_id / "done").is_file()
    return merged


def submit_merge(slurm: SlurmCluster, array: str, env: dict[str, str], cwd: Path
                 ) -> dict[str, str]:
    """merge-shards.sh as a job depending on the array; its scontrol record once ended."""
    merge = slurm.sbatch(f"--dependency=afterany:{array}", f"--chdir={cwd}", str(MERGE_SCRIPT),
                         env=env)
    return slurm.wait_ended(merge)[merge]


@pytest.mark.slow
def test_array_script_segments_every_case_once_and_the_dependent_merge_matches_one_process(
        slurm_cluster: SlurmCluster, model_dir: Path, tmp_path: Path) -> None:
    studies = write_studies(tmp_path / "studies", 8, (40, 40, 32))
    out, reference = tmp_path / "out", tmp_path / "single"
    single_seconds = single_process(studies, reference, model_dir)
    env = job_env(studies, out, model_dir)

    started = time.monotonic()
    # 0-based, while the script says 1-8: --shard auto counts from the array's first index.
    array = slurm_cluster.sbatch("--array=0-3", f"--chdir={tmp_path}", str(ARRAY_SCRIPT),
                                 env=env)
    merge = submit_merge(slurm_cluster, array, env, tmp_path)
    array_seconds = time.monotonic() - started
    tasks = slurm_cluster.tasks(array)

    assert {t: r["JobState"] for t, r in tasks.items()} == {str(i): "COMPLETED"
                                                            for i in range(4)}, tasks
    assert merge["JobState"] == "COMPLETED" and merge["ExitCode"] == "0:0", merge
    # The merge ran after the array (afterany): Slurm's times have one-second resolution.
    assert merge["StartTime"] >= max(r["EndTime"] for r in tasks.values())
    merged = assert_merged_equals(out, reference, shards=4)
    sources = [s["shard_source"] for s in merged["shards"]]
    assert [s["from"] for s in sources] == ["slurm-array"] * 4
    assert [s["variables"]["SLURM_ARRAY_TASK_ID"] for s in sources] == ["0", "1", "2", "3"]
    assert {s["variables"]["SLURM_ARRAY_TASK_MIN"] for s in sources} == {"0"}
    assert [s["counts"]["done"] for s in merged["shards"]] == [2, 2, 2, 2]
    print(f"\n8 cases: one process {single_seconds:.1f} s, 4-task Slurm array + merge "
          f"{array_seconds:.1f} s (submit to merge end)")


def shard_cases(studies: Path, index: int, count: int) -> list[str]:
    """The case ids shard `index` of `count` runs (the rule `cmc segment --shard` applies)."""
    return [c.case_id for c in select_shard(discover_cases(studies, None), index, count)]


def wait_for(condition: Any, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_task_cancelled_mid_run_and_requeued_loses_nothing_and_redoes_nothing(
        slurm_cluster: SlurmCluster, model_dir: Path, tmp_path: Path) -> None:
    # Larger volumes (about a second a case) so the cancel lands between two cases.
    studies = write_studies(tmp_path / "studies", 8, (128, 128, 96))
    out, reference = tmp_path / "out", tmp_path / "single"
    env = job_env(studies, out, model_dir)
    victim = shard_cases(studies, 1, 2)  # task 1 of --array=1-2
    array = slurm_cluster.sbatch("--array=1-2", f"--chdir={tmp_path}", str(ARRAY_SCRIPT),
                                 env=env)

    wait_for(lambda: any((out / c / "done").exists() for c in victim), "task 1's first case")
    slurm_cluster.run("scancel", f"{array}_1")
    cancelled = slurm_cluster.wait_ended(f"{array}_1")
    assert [r["JobState"] for r in cancelled.values()] == ["CANCELLED"]
    finished = {c: (out / c / "seg.nii.gz").stat().st_mtime_ns for c in victim
                if (out / c / "done").exists()}
    assert 0 < len(finished) < len(victim), "the cancel did not land mid-run"
    record = out / ".cmc-shards" / "shard-1-of-2" / "report.json"
    assert not record.exists() or not json.loads(record.read_text())["finished"]

    slurm_cluster.run("scontrol", "requeue", f"{array}_1")
    # Slurm makes a requeued job eligible only after a delay (its BeginTime); start it now.
    slurm_cluster.run("scontrol", "update", f"JobId={array}_1", "StartTime=now")
    tasks = slurm_cluster.wait_ended(array)
    assert {t: r["JobState"] for t, r in tasks.items()} == {"1": "COMPLETED", "2": "COMPLETED"}
    assert tasks["1"]["Restarts"] == "1"
    merge = submit_merge(slurm_cluster, array, env, tmp_path)
    assert merge["ExitCode"] == "0:0", merge

    single_process(studies, reference, model_dir)
    merged = assert_merged_equals(out, reference, shards=2)
    status = {c["case_id"]: c["status"] for c in merged["cases"]}
    for case_id, mtime in finished.items():  # done before the cancel: skipped, not redone
        assert status[case_id] == "skipped"
        assert (out / case_id / "seg.nii.gz").stat().st_mtime_ns == mtime
    assert all(status[c] == "done" for c in set(status) - set(finished))


def with_normalisation(model: Path, copy: Path) -> Path:
    """A copy of the Triton fixture's model dir whose cmc.json normalises CT and MR as an
    export does (the fixture's engine-level model has none, which whole cases refuse); the
    graphs, and so what the server computes, are the same files."""
    shutil.copytree(model, copy)
    document = json.loads((copy / "cmc.json").read_text())
    document["preprocessing"]["normalisation"] = {
        "ct": {"kind": "ct_window", "low": -175.0, "high": 250.0},
        "mr": {"kind": "zscore_nonzero"}}
    (copy / "cmc.json").write_text(json.dumps(document))
    return copy


@pytest.mark.slow
@pytest.mark.triton
def test_array_tasks_against_one_triton_server_give_a_local_runs_labels(
        slurm_cluster: SlurmCluster, triton_server: Any, tiny_model_dir: Path,
        tmp_path: Path) -> None:
    model = with_normalisation(tiny_model_dir, tmp_path / "model")
    studies = write_studies(tmp_path / "studies", 6, (40, 40, 32))
    out, reference = tmp_path / "out", tmp_path / "local"
    single_process(studies, reference, model, "--runtime", "onnxruntime")
    server = f"grpc://{triton_server.grpc_url}"
    env = job_env(studies, out, model, CMC_SERVER=server)

    array = slurm_cluster.sbatch("--array=1-3", f"--chdir={tmp_path}", str(ARRAY_SCRIPT),
                                 env=env)
    merge = submit_merge(slurm_cluster, array, env, tmp_path)
    assert merge["ExitCode"] == "0:0", merge
    merged = assert_merged_equals(out, reference, shards=3)
    for shard in merged["shards"]:  # each task ran on the one server
        record = json.loads((out / shard["report"]).read_text())
        assert record["options"]["runtime"] == "triton"
        assert record["options"]["server"] == server
    assert len(np.unique(fx.read_labels(out / "case00" / "seg.nii.gz")[0])) > 1  # non-trivial
