"""Training and evaluating on your own data, from the user's side (`cmc train`, `cmc
check-data`, `cmc evaluate`): settings as KEY=VALUE, threads, explicit normalisation,
progress lines, data checks before the first step, and the evaluation table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import cmc_cli.train_cmd
import nibabel as nib
import numpy as np
import pytest
import torch
from cmc_cli.main import app
from typer.testing import CliRunner

from cmc_train.checkpoint import build_metadata, load_checkpoint, save_checkpoint
from cmc_train.config import ModelConfig, PreprocessConfig, RunConfig, TrainConfig
from cmc_train.network import build_cmc
from cmc_train.settings import SettingError, apply_settings, parse_settings, setting_keys
from cmc_train.synth import CLASSES, write_synthetic_study

MICRO = ModelConfig(img_size=16, vit_patch=4, embed_dim=32, depth=2, num_heads=2,
                    neck_channels=16, adapter_dim=8, decoder_channels=4, num_classes=5)
WIDE = {"COLUMNS": "400"}  # rich help and tables unwrapped


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_study(tmp_path_factory.mktemp("study"), cases=2, seed=0, size=32,
                                 labelled_ratio=0.5, val_cases=1, test_cases=1)


@pytest.fixture(scope="module")
def micro_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "micro.yaml"
    RunConfig(MICRO, PreprocessConfig(modalities=("ct", "mr"), spacing=(3.0, 3.0, 3.0)),
              TrainConfig(steps=4, warmup_steps=1, batch_labelled=1, batch_unlabelled=1,
                          seed=3), preset="micro").save_yaml(path)
    return path


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    prep = PreprocessConfig(modalities=("ct", "mr"), spacing=(3.0, 3.0, 3.0))
    save_checkpoint(path, build_cmc(MICRO).state_dict(),
                    build_metadata(MICRO, prep, list(CLASSES), {"steps": 0}))
    return path


def _copy_study(study: Path, to: Path) -> Path:
    shutil.copytree(study.parent, to)
    return to / study.name


def _train(*args: str) -> Any:
    """`cmc train ARGS` in this process; the result gains `threads`, torch's thread count
    as the command left it (restored afterwards)."""
    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, ["train", *args], env=WIDE)
        result.threads = torch.get_num_threads()
        return result
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ settings and threads

def test_train_takes_settings_threads_and_logs_each_validation(
        study: Path, micro_yaml: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = _train("--data", str(study), "--out", str(run), "--config", str(micro_yaml),
                    "--set", "spacing=3.5", "--set", "train.lr=2e-3",
                    "--set", "normalisation.mr=percentile", "--val-every", "2",
                    "--threads", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.threads == 1
    # Normalisation printed before the first step, as chosen or as defaulted (and why).
    assert "normalisation of mr: percentile (non-zero voxels clipped to their 0.5-99.5" \
        in result.output
    assert "normalisation of ct: ct-abdomen (window -175..250 HU" in result.output
    assert "[default for 'ct'" in result.output
    # --no-progress still logs one line per validation with its Dice.
    for step in (2, 4):
        assert f"step {step}/4: validation mean foreground Dice" in result.output
    saved = RunConfig.load_yaml(run / "config.yaml")
    assert saved.train.val_every == 2 and saved.train.lr == 2e-3
    assert saved.preprocess.spacing == (3.5, 3.5, 3.5)
    stored = load_checkpoint(run / "checkpoint_last.pt").metadata["preprocessing"]
    assert stored["normalisation"]["mr"] == {"kind": "percentile_zscore", "lower": 0.5,
                                             "upper": 99.5}
    assert stored["spacing"] == [3.5, 3.5, 3.5]


def test_default_threads_leave_a_core_free(monkeypatch: pytest.MonkeyPatch) -> None:
    from cmc_train.threads import default_threads, usable_cores

    assert default_threads() == max(1, usable_cores() - 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_threads() == max(1, (usable_cores() - 1) // 2)


def test_help_lists_every_setting_and_normalisation() -> None:
    assert cmc_cli.train_cmd.SETTING_KEYS == tuple(setting_keys())
    text = CliRunner().invoke(app, ["train", "--help"], env=WIDE).output
    for key in (*setting_keys(), "ct-abdomen", "ct-brain", "zscore", "percentile",
                "--val-every", "--threads"):
        assert key in text, key


@pytest.mark.parametrize("pair, message", [
    ("lrr=1", "unknown setting 'lrr'"),
    ("lr=fast", "'fast' is not a float"),
    ("spacing=1,2", "not 3 positive spacings"),
    ("normalisation.mr=minmax", "'minmax' is not a normalisation"),
    ("normalisation.t1=zscore", "no modality 't1' in this run"),
    ("num_classes=3", "unknown setting 'num_classes'"),
])
def test_bad_settings_are_refused_before_anything_runs(
        study: Path, micro_yaml: Path, tmp_path: Path, pair: str, message: str) -> None:
    result = _train("--data", str(study), "--out", str(tmp_path / "run"), "--config",
                    str(micro_yaml), "--set", pair)
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "run").exists()


def test_one_parser_for_cmc_train_and_the_quality_benchmark() -> None:
    from quality_bench.plan import BenchmarkError
    from quality_bench.runs import parse_train_options

    pairs = ["w_cac=0.2", "spacing=1.5,1.5,3", "normalisation.ct=ct-brain"]
    assert parse_train_options(pairs) == parse_settings(pairs)
    with pytest.raises(BenchmarkError, match="steps is set by this command"):
        parse_train_options(["steps=10"])
    base = RunConfig(MICRO, PreprocessConfig(), TrainConfig())
    changed = apply_settings(base, parse_settings(pairs))
    assert changed.train.w_cac == 0.2 and changed.preprocess.spacing == (1.5, 1.5, 3.0)
    assert changed.preprocess.normalisation["ct"] == {"kind": "ct_window", "low": 0.0,
                                                      "high": 80.0}
    with pytest.raises(SettingError, match="model.num_heads: embed_dim 32 is not a multiple"):
        apply_settings(base, parse_settings(["num_heads=5"]))


def test_old_checkpoints_keep_their_normalisation() -> None:
    """Before the choice existed, "ct" (any case) meant the abdominal window, anything else
    a z-score; configs and checkpoints that stored those dicts read back unchanged."""
    old = PreprocessConfig.from_dict({"modalities": ["CT", "t2"], "spacing": [2, 2, 2]})
    assert old.normalisation == {"CT": {"kind": "ct_window", "low": -175.0, "high": 250.0},
                                 "t2": {"kind": "zscore_nonzero"}}


# ------------------------------------------------------------------ data checks

def _set_label_values(path: Path, value: int) -> None:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).copy()
    data[data == 1] = value
    nib.save(nib.Nifti1Image(data, img.affine), str(path))


def test_label_beyond_the_class_list_stops_training_before_the_first_step(
        study: Path, micro_yaml: Path, tmp_path: Path) -> None:
    datalist = _copy_study(study, tmp_path / "data")
    entry = json.loads(datalist.read_text())["labelled"][0]
    bad_label = datalist.parent / entry["label"]["mr"]
    _set_label_values(bad_label, 7)
    run = tmp_path / "run"
    result = _train("--data", str(datalist), "--out", str(run), "--config", str(micro_yaml),
                    "--no-progress")
    assert result.exit_code == 2
    assert str(bad_label.resolve()) in result.output.replace("\n", "")
    assert "the mr label has values [7] beyond the datalist's 5 classes" in result.output
    assert "Traceback" not in result.output and not run.exists()


def test_empty_validation_split_is_refused_by_modality_name(
        study: Path, micro_yaml: Path, tmp_path: Path) -> None:
    datalist = _copy_study(study, tmp_path / "data")
    data = json.loads(datalist.read_text())
    data["validation"] = []
    datalist.write_text(json.dumps(data))
    result = _train("--data", str(datalist), "--out", str(tmp_path / "run"), "--config",
                    str(micro_yaml))
    assert result.exit_code == 2
    assert "the validation split has no labelled ct volume" in result.output
    assert not (tmp_path / "run").exists()


def test_check_data_lists_every_problem_with_its_file(study: Path, tmp_path: Path) -> None:
    datalist = _copy_study(study, tmp_path / "data")
    data = json.loads(datalist.read_text())
    wrong_values = datalist.parent / data["validation"][0]["label"]["ct"]
    _set_label_values(wrong_values, 9)
    wrong_shape = datalist.parent / data["test"][0]["label"]["mr"]
    img = nib.load(str(wrong_shape))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-2], img.affine), str(wrong_shape))
    nan_image = datalist.parent / data["unlabelled"][0]["image"]["ct"]
    img = nib.load(str(nan_image))
    array = np.asarray(img.dataobj, dtype=np.float32).copy()
    array[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(array, img.affine), str(nan_image))

    result = CliRunner().invoke(app, ["check-data", str(datalist)], env=WIDE)
    assert result.exit_code == 2
    text = result.output.replace("\n", "")
    assert f"{wrong_values.resolve()}: the ct label has values [9] beyond" in text
    assert f"{wrong_shape.resolve()}: the mr label has shape" in text
    assert f"{nan_image.resolve()}: the ct image contains NaN" in text
    assert "3 problem(s) found" in text

    clean = CliRunner().invoke(app, ["check-data", str(study)], env=WIDE)
    assert clean.exit_code == 0, clean.output
    assert "no problem found" in clean.output and "validation" in clean.output


# ------------------------------------------------------------------ evaluation output

def test_evaluate_shows_undefined_hd95_fused_scoring_and_progress_lines(
        study: Path, random_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(app, ["evaluate", str(random_checkpoint), "--data", str(study),
                                      "--out", str(out), "--no-progress", "--threads", "1"],
                                env=WIDE)
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    for mode, name in (("fused", "ct+mr"), ("a", "ct"), ("b", "mr")):
        summary = metrics["modes"][mode]
        assert summary["hd95_undefined_total"] == sum(summary["hd95_undefined"].values())
        assert summary["hd95_pairs"] == 4
        assert f"cmc evaluate: {mode} ({name}): 1 cases, mean Dice" in result.output
    assert metrics["modes"]["fused"]["scored_against"] == "ct labels"
    assert "HD95 undefined" in result.output
    fused = metrics["modes"]["fused"]
    assert f"{fused['hd95_undefined_total']} of 4" in result.output
    assert "fused: both modalities predicted on ct's grid, scored against ct's labels" \
        in result.output.replace("\n", " ").replace("  ", " ")


def test_progress_bars_on_a_terminal(study: Path, micro_yaml: Path, random_checkpoint: Path,
                                     tmp_path: Path) -> None:
    """FORCE_COLOR makes rich treat the output as a terminal: the bars appear, and the
    milestone lines are still printed above them."""
    terminal = {**WIDE, "FORCE_COLOR": "1"}
    result = CliRunner().invoke(app, ["evaluate", str(random_checkpoint), "--data", str(study),
                                      "--out", str(tmp_path / "m.json"), "--modes", "a"],
                                env=terminal)
    assert result.exit_code == 0, result.output
    assert "evaluate a" in result.output and "━" in result.output
    assert "cmc evaluate: a (ct): 1 cases" in result.output

    threads = torch.get_num_threads()
    try:
        trained = CliRunner().invoke(app, [
            "train", "--data", str(study), "--out", str(tmp_path / "run"), "--config",
            str(micro_yaml), "--set", "steps=2", "--threads", "1"], env=terminal)
    finally:
        torch.set_num_threads(threads)
    assert trained.exit_code == 0, trained.output
    assert "train" in trained.output and "━" in trained.output and "loss" in trained.output
    assert "step 2/2: validation mean foreground Dice" in trained.output
