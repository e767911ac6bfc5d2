"""Checkpoint round-trip, weights-only loading and the errors for files that are not ours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cmc_train.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    build_metadata,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from cmc_train.config import ModelConfig, PreprocessConfig
from cmc_train.network import build_cmc

MICRO = ModelConfig(img_size=16, vit_patch=4, embed_dim=32, depth=2, num_heads=2,
                    neck_channels=16, adapter_dim=8, decoder_channels=4, num_classes=3)
PREPROCESS = PreprocessConfig(modalities=("ct", "mr"), spacing=(2.0, 2.0, 3.0))
CLASSES = ["background", "liver", "spleen"]


def _metadata() -> dict:
    return build_metadata(MICRO, PREPROCESS, CLASSES, {"steps": 3, "seed": 7, "best_metric": 0.5})


def test_round_trip_with_trainer_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_cmc(MICRO)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.zeros(1, 1, 16, 16, 16), torch.zeros(1, 1, 16, 16, 16)).logits_a.sum().backward()
    optimizer.step()
    trainer_state = {"optimizer": optimizer.state_dict(), "step": 3,
                     "torch_rng": torch.get_rng_state()}
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, net.state_dict(), _metadata(), trainer_state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temp file left

    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "cmc-checkpoint" and raw["format_version"] == FORMAT_VERSION
    assert json.loads(raw["metadata_json"])["classes"] == CLASSES

    loaded = load_checkpoint(path)
    assert loaded.metadata["model"] == MICRO.to_dict()
    assert loaded.metadata["preprocessing"] == PREPROCESS.to_dict()
    assert loaded.metadata["modalities"] == ["ct", "mr"]
    assert loaded.trainer_state is not None and loaded.trainer_state["step"] == 3
    assert torch.equal(loaded.trainer_state["torch_rng"], torch.get_rng_state())
    restored = torch.optim.AdamW(build_cmc(MICRO).parameters(), lr=1e-3)
    restored.load_state_dict(loaded.trainer_state["optimizer"])

    model, metadata = load_model(path)
    assert not model.training and metadata["training"]["seed"] == 7
    for key, value in net.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_weights_only_file_has_no_trainer_state(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    save_checkpoint(path, build_cmc(MICRO).state_dict(), _metadata())
    assert load_checkpoint(path).trainer_state is None


def test_metadata_checks_class_count() -> None:
    with pytest.raises(ValueError, match="class names"):
        build_metadata(MICRO, PREPROCESS, ["background"], {})


def _expect_error(path: Path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    assert path.name in str(info.value)


def test_errors_name_the_file(tmp_path: Path) -> None:
    _expect_error(tmp_path / "missing.pt", "no such")

    foreign = tmp_path / "foreign.pt"
    torch.save({"model_state_dict": {}}, foreign)
    _expect_error(foreign, "not a CMC checkpoint")

    future = tmp_path / "future.pt"
    torch.save({"format": "cmc-checkpoint", "format_version": 99, "state_dict": {},
                "metadata_json": "{}"}, future)
    _expect_error(future, "format_version 99")

    good = tmp_path / "good.pt"
    save_checkpoint(good, build_cmc(MICRO).state_dict(), _metadata())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    _expect_error(truncated, "not a readable torch checkpoint")

    text = tmp_path / "notes.pt"
    text.write_text("hello")
    _expect_error(text, "not a readable torch checkpoint")

    bad_meta = tmp_path / "bad_meta.pt"
    torch.save({"format": "cmc-checkpoint", "format_version": 1, "state_dict": {},
                "metadata_json": "{not json"}, bad_meta)
    _expect_error(bad_meta, "metadata_json")


def test_load_model_rejects_weights_of_another_shape(tmp_path: Path) -> None:
    path = tmp_path / "mismatch.pt"
    bigger = ModelConfig(**{**MICRO.to_dict(), "embed_dim": 64, "global_attn_indexes": ()})
    save_checkpoint(path, build_cmc(bigger).state_dict(), _metadata())  # metadata says MICRO
    with pytest.raises(CheckpointError, match="mismatch.pt: weights do not match"):
        load_model(path)
