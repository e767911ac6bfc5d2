"""bench/quality.py on a user's datalists, the path for AMOS or MS-CMRSeg: every arm goes
through the real trainer and evaluator, only identically trained runs are reused on resume,
and datalists that would not make a fair ratio curve are refused before any training."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from quality_bench.calibration import under_converged
from quality_bench.plan import QUICK, BenchmarkError, parse_datalists, ratio_study

from cmc_train.config import ModelConfig, PreprocessConfig, RunConfig, TrainConfig
from cmc_train.synth import write_synthetic_study

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "quality.py"
# Class names unlike the generator's, to show the report takes them from the datalist.
CLASSES = ["background", "organ1", "organ2", "organ3", "organ4"]


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def renamed(datalist: Path) -> Path:
    """`datalist` with its classes renamed, in place."""
    data = json.loads(datalist.read_text())
    data["classes"] = CLASSES
    datalist.write_text(json.dumps(data))
    return datalist


@pytest.fixture(scope="module")
def datalists(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same generated study labelled at 34 % and 100 %, as `cmc import` would write it."""
    root = tmp_path_factory.mktemp("studies")
    return {ratio: renamed(write_synthetic_study(
        root / f"ratio{ratio}", cases=3, seed=0, size=32, labelled_ratio=ratio / 100,
        val_cases=1, test_cases=2, unpaired=True)) for ratio in (34, 100)}


@pytest.fixture(scope="module")
def micro_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run config YAML far smaller than the tiny preset (3 mm voxels, 16^3 patches)."""
    model = ModelConfig(img_size=16, vit_patch=4, embed_dim=32, depth=2, num_heads=2,
                        neck_channels=16, adapter_dim=8, decoder_channels=4,
                        num_classes=len(CLASSES))
    config = RunConfig(model, PreprocessConfig(modalities=("ct", "mr"), spacing=(3.0, 3.0, 3.0)),
                       TrainConfig(batch_labelled=1, batch_unlabelled=1), preset="micro")
    path = tmp_path_factory.mktemp("config") / "micro.yaml"
    config.save_yaml(path)
    return path


def test_datalist_benchmark_reports_every_arm_and_resumes_only_identical_runs(
        datalists: dict[int, Path], micro_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--datalist", f"34={datalists[34]}", "--datalist", f"100={datalists[100]}",
            "--config", str(micro_config), "--steps", "2", "--arms", "fusion,cmc",
            "--seeds", "1", "--jobs", "1"]
    first = run_bench(*args, "--out", str(out))
    assert first.returncode == 0, first.stderr
    results = json.loads((out / "results.json").read_text())
    assert sorted((run["ratio"], run["arm"]) for run in results["runs"]) == [
        (ratio, arm) for ratio in (34, 100) for arm in ("atlas", "cmc", "fusion", "thresholds")]
    for run in results["runs"]:
        assert run["part"] == "ratio" and set(run["test"]) == {"a", "b"}
        assert run["test"]["a"]["num_cases"] == 2
    report = (out / "results.md").read_text()
    assert "| organ1 | organ2 | organ3 | organ4 | mean |" in report
    assert "Misalignment sweep" not in report and "1 labelled, 2 unlabelled" in report
    assert (out / "quality.png").stat().st_size > 0
    rows = json.loads((out / "quality_results.json").read_text())
    assert sorted((r["ratio"], r["arm"], r["seed"], r["modality"]) for r in rows) == sorted(
        (ratio, arm, 0, modality) for ratio in (34, 100)
        for arm in ("cmc", "fusion", "thresholds", "atlas") for modality in ("ct", "mr"))
    assert "## Trained arms that do not beat the floor (thresholds, atlas)" in report
    assert set(rows[0]["dice"]) == set(CLASSES[1:]) and rows[0]["cases"] == 2
    scored = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/test_metrics.json")}
    assert len(scored) == 4

    changed = run_bench(*args, "--resume-from", str(out), "--train", "w_cac=0.2")
    assert changed.returncode != 0
    assert "config.yaml: run was trained with other settings (train.w_cac)" in changed.stderr

    again = run_bench(*args, "--resume-from", str(out))
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in scored} == scored
    # The wall time is this invocation's: the report says the runs were not trained in it.
    assert "4 runs (4 of them scored earlier and reused)" in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["reused_runs"] == 4


def test_datalist_options_of_generated_studies_are_refused(datalists: dict[int, Path]) -> None:
    result = run_bench("--datalist", f"34={datalists[34]}", "--ratios", "10,100")
    assert result.returncode != 0
    assert "--ratios: apply to generated studies only" in result.stderr
    result = run_bench("--datalist", f"34={datalists[34]}", "--difficulty", "hard")
    assert "--difficulty: apply to generated studies only" in result.stderr


def test_hard_studies_are_generated_as_cmc_synth_makes_them(tmp_path: Path) -> None:
    scale = dataclasses.replace(QUICK, cases=3, val_cases=1, test_cases=1, size=32)
    easy, hard = ratio_study(34), ratio_study(34, "hard")
    assert "difficulty" not in easy.spec(scale)  # data folders of earlier runs stay reusable
    datalist = hard.datalist(scale, tmp_path)
    assert json.loads((datalist.parent / "study.json").read_text())["difficulty"] == "hard"
    expected = write_synthetic_study(tmp_path / "by_hand", **hard.spec(scale))
    for name in ("ct", "mr"):
        first = json.loads(datalist.read_text())["labelled"][0]["image"][name]
        again = json.loads(expected.read_text())["labelled"][0]["image"][name]
        np.testing.assert_array_equal(nib.load(datalist.parent / first).get_fdata(),
                                      nib.load(expected.parent / again).get_fdata())


def test_too_few_steps_for_the_hard_study_are_called_a_budget() -> None:
    """The hard study's gap needs 500 steps to converge: fewer get a warning that says what
    to pass; the easy phantom and a user's datalists (no known convergence) get none."""
    warning = under_converged(250, "hard")
    assert warning is not None and "measure the step budget" in warning
    assert "--steps 500" in warning
    assert under_converged(500, "hard") is None
    assert under_converged(250, "easy") is None and under_converged(20, None) is None


@pytest.mark.parametrize("pair, problem", [
    ("34", "expected RATIO=PATH"),
    ("0={a}", "expected RATIO=PATH"),
    ("ten={a}", "expected RATIO=PATH"),
    ("34={a}|34={b}", "ratio 34 given twice"),
    ("34={missing}", "cannot read datalist"),
])
def test_malformed_datalist_options_are_refused(datalists: dict[int, Path],
                                                tmp_path: Path, pair: str, problem: str) -> None:
    pairs = pair.format(a=datalists[34], b=datalists[100],
                        missing=tmp_path / "none.json").split("|")
    with pytest.raises(BenchmarkError, match=problem):
        parse_datalists(pairs)


@pytest.mark.parametrize("change, problem", [
    ({"classes": ["background", "a", "b", "c", "d"]}, "classes .* differ from"),
    ({"test": "first only"}, "test cases differ from"),
    ({"unlabelled": []}, "training cases differ from"),
])
def test_datalists_that_differ_beyond_their_labels_are_refused(
        datalists: dict[int, Path], tmp_path: Path,
        change: dict[str, object], problem: str) -> None:
    data = json.loads(datalists[34].read_text())
    root = datalists[34].parent
    for entries in ("labelled", "unlabelled", "validation", "test"):  # paths from tmp_path
        for entry in data[entries]:
            for kind in ("image", "label"):
                entry[kind] = {m: str(root / p) for m, p in entry[kind].items()}
    data.update({key: data["test"][:1] if value == "first only" else value
                 for key, value in change.items()})
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    with pytest.raises(BenchmarkError, match=f"{other}: {problem}"):
        parse_datalists([f"34={datalists[34]}", f"50={other}"])
