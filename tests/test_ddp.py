"""Data-parallel training under torchrun: two CPU processes (gloo), a few steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cmc_train.checkpoint import load_checkpoint
from cmc_train.config import ModelConfig, PreprocessConfig, RunConfig, TrainConfig
from cmc_train.run_state import iter_metrics
from cmc_train.synth import write_synthetic_study

REPO = Path(__file__).resolve().parents[1]
MICRO = ModelConfig(img_size=16, vit_patch=4, embed_dim=32, depth=2, num_heads=2,
                    neck_channels=16, adapter_dim=8, decoder_channels=4, num_classes=5)


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path: Path) -> None:
    study = write_synthetic_study(tmp_path / "study", cases=3, seed=0, size=32,
                                  labelled_ratio=0.34, val_cases=1, test_cases=0)
    config = tmp_path / "micro.yaml"
    RunConfig(MICRO, PreprocessConfig(modalities=("ct", "mr"), spacing=(3.0, 3.0, 3.0)),
              TrainConfig(steps=3, val_every=3, warmup_steps=1, batch_labelled=1,
                          batch_unlabelled=1), preset="micro").save_yaml(config)
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "cmc_cli.main", "train", "--data", str(study), "--out", str(run_dir),
         "--config", str(config), "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint_best.pt", "checkpoint_last.pt", "config.yaml", "metrics.jsonl"]
    records = list(iter_metrics(run_dir))  # rank 0 alone writes: each step exactly once
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 1), ("train", 2), ("train", 3), ("val", 3)]
    training = load_checkpoint(run_dir / "checkpoint_last.pt").metadata["training"]
    assert training["world_size"] == 2 and training["steps"] == 3
