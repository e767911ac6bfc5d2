"""deploy/kubernetes/segment-indexed-job.yaml, checked by what can run without a cluster.

No Kubernetes cluster runs here. The manifest is parsed; its container must run
`cmc segment ... --shard auto --continue` from an image, as an Indexed Job whose
CMC_SHARD_COUNT equals `completions`. Then its command runs locally once per completion
index with the environment a pod gets (the manifest's env + JOB_COMPLETION_INDEX), its
volume paths mapped into a temporary folder: the pods' shares must cover every case once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import segment_fixtures as fx
import yaml

from cmc_serve.pipeline.shard_env import KUBERNETES_INDEX, shard_from_environment

MANIFEST = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / \
    "segment-indexed-job.yaml"


def load() -> dict[str, Any]:
    document = yaml.safe_load(MANIFEST.read_text())
    assert isinstance(document, dict)
    return document


def container(job: dict[str, Any]) -> dict[str, Any]:
    (only,) = job["spec"]["template"]["spec"]["containers"]
    return dict(only)


def pod_env(job: dict[str, Any], index: int) -> dict[str, str]:
    """The environment of pod `index`: the manifest's env and what Kubernetes adds."""
    env = {e["name"]: str(e["value"]) for e in container(job)["env"]}
    return {**env, KUBERNETES_INDEX: str(index)}


def test_manifest_is_an_indexed_job_running_cmc_segment_with_shard_auto() -> None:
    job = load()
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert 1 <= spec["parallelism"] <= spec["completions"]
    assert spec["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    pod = container(job)
    assert pod["image"]
    argv = [*pod["command"], *pod["args"]]
    assert argv[:2] == ["cmc", "segment"]
    assert argv[argv.index("--shard") + 1] == "auto" and "--continue" in argv
    mounts = {m["mountPath"] for m in pod["volumeMounts"]}
    for path in (argv[2], argv[argv.index("-o") + 1], argv[argv.index("--model") + 1]):
        assert any(path.startswith(m + "/") for m in mounts), path  # on a mounted volume


def test_each_index_gets_its_own_share_and_together_every_share_once() -> None:
    job = load()
    count = job["spec"]["completions"]
    shares = [shard_from_environment(pod_env(job, i)) for i in range(count)]
    assert [(s.index, s.count) for s in shares] == [(i + 1, count) for i in range(count)]
    assert {s.source.kind for s in shares} == {"kubernetes-indexed-job"}


def test_the_pods_command_run_per_index_covers_every_case_once(
        tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = load()
    pod = container(job)
    mounts = {"/data": tmp_path / "data", "/models/cmc": model_dir}
    studies = tmp_path / "data" / "studies"
    shape = (10, 10, 8)
    affine = fx.ras_affine(fx.SPACING, shape)
    for i in range(11):  # not a multiple of 8: some pods get one case more
        fx.write_nifti(studies / f"case{i:02d}_ct.nii.gz", fx.phantom(shape, affine, "ct"),
                       affine)

    def local(arg: str) -> str:
        for mount, there in mounts.items():
            if arg == mount or arg.startswith(mount + "/"):
                return str(there) + arg[len(mount):]
        return arg

    argv = [local(a) for a in pod["args"]]
    for index in range(job["spec"]["completions"]):
        for name, value in pod_env(job, index).items():
            monkeypatch.setenv(name, value)
        result = fx.run_cli(pod["command"][1], *argv)
        assert result.exit_code == 0, result.stderr
    merged = json.loads((tmp_path / "data" / "seg" / "report.json").read_text())
    ids = [c["case_id"] for c in merged["cases"]]
    assert sorted(ids) == [f"case{i:02d}_ct" for i in range(11)]
    assert merged["finished"] and merged["counts"]["done"] == 11
    assert [s["shard_source"]["variables"][KUBERNETES_INDEX] for s in merged["shards"]] == \
        [str(i) for i in range(job["spec"]["completions"])]
