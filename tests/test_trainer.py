"""Training runs end to end on a tiny synthetic study: files, metrics, exact resume,
determinism, ablation switches and refused runs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from cmc_cli.main import app
from typer.testing import CliRunner

from cmc_train.checkpoint import load_checkpoint, load_model
from cmc_train.config import ModelConfig, PreprocessConfig, RunConfig, TrainConfig
from cmc_train.network import build_cmc
from cmc_train.run_state import TrainError, iter_metrics, lr_factor
from cmc_train.synth import write_synthetic_study
from cmc_train.trainer import train

MICRO = ModelConfig(img_size=16, vit_patch=4, embed_dim=32, depth=2, num_heads=2,
                    neck_channels=16, adapter_dim=8, decoder_channels=4, num_classes=5)
STEPS = 4


def micro_config(**train_overrides: object) -> RunConfig:
    train_cfg = TrainConfig(steps=STEPS, val_every=2, warmup_steps=1, batch_labelled=1,
                            batch_unlabelled=1, rampup_fraction=0.5, seed=3)
    # 3 mm voxels keep the validation volumes near one patch: a whole-volume pass is cheap.
    return RunConfig(MICRO, PreprocessConfig(modalities=("ct", "mr"), spacing=(3.0, 3.0, 3.0)),
                     replace(train_cfg, **train_overrides), preset="micro")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_study(tmp_path_factory.mktemp("study"), cases=3, seed=0, size=32,
                                 labelled_ratio=0.34, val_cases=1, test_cases=1)


@pytest.fixture(scope="module")
def full_run(study: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("full")
    train(study, run_dir, micro_config(), progress=False)
    return run_dir


def _train_losses(run_dir: Path) -> list[tuple[int, float, float, float, float]]:
    return [(r["step"], r["loss"], r["sup"], r["csc"], r["cac"])
            for r in iter_metrics(run_dir) if r["kind"] == "train"]


def test_run_writes_checkpoints_metrics_and_config(full_run: Path) -> None:
    assert sorted(p.name for p in full_run.iterdir()) == [
        "checkpoint_best.pt", "checkpoint_last.pt", "config.yaml", "metrics.jsonl"]
    records = list(iter_metrics(full_run))
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    vals = [r for r in records if r["kind"] == "val"]
    assert [v["step"] for v in vals] == [2, 4]
    for v in vals:
        assert set(v["dice"]) == {"ct", "mr"} and all(len(d) == 4 for d in v["dice"].values())
        assert 0.0 <= v["mean_fg_dice"] <= 1.0
    assert all(r["loss"] == pytest.approx(r["sup"] + r["w_csc"] * r["csc"] + r["w_cac"] * r["cac"],
                                          rel=1e-5)
               for r in records if r["kind"] == "train")
    assert RunConfig.load_yaml(full_run / "config.yaml") == micro_config()

    last = load_checkpoint(full_run / "checkpoint_last.pt")
    assert last.trainer_state is not None and last.trainer_state["step"] == STEPS
    training = last.metadata["training"]
    assert training["steps"] == STEPS and training["seed"] == 3
    assert len(training["datalist_sha256"]) == 64
    best_dice = max(v["mean_fg_dice"] for v in vals)
    assert training["best_metric"] == pytest.approx(best_dice)
    net, metadata = load_model(full_run / "checkpoint_best.pt")
    assert load_checkpoint(full_run / "checkpoint_best.pt").trainer_state is None
    assert metadata["classes"][0] == "background" and metadata["modalities"] == ["ct", "mr"]
    assert metadata["training"]["best_step"] == training["best_step"]


def test_interrupted_and_resumed_run_matches_uninterrupted_run(
    study: Path, full_run: Path, tmp_path: Path
) -> None:
    # The first half also shows seeded determinism: a second run reproduces every loss bit.
    train(study, tmp_path, micro_config(), progress=False, stop_after=2)
    assert _train_losses(tmp_path) == _train_losses(full_run)[:2]
    assert load_checkpoint(tmp_path / "checkpoint_last.pt").trainer_state["step"] == 2
    train(study, tmp_path, micro_config(), resume=True, progress=False)
    assert _train_losses(tmp_path) == _train_losses(full_run)
    resumed = load_checkpoint(tmp_path / "checkpoint_last.pt").state_dict
    for key, value in load_checkpoint(full_run / "checkpoint_last.pt").state_dict.items():
        assert torch.equal(resumed[key], value), key


def test_ablation_switches_and_seed(study: Path, full_run: Path, tmp_path: Path) -> None:
    no_csc = tmp_path / "no_csc"
    train(study, no_csc, micro_config(steps=1, val_every=1, use_csc=False, seed=4),
          progress=False)
    (record,) = [r for r in iter_metrics(no_csc) if r["kind"] == "train"]
    assert record["w_csc"] == 0.0 and record["csc"] == 0.0 and record["w_cac"] > 0.0
    assert record["sup"] != _train_losses(full_run)[0][2]  # another seed, another run

    single = tmp_path / "single"
    train(study, single, micro_config(steps=1, val_every=1, use_csc=False, use_cac=False),
          progress=False, single_modality="b")
    records = list(iter_metrics(single))
    assert records[0]["loss"] == records[0]["sup"]
    assert set(records[1]["dice"]) == {"mr"}
    assert load_checkpoint(single / "checkpoint_last.pt").metadata["training"][
        "single_modality"] == "b"


def test_refused_runs(study: Path, full_run: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="already exists"):
        train(study, full_run, micro_config(), progress=False)
    with pytest.raises(TrainError, match="nothing to resume"):
        train(study, tmp_path, micro_config(), resume=True, progress=False)
    with pytest.raises(TrainError, match="configuration differs"):
        train(study, full_run, micro_config(lr=0.5), resume=True, progress=False)
    wrong_classes = replace(micro_config(), model=replace(MICRO, num_classes=3))
    with pytest.raises(TrainError, match="num_classes=3"):
        train(study, tmp_path, wrong_classes, progress=False)
    data = json.loads(study.read_text())
    data["modalities"], data["classes"] = ["mr", "ct"], data["classes"]
    for split in ("labelled", "unlabelled", "validation", "test"):
        for entry in data[split]:
            for kind in ("image", "label"):
                entry[kind] = {m: str(study.parent / p) for m, p in entry.get(kind, {}).items()}
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps(data))
    with pytest.raises(TrainError, match="modalities"):
        train(swapped, tmp_path / "x", micro_config(), progress=False)


def test_lr_warmup_then_cosine() -> None:
    assert [lr_factor(s, 4, 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 12) == pytest.approx(1.0)
    assert lr_factor(8, 4, 12) == pytest.approx(0.5)
    assert lr_factor(12, 4, 12) == pytest.approx(0.0)


def test_sam_med3d_initialisation_freezes_the_pretrained_parts(study: Path, tmp_path: Path) -> None:
    # A SAM-Med3D-layout file for the micro encoder: `image_encoder.*` keys, no adapters.
    torch.manual_seed(11)
    donor = build_cmc(MICRO).encoder_a.state_dict()
    sam_file = tmp_path / "sam_med3d.pth"
    torch.save({"model_state_dict": {f"image_encoder.{k}": v for k, v in donor.items()
                                     if ".adapter." not in k}}, sam_file)
    run_dir = tmp_path / "run"
    train(study, run_dir, micro_config(steps=1, val_every=1), init_sam_med3d=sam_file,
          progress=False)
    ckpt = load_checkpoint(run_dir / "checkpoint_last.pt")
    assert ckpt.metadata["training"]["init_sam_med3d"] == str(sam_file)
    trained = ckpt.state_dict
    for branch in ("encoder_a", "encoder_b"):
        assert torch.equal(trained[f"{branch}.patch_embed.proj.weight"],
                           donor["patch_embed.proj.weight"])  # frozen: loaded, never trained
        assert torch.equal(trained[f"{branch}.pos_embed"], donor["pos_embed"])
        assert not torch.equal(trained[f"{branch}.neck.0.weight"], donor["neck.0.weight"])


def test_cli_refuses_bad_options(study: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["train", "--data", str(study), "--out", str(tmp_path / "run")]
    for extra, message in ((["--single-modality", "c"], "is not a or b"),
                           (["--schedule", "linear"], "is not one of"),
                           (["--config", "huge"], "use a preset"),
                           (["--resume"], "cannot read config")):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2, result.output
        assert message in result.output
    assert not (tmp_path / "run").exists()


def test_cli_lists_match_the_config() -> None:
    """cli/train_cmd.py spells out the preset and schedule names (it must import without
    cmc_train on a serving host); they must stay the ones cmc_train.config knows."""
    from cmc_cli import train_cmd

    from cmc_train.config import MODEL_PRESETS, SCHEDULES, TRAIN_PRESETS

    assert train_cmd.PRESETS == tuple(MODEL_PRESETS) == tuple(TRAIN_PRESETS)
    assert train_cmd.SCHEDULES == SCHEDULES


@pytest.mark.slow
def test_default_recipe_leaves_no_class_dead(tmp_path: Path) -> None:
    """Every class is found in each single-modality mode after N steps of the default recipe
    (loss, crops, augmentation, schedules of `TrainConfig`, the tiny preset's lr) on a small
    study: a change that lets one mode never predict a class fails here, and the trainer's
    validation names such a class."""
    study = write_synthetic_study(tmp_path / "study", cases=8, seed=0, size=32,
                                  labelled_ratio=0.5, val_cases=2, test_cases=0)
    model = replace(MICRO, decoder_channels=8)
    config = RunConfig(model, PreprocessConfig(modalities=("ct", "mr"), spacing=(3.0, 3.0, 3.0)),
                       TrainConfig(steps=400, val_every=400, lr=3e-3), preset="micro")
    summary = train(study, tmp_path / "run", config, progress=False)
    validation = summary.last_validation
    assert validation is not None and validation["dead_classes"] == []
    for modality, scores in validation["dice"].items():
        assert min(scores) >= 0.3, f"{modality}: a class is barely found, Dice {scores}"


def test_a_config_written_before_the_dice_setting_keeps_its_loss(tmp_path: Path) -> None:
    """An older run's config.yaml (no `dice` key) resumes with the per-sample Dice it was
    trained with; a current one records the batch-foreground default."""
    current = micro_config()
    assert current.train.dice == "batch-foreground"
    data = current.to_dict()
    del data["train"]["dice"]
    assert RunConfig.from_dict(data).train.dice == "sample"
    assert RunConfig.from_dict(current.to_dict()) == current
