"""Reference arms without training: multi-class intensity thresholds and a label atlas.

Why: a benchmark table needs a floor. A trained network that does not beat intensity
thresholds, or a majority vote of the labelled volumes' label maps, has learnt nothing a
radiologist's window or an average anatomy would not give; such a result must be visible,
not hidden. Both arms see exactly what the trained arms see (the labelled split, the same
pre-processing: RAS, the run's spacing and normalisation) and are scored the same way
(`cmc_train.evaluate.score_predictions` on the pre-processed grid), so their rows sit in the
same table.

- Thresholds (`ThresholdModel`), per modality: multi-level Otsu thresholds (maximal
  between-class variance, exact dynamic programme over a histogram; numpy only) fitted on
  all voxels of the labelled volumes, then each foreground class gets the intensity region
  whose mask overlaps it best (Dice on the labelled volumes), at most one region per class.
  Not a majority vote per region: background outnumbers every organ in every intensity
  range of an abdomen, so a majority vote labels everything background.
- Atlas (`atlas_labels`): every labelled label map (both modalities: labels describe
  anatomy, not contrast) placed on the test volume's grid with the centres of the two
  fields of view superposed (no registration: scanner coordinates of different patients
  are not comparable, fields of view are roughly centred on the patient), nearest
  neighbour; each voxel takes the most frequent class (ties: the lower class index).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from cmc_common.contract import ROLES
from cmc_train.config import PreprocessConfig
from cmc_train.data.datalist import Datalist
from cmc_train.data.loaders import EvalVolume, validation_volumes
from cmc_train.evaluate import json_ready, score_predictions, spacing_of
from cmc_train.postprocess_choice import CasePrediction

ARMS = ("thresholds", "atlas")


def multi_otsu(values: np.ndarray, levels: int, bins: int = 128) -> np.ndarray:
    """The `levels - 1` thresholds that split `values` into `levels` intensity classes of
    maximal between-class variance (multi-level Otsu on a `bins`-bin histogram, exact)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if levels < 2:
        raise ValueError(f"need at least 2 levels, got {levels}")
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("thresholds need a non-empty set of finite intensities")
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.full(levels - 1, lo)
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.concatenate([[0.0], np.cumsum(counts)])            # W[j]: bins < j
    moment = np.concatenate([[0.0], np.cumsum(counts * centres)])  # M[j]
    # score[k, j]: best sum of M^2 / W over k + 1 classes covering bins [0, j).
    score = np.full((levels, bins + 1), -np.inf)
    choice = np.zeros((levels, bins + 1), dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        score[0, 1:] = moment[1:] ** 2 / weight[1:]
        score[0, 1:][weight[1:] == 0] = 0.0
        for k in range(1, levels):
            for j in range(k + 1, bins + 1):
                i = np.arange(k, j)
                w, m = weight[j] - weight[i], moment[j] - moment[i]
                gain = np.where(w > 0, m ** 2 / np.where(w > 0, w, 1.0), 0.0)
                total = score[k - 1, i] + gain
                best = int(np.argmax(total))
                score[k, j], choice[k, j] = total[best], i[best]
    cuts, j = [], bins
    for k in range(levels - 1, 0, -1):
        j = choice[k, j]
        cuts.append(edges[j])
    return np.asarray(cuts[::-1])


@dataclass(frozen=True)
class ThresholdModel:
    """Intensity thresholds of one modality and the class each intensity region stands for."""

    thresholds: np.ndarray
    region_class: np.ndarray  # region index -> class label

    @classmethod
    def fit(cls, volumes: Sequence[EvalVolume], num_classes: int,
            levels: int | None = None) -> ThresholdModel:
        """Thresholds from the labelled `volumes` of one modality; `levels` intensity regions
        (default: one per class plus one, for the air / fat / soft-tissue ranges)."""
        if not volumes:
            raise ValueError("thresholds need at least one labelled volume")
        images = np.concatenate([v.image.numpy().ravel() for v in volumes])
        labels = np.concatenate([v.label.numpy().ravel() for v in volumes])
        thresholds = multi_otsu(images, levels or num_classes + 1)
        regions = np.digitize(images, thresholds)
        n_regions = len(thresholds) + 1
        overlap = np.bincount(regions * num_classes + labels,
                              minlength=n_regions * num_classes).reshape(n_regions, num_classes)
        region_size, class_size = overlap.sum(axis=1), overlap.sum(axis=0)
        dice = 2 * overlap / np.maximum(region_size[:, None] + class_size[None, :], 1)
        dice[:, 0] = -1.0  # background is what no class claims
        region_class = np.zeros(n_regions, dtype=np.uint8)
        taken: set[int] = set()
        for flat in np.argsort(dice, axis=None)[::-1]:
            region, label = divmod(int(flat), num_classes)
            if dice[region, label] <= 0:
                break
            if region_class[region] == 0 and label not in taken:
                region_class[region] = label
                taken.add(label)
        return cls(thresholds, region_class)

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Class labels (uint8) of a pre-processed image of this modality."""
        return self.region_class[np.digitize(image, self.thresholds)]


def _centre(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World position (mm) of the centre of a grid's field of view."""
    return affine[:3, :3] @ ((np.asarray(shape, np.float64) - 1) / 2) + affine[:3, 3]


def atlas_labels(atlas: Sequence[EvalVolume], target_shape: Sequence[int],
                 target_affine: np.ndarray, num_classes: int) -> np.ndarray:
    """Majority vote (uint8) of the `atlas` label maps on the target grid, the centres of
    the fields of view superposed, nearest neighbour (outside an atlas volume: background)."""
    if not atlas:
        raise ValueError("the atlas needs at least one labelled volume")
    votes = np.zeros((num_classes, *target_shape), dtype=np.int32)
    idx = np.indices(target_shape, dtype=np.float64).reshape(3, -1)
    target_world = target_affine[:3, :3] @ idx + target_affine[:3, 3:4]
    target_centre = _centre(target_shape, target_affine)
    for vol in atlas:
        label = vol.label[0].numpy().astype(np.uint8)
        shift = _centre(label.shape, vol.affine) - target_centre
        src = np.linalg.solve(vol.affine[:3, :3], target_world + shift[:, None]
                              - vol.affine[:3, 3:4])
        sampled = ndimage.map_coordinates(label, src, order=0, mode="constant", cval=0)
        sampled = sampled.reshape(tuple(target_shape))
        for label_value in range(num_classes):
            votes[label_value] += sampled == label_value
    return np.argmax(votes, axis=0).astype(np.uint8)


def reference_arm(arm: str, datalist_path: Path | str, preprocess: PreprocessConfig,
                  split: str = "test", levels: int | None = None) -> dict[str, Any]:
    """Score reference arm `arm` ("thresholds" | "atlas") on `split`, fitted on the
    labelled split; returns {"arm", "split", "modes": {"a": ..., "b": ...}} with each mode
    scored as `cmc evaluate` scores a network's single-modality mode (Dice, HD95 per class,
    mean foreground Dice), without post-processing."""
    if arm not in ARMS:
        raise ValueError(f"unknown reference arm {arm!r}; choose from {', '.join(ARMS)}")
    datalist = Datalist.load(datalist_path)
    classes = list(datalist.classes)
    labelled = list(validation_volumes(datalist, preprocess, "labelled"))
    if not labelled:
        raise ValueError(f"{datalist_path}: no labelled volumes to fit the {arm} arm on")
    tests = list(validation_volumes(datalist, preprocess, split))
    modes: dict[str, Any] = {}
    for mode, modality in zip(ROLES, datalist.modalities, strict=True):
        own = [v for v in labelled if v.modality == modality]
        targets = [v for v in tests if v.modality == modality]
        if not targets or (arm == "thresholds" and not own):
            modes[mode] = {"modality": modality, "num_cases": 0,
                           "skipped": f"no labelled {modality} volume to fit or score"}
            continue
        model = ThresholdModel.fit(own, len(classes), levels) if arm == "thresholds" else None
        predictions = []
        for vol in targets:
            image = vol.image[0].numpy()
            pred = model.predict(image) if model is not None else \
                atlas_labels(labelled, image.shape, vol.affine, len(classes))
            predictions.append(CasePrediction(vol.case_id, pred,
                                              vol.label[0].numpy().astype(np.uint8),
                                              spacing_of(vol.affine)))
        modes[mode] = {"modality": modality, **score_predictions(predictions, [], classes)}
    return json_ready({"arm": arm, "split": split, "modes": modes})
