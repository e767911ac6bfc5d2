"""Pre-processing, augmentation and the step-indexed semi-supervised sampler."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cmc_train.config import ModelConfig, PreprocessConfig, RunConfig, TrainConfig
from cmc_train.data.datalist import Datalist
from cmc_train.data.loaders import (
    POOLS,
    SamplerError,
    SemiSupervisedSampler,
    validation_volumes,
)
from cmc_train.data.transforms import (
    add_crop_indices,
    augmentation_transforms,
    crop_ratios,
    deterministic_transforms,
)
from cmc_train.synth import write_synthetic_study

PRE = PreprocessConfig(modalities=("ct", "mr"), spacing=(2.0, 2.0, 2.0))


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(data, affine), path)
    return str(path)


@pytest.fixture
def lps_volume(tmp_path: Path) -> tuple[dict[str, str], np.ndarray]:
    """A CT-like volume stored L-P-S at 1 x 1.5 x 3 mm with an organ cube at a known place."""
    affine = np.array([[-1.0, 0, 0, 40], [0, -1.5, 0, 30], [0, 0, 3.0, -20], [0, 0, 0, 1]])
    image = np.full((40, 32, 16), -1000, dtype=np.int16)
    image[5:35, 4:28, 2:14] = 37  # soft tissue: (37 + 175) / 425 ~ 0.5
    label = np.zeros(image.shape, dtype=np.uint8)
    label[10:18, 8:16, 4:8] = 3
    image[label == 3] = 1000  # clipped to 1 by the window
    centre = affine[:3, :3] @ np.argwhere(label == 3).mean(axis=0) + affine[:3, 3]
    return {"image": _nifti(tmp_path / "ct.nii.gz", image, affine),
            "label": _nifti(tmp_path / "ct_label.nii.gz", label, affine)}, centre


def test_deterministic_ct_orientation_spacing_window(
        lps_volume: tuple[dict[str, str], np.ndarray]) -> None:
    files, organ_centre = lps_volume
    out = deterministic_transforms(PRE, "ct", with_label=True)(files)
    image, label = out["image"], out["label"]
    affine = np.asarray(image.affine)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.diag(affine)[:3], [2.0, 2.0, 2.0])
    np.testing.assert_allclose(np.asarray(label.affine), affine)
    assert image.shape[0] == 1 and image.shape == label.shape and image.dtype == torch.float32
    # The organ is where it was in the world (orientation and resampling kept geometry).
    voxels = np.argwhere(label[0].numpy() == 3).mean(axis=0)
    np.testing.assert_allclose(affine[:3, :3] @ voxels + affine[:3, 3], organ_centre, atol=1.0)
    assert set(np.unique(label.numpy())) <= {0.0, 3.0}  # nearest neighbour, no blends
    values = image.numpy()
    assert values.min() == 0.0 and values.max() == 1.0  # air clipped to 0, 1000 HU to 1
    assert np.median(values[(values > 0.2) & (values < 0.8)]) == pytest.approx(212 / 425, abs=0.01)


def test_deterministic_zscore_keeps_zeros(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = np.zeros((24, 24, 24), dtype=np.float32)
    data[4:20, 4:20, 4:20] = rng.uniform(100, 500, size=(16, 16, 16))
    files = {"image": _nifti(tmp_path / "mr.nii.gz", data, np.diag([2.0, 2.0, 2.0, 1.0]))}
    image = deterministic_transforms(PRE, "mr", with_label=False)(files)["image"].numpy()
    inside = image != 0
    assert inside.sum() == (data != 0).sum()  # spacing unchanged here: same support
    assert image[inside].mean() == pytest.approx(0.0, abs=1e-4)
    assert image[inside].std() == pytest.approx(1.0, abs=1e-3)
    assert np.all(image[0, 0] == 0)


def test_unknown_modality_is_refused() -> None:
    with pytest.raises(ValueError, match="no normalisation"):
        deterministic_transforms(PRE, "pet", with_label=False)


def _sample(shape: tuple[int, int, int], fg: tuple[slice, ...]) -> dict[str, torch.Tensor]:
    label = torch.zeros((1, *shape))
    label[(slice(None), *fg)] = 2
    return {"image": label.clone() + 1.0, "label": label}


def test_augmentation_pads_crops_and_keeps_label_aligned() -> None:
    aug = augmentation_transforms(16, with_label=True, num_classes=3, fg_ratio=0.5)
    for seed in range(8):
        aug.set_random_state(seed=seed)
        out = aug(_sample((12, 20, 24), (slice(2, 8), slice(3, 9), slice(4, 12))))[0]
        image, label = out["image"], out["label"]
        assert image.shape == label.shape == (1, 16, 16, 16)
        # Image = label + 1 before the intensity changes: the organ stays where the label is.
        organ = image > image[label == 0].max()
        assert torch.equal(organ, label == 2)
    unlabelled = augmentation_transforms(16, with_label=False)
    out = unlabelled({"image": torch.rand(1, 30, 30, 30)})
    assert set(out) == {"image"} and out["image"].shape == (1, 16, 16, 16)


@pytest.mark.parametrize("fg_ratio", [0.0, 0.5, 1.0])
def test_labelled_crops_contain_foreground_at_the_requested_ratio(fg_ratio: float) -> None:
    aug = augmentation_transforms(8, with_label=True, num_classes=3, fg_ratio=fg_ratio)
    # A small organ in a corner; indices precomputed once, as the sampler does.
    sample = add_crop_indices(_sample((32, 32, 32), (slice(28, 31),) * 3), 8, 3)
    hits = 0
    draws = 80
    for seed in range(draws):
        aug.set_random_state(seed=seed)
        hits += int((aug(dict(sample))[0]["label"] > 0).any())
    # Background-centred crops reach the 4^3 organ only rarely.
    assert abs(hits / draws - fg_ratio) < 0.15, hits / draws


def test_crops_share_the_foreground_equally_between_classes() -> None:
    # A large class-1 organ and a tiny class-2 one (1/64 of its size): a plain foreground crop
    # would centre on the tiny one in ~1.5% of the draws, the class-balanced one in half.
    label = torch.zeros((1, 48, 48, 48))
    label[:, 4:20, 4:20, 4:20] = 1
    label[:, 40:44, 40:44, 40:44] = 2
    sample = add_crop_indices({"image": label.clone(), "label": label}, 8, 3)
    aug = augmentation_transforms(8, with_label=True, num_classes=3, fg_ratio=1.0)
    draws, small = 80, 0
    for seed in range(draws):
        aug.set_random_state(seed=seed)
        small += int((aug(dict(sample))[0]["label"] == 2).any())
    assert abs(small / draws - 0.5) < 0.15, small / draws


def test_labelled_augmentation_needs_the_class_count() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        augmentation_transforms(8, with_label=True)


def test_crop_ratios() -> None:
    assert crop_ratios(5, 0.5) == [0.5, 0.125, 0.125, 0.125, 0.125]
    assert crop_ratios(2, 1.0) == [0.0, 1.0]
    with pytest.raises(ValueError, match="fg_ratio"):
        crop_ratios(3, 1.5)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Datalist:
    out = tmp_path_factory.mktemp("sampler")
    path = write_synthetic_study(out, cases=4, seed=2, size=32, labelled_ratio=0.5,
                                 val_cases=1, test_cases=0)
    return Datalist.load(path)


def _run_cfg(seed: int = 0, fg_ratio: float = 0.5) -> RunConfig:
    model = ModelConfig(img_size=16, vit_patch=4, embed_dim=32, depth=2, num_heads=2,
                        neck_channels=16, adapter_dim=4, decoder_channels=8, num_classes=5)
    return RunConfig(model=model, preprocess=PreprocessConfig(spacing=(3.0, 3.0, 3.0)),
                     train=TrainConfig(seed=seed, batch_labelled=2, batch_unlabelled=3,
                                       fg_ratio=fg_ratio))


def _equal(x: dict[str, dict[str, torch.Tensor]], y: dict[str, dict[str, torch.Tensor]]) -> bool:
    return all(torch.equal(x[p][k], y[p][k]) for p in x for k in x[p])


def test_sampler_batches_are_a_pure_function_of_seed_step_rank(study: Datalist) -> None:
    sampler = SemiSupervisedSampler(study, _run_cfg())
    assert sampler.pool_sizes() == {"labelled_a": 2, "labelled_b": 2,
                                    "unlabelled_a": 4, "unlabelled_b": 4}
    batch = sampler.batch(5)
    assert set(batch) == set(POOLS)
    assert batch["labelled_a"]["image"].shape == (2, 1, 16, 16, 16)
    assert batch["labelled_a"]["label"].dtype == torch.long
    assert batch["unlabelled_b"]["image"].shape == (3, 1, 16, 16, 16)
    assert "label" not in batch["unlabelled_a"]
    sampler.batch(6)
    # Same step again, and from a fresh sampler (an exact resume): identical batch.
    assert _equal(batch, sampler.batch(5))
    assert _equal(batch, SemiSupervisedSampler(study, _run_cfg()).batch(5))
    assert not _equal(batch, sampler.batch(6))
    assert not _equal(batch, SemiSupervisedSampler(study, _run_cfg(), rank=1,
                                                   world_size=2).batch(5))
    assert not _equal(batch, SemiSupervisedSampler(study, _run_cfg(seed=1)).batch(5))


def test_sampler_visits_every_volume_once_per_pool_epoch(study: Datalist) -> None:
    sampler = SemiSupervisedSampler(study, _run_cfg())
    seen = sampler.indices("unlabelled_a", 0) + sampler.indices("unlabelled_a", 1)[:1]
    assert sorted(seen) == [0, 1, 2, 3]
    rank0 = SemiSupervisedSampler(study, _run_cfg(), rank=0, world_size=2)
    rank1 = SemiSupervisedSampler(study, _run_cfg(), rank=1, world_size=2)
    # 2 ranks x 2 samples from 2 volumes: two pool epochs, each volume once per epoch.
    assert sorted(rank0.indices("labelled_b", 0) + rank1.indices("labelled_b", 0)) == [0, 0, 1, 1]


def test_sampler_labelled_patches_hold_foreground(study: Datalist) -> None:
    sampler = SemiSupervisedSampler(study, _run_cfg(fg_ratio=1.0))
    for step in range(3):
        batch = sampler.batch(step)
        for pool in ("labelled_a", "labelled_b"):
            assert all(bool((lab > 0).any()) for lab in batch[pool]["label"])


def test_sampler_needs_labelled_volumes_of_both_modalities(study: Datalist) -> None:
    with pytest.raises(SamplerError, match="no labelled volume"):
        SemiSupervisedSampler(Datalist(study.modalities, study.classes,
                                       unlabelled=study.unlabelled), _run_cfg())
    other = RunConfig(model=_run_cfg().model, preprocess=PreprocessConfig(modalities=("t1", "t2")),
                      train=TrainConfig())
    with pytest.raises(SamplerError, match="modalities"):
        SemiSupervisedSampler(study, other)


def test_validation_volumes_are_whole_preprocessed_cases(study: Datalist) -> None:
    volumes = list(validation_volumes(study, _run_cfg().preprocess))
    assert [(v.case_id, v.modality) for v in volumes] == [("case_0004", "ct"),
                                                          ("case_0004", "mr")]
    for v in volumes:
        assert v.image.shape == v.label.shape and v.image.shape[0] == 1
        assert v.label.dtype == torch.long and int(v.label.max()) == 4
        np.testing.assert_allclose(np.diag(v.affine)[:3], [3.0, 3.0, 3.0])
    with pytest.raises(ValueError, match="unknown split"):
        list(validation_volumes(study, _run_cfg().preprocess, split="train"))


def _one_image_two_modalities(study: Datalist, tmp_path: Path) -> Datalist:
    """A datalist whose two modalities are the same CT file (normalised alike: neither is
    named ct), so two patches are equal exactly when they were augmented alike."""
    case = study.labelled[0]
    image, label = str(case.image["ct"]), str(case.label["ct"])
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({
        "modalities": ["t1", "t2"], "classes": list(study.classes),
        "labelled": [{"id": case.id, "image": {"t1": image, "t2": image},
                      "label": {"t1": label, "t2": label}}],
        "unlabelled": [], "validation": [], "test": []}))
    return Datalist.load(path)


@pytest.mark.parametrize("paired", [False, True])
def test_paired_unlabelled_patches_share_one_augmentation(study: Datalist, tmp_path: Path,
                                                          paired: bool) -> None:
    datalist = _one_image_two_modalities(study, tmp_path)
    cfg = _run_cfg()
    cfg = replace(cfg, preprocess=PreprocessConfig(modalities=("t1", "t2"),
                                                   spacing=(3.0, 3.0, 3.0)),
                  train=replace(cfg.train, pair_unlabelled=paired))
    sampler = SemiSupervisedSampler(datalist, cfg)
    same = [torch.equal(b["unlabelled_a"]["image"], b["unlabelled_b"]["image"])
            for b in map(sampler.batch, range(4))]
    assert same == [paired] * 4
