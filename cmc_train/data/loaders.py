"""Step-indexed semi-supervised sampling and whole-volume evaluation data.

Why step-indexed: a batch is a pure function of (train.seed, step, rank), not of how
many batches were drawn before. Training is then reproducible, a resumed run sees exactly
the batches the uninterrupted one would have seen, and no DataLoader worker state has to
be checkpointed. The data are small, so every volume is pre-processed once (deterministic
transforms) and kept in memory; only cropping and augmentation run per step.

Each step draws four independent pools (pairs need not be the same patient, as in the
method): labelled a, labelled b, unlabelled a, unlabelled b. The unlabelled pools hold the
unlabelled entries' images *and* the labelled entries' images (standard in semi-supervised
learning: labelled volumes are also valid inputs for the consistency losses); their masks
are never loaded into the unlabelled pools.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import Compose

from cmc_common.contract import ROLES
from cmc_common.errors import CmcError
from cmc_train.config import PreprocessConfig, RunConfig
from cmc_train.data.datalist import SPLITS, Datalist, Entry
from cmc_train.data.transforms import (
    add_crop_indices,
    augmentation_transforms,
    deterministic_transforms,
)

POOLS: tuple[str, ...] = ("labelled_a", "labelled_b", "unlabelled_a", "unlabelled_b")


class SamplerError(CmcError, ValueError):
    """The datalist cannot feed semi-supervised training (e.g. a pool is empty)."""


def _plain(x: Any) -> torch.Tensor:
    """A MetaTensor's data as a plain tensor (no metadata tracking in the training loop)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class Preprocessor:
    """Deterministic pre-processing of datalist entries, one transform chain per use.

    Building MONAI's LoadImaged instantiates every image reader, so chains are built once
    per (modality, with_label) and reused for all entries.
    """

    def __init__(self, preprocess: PreprocessConfig) -> None:
        self.preprocess = preprocess
        self._chains: dict[tuple[str, bool], Compose] = {}

    def __call__(self, entry: Entry, modality: str, with_label: bool) -> dict[str, Any]:
        """Pre-processed {"image"[, "label"]} MetaTensors of one entry's modality."""
        key = (modality, with_label)
        if key not in self._chains:
            self._chains[key] = deterministic_transforms(self.preprocess, modality, with_label)
        files = {"image": str(entry.image[modality])}
        if with_label:
            files["label"] = str(entry.label[modality])
        return self._chains[key](files)


def _seed(*parts: int) -> int:
    """A 32-bit seed derived from integers (MONAI's set_random_state takes one integer)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@dataclass(frozen=True)
class _Pool:
    name: str
    samples: tuple[dict[str, Any], ...]
    augment: Compose


class SemiSupervisedSampler:
    """Deterministic batches for CMC training: `batch(step)` depends only on seed/step/rank.

    Indices: sample s = (step * world_size + rank) * B + i of a pool of n volumes is
    volume permutation_e[s mod n] with e = s // n, permutation_e drawn from
    (seed, pool, e): every volume is visited once per pool epoch, ranks take disjoint
    slices. Augmentation of that sample is seeded from (seed, step, rank, pool, i); with
    `train.pair_unlabelled` the unlabelled b pool uses unlabelled a's seed, so item i of both
    is flipped alike (MONAI seeds each transform of the chain on its own, so a crop that
    draws fewer numbers for a smaller volume does not shift the flips).
    """

    def __init__(self, datalist: Datalist, run_cfg: RunConfig, rank: int = 0,
                 world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        preprocess = run_cfg.preprocess
        if tuple(datalist.modalities) != tuple(preprocess.modalities):
            raise SamplerError(f"datalist modalities {list(datalist.modalities)} differ from "
                               f"the run's {list(preprocess.modalities)}")
        self.seed = run_cfg.train.seed
        self.rank, self.world_size = rank, world_size
        self.patch = run_cfg.model.img_size
        self._batch = {"labelled": run_cfg.train.batch_labelled,
                       "unlabelled": run_cfg.train.batch_unlabelled}
        load = Preprocessor(preprocess)
        jitter = run_cfg.train.intensity_jitter
        pools = []
        for suffix, modality in zip(ROLES, datalist.modalities, strict=True):
            labelled = [load(e, modality, with_label=True)
                        for e in datalist.labelled if modality in e.label]
            if not labelled:
                raise SamplerError(f"no labelled volume of modality {modality!r} in the "
                                   "datalist's 'labelled' split")
            unlabelled = [load(e, modality, with_label=False)
                          for e in datalist.unlabelled if modality in e.image]
            # Labelled volumes join the unlabelled pool (image only; the mask is dropped).
            unlabelled += [{"image": s["image"]} for s in labelled]
            unlabelled += [load(e, modality, with_label=False)
                           for e in datalist.labelled
                           if modality in e.image and modality not in e.label]
            classes = run_cfg.model.num_classes
            labelled_cache = [add_crop_indices(s, self.patch, classes)
                              for s in self._tensors(labelled)]
            pools.append(_Pool(f"labelled_{suffix}", tuple(labelled_cache),
                               augmentation_transforms(self.patch, True, classes,
                                                       run_cfg.train.fg_ratio, jitter)))
            pools.append(_Pool(f"unlabelled_{suffix}", self._tensors(unlabelled),
                               augmentation_transforms(self.patch, False,
                                                       intensity_jitter=jitter)))
        self._pools = {p.name: p for p in pools}
        # The pool whose augmentation seed each pool uses: its own, except that paired
        # unlabelled b patches repeat unlabelled a's draw (TrainConfig.pair_unlabelled).
        self._draw_as = {name: name for name in POOLS}
        if run_cfg.train.pair_unlabelled:
            self._draw_as["unlabelled_b"] = "unlabelled_a"

    @staticmethod
    def _tensors(samples: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], ...]:
        return tuple({k: _plain(v) for k, v in s.items()} for s in samples)

    def pool_sizes(self) -> dict[str, int]:
        """Number of volumes in each pool."""
        return {name: len(pool.samples) for name, pool in self._pools.items()}

    def indices(self, pool: str, step: int) -> list[int]:
        """Which volumes of `pool` batch `step` uses on this rank (see class docstring)."""
        n = len(self._pools[pool].samples)
        size = self._batch[pool.split("_")[0]]
        pool_id = POOLS.index(pool)
        first = (step * self.world_size + self.rank) * size
        out = []
        for s in range(first, first + size):
            epoch = s // n
            order = np.random.default_rng([self.seed, pool_id, epoch]).permutation(n)
            out.append(int(order[s % n]))
        return out

    def batch(self, step: int) -> dict[str, dict[str, torch.Tensor]]:
        """The four pools' patches of `step`: image [B, 1, S, S, S] float32, label long.

        MONAI's metadata tracking is switched off meanwhile (plain tensors are cached;
        tracking would only add overhead) and restored afterwards.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            return {name: self._pool_batch(name, step) for name in POOLS}
        finally:
            set_track_meta(tracking)

    def _pool_batch(self, name: str, step: int) -> dict[str, torch.Tensor]:
        pool, pool_id = self._pools[name], POOLS.index(self._draw_as[name])
        patches = []
        for i, index in enumerate(self.indices(name, step)):
            pool.augment.set_random_state(seed=_seed(self.seed, step, self.rank, pool_id, i))
            # The transforms return new tensors (crop, flips, intensity): the cache is never
            # written to, so no copy is needed here.
            result = pool.augment(dict(pool.samples[index]))
            patches.append(result[0] if isinstance(result, list) else result)
        stacked = {"image": torch.stack([_plain(p["image"]).float() for p in patches])}
        if "label" in patches[0]:
            stacked["label"] = torch.stack([_plain(p["label"]).round().long() for p in patches])
        return stacked


@dataclass(frozen=True)
class EvalVolume:
    """One pre-processed whole volume for evaluation (RAS, at the configured spacing)."""

    case_id: str
    modality: str
    image: torch.Tensor    # [1, D, H, W] float32
    label: torch.Tensor    # [1, D, H, W] long
    affine: np.ndarray     # 4x4 voxel-to-world (RAS, mm) after pre-processing


def validation_volumes(datalist: Datalist, preprocess: PreprocessConfig,
                       split: str = "validation") -> Iterator[EvalVolume]:
    """Yield every (case, modality) of `split` pre-processed exactly like training data."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    load = Preprocessor(preprocess)
    for entry in datalist.split(split):
        for modality in datalist.modalities:
            if modality not in entry.label:
                continue
            sample = load(entry, modality, with_label=True)
            image, affine = _image_and_affine(sample)
            yield EvalVolume(case_id=entry.id, modality=modality, image=image,
                             label=_plain(sample["label"]).round().long(), affine=affine)


def _image_and_affine(sample: dict[str, Any]) -> tuple[torch.Tensor, np.ndarray]:
    """A pre-processed sample's image as a plain float32 tensor and its affine (float64)."""
    return (_plain(sample["image"]).float(),
            np.asarray(_affine(sample["image"]), dtype=np.float64))


def _affine(x: Any) -> Any:
    affine = getattr(x, "affine", None)
    if affine is None:
        raise TypeError("pre-processing did not return a MetaTensor with an affine")
    return affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else affine


@dataclass(frozen=True)
class ImagePair:
    """One case's two pre-processed images, each on its own grid, and a's label where the
    case has one: what quality control is calibrated on (`cmc_train.qc_reference`), which
    needs no label except to report the fused answer's Dice."""

    case_id: str
    image_a: torch.Tensor          # [1, D, H, W] float32
    affine_a: np.ndarray           # 4x4 voxel-to-world (RAS, mm) after pre-processing
    image_b: torch.Tensor
    affine_b: np.ndarray
    label_a: torch.Tensor | None   # [1, D, H, W] long

    @classmethod
    def from_volumes(cls, a: EvalVolume, b: EvalVolume) -> ImagePair:
        return cls(a.case_id, a.image, a.affine, b.image, b.affine, a.label)


def image_pairs(datalist: Datalist, preprocess: PreprocessConfig, split: str
                ) -> Iterator[ImagePair]:
    """Every case of `split` with both modalities, pre-processed exactly like training data,
    one at a time (a calibration split may be large); a's label loaded where present."""
    load = Preprocessor(preprocess)
    a, b = datalist.modalities
    for entry in datalist.split(split):
        if a not in entry.image or b not in entry.image:
            continue
        sample_a = load(entry, a, with_label=a in entry.label)
        sample_b = load(entry, b, with_label=False)
        label = sample_a.get("label")
        yield ImagePair(entry.id, *_image_and_affine(sample_a), *_image_and_affine(sample_b),
                        None if label is None else _plain(label).round().long())
