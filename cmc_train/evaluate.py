"""Dice and HD95 of a CMC network on whole pre-processed volumes (validation and `cmc evaluate`).

Where metrics are computed: on the pre-processed grid (RAS, the checkpoint's spacing), the
space the network predicts in, as MONAI-style validation does; HD95 uses that spacing in mm.

Modes:
- "a" / "b" (single modality): every labelled volume of that modality, its image fed to both
  branches, compared with its own label.
- "fused": every case with both modalities. The prediction is made on modality a's grid and
  compared with a's label; b's pre-processed image is resampled onto a's pre-processed grid
  by world (RAS) position, trilinear, border values beyond b's field of view. `cmc segment`
  differs in order and fill: it resamples b's raw image into a's world grid before
  pre-processing and fills beyond b's field of view with b's minimum
  (`cmc_serve.preprocess.resample_to_reference`), so near the edge of b's field of view the
  two can disagree. No registration is attempted: where the two scans are not aligned
  (different sessions, the synthetic study's "patient moved"), fused Dice measures how the
  model copes with that.

Post-processing (`cmc_serve.postprocess`): the checkpoint's recorded choice is applied
before scoring unless asked not to, so the numbers are those `cmc segment` will give;
`choose_postprocessing=True` chooses it here instead (`cmc_train.postprocess_choice`), on
this split, and reports the scores with and without it.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cmc_common.contract import MODES, Mode
from cmc_common.errors import CmcError
from cmc_serve import postprocess
from cmc_train.checkpoint import load_model
from cmc_train.config import PreprocessConfig
from cmc_train.data.checks import check_data
from cmc_train.data.datalist import Datalist
from cmc_train.data.loaders import EvalVolume, validation_volumes
from cmc_train.metrics import per_class_metrics
from cmc_train.network import CMCNet
from cmc_train.postprocess_choice import CasePrediction, choose_operations
from cmc_train.progress import Reporter
from cmc_train.sliding_window import predict_labels

_AFFINE_TOL = 1e-3


class EvaluationError(CmcError, ValueError):
    """Evaluation cannot run on these inputs (message names the file and the problem)."""


@dataclass(frozen=True)
class ValidationSet:
    """Pre-processed labelled volumes of one split, loaded once and kept in memory."""

    modalities: tuple[str, str]
    classes: tuple[str, ...]   # background first
    volumes: tuple[EvalVolume, ...]

    @classmethod
    def from_datalist(cls, datalist: Datalist, preprocess: PreprocessConfig,
                      split: str = "validation") -> ValidationSet:
        volumes = tuple(validation_volumes(datalist, preprocess, split))
        return cls(tuple(datalist.modalities), tuple(datalist.classes), volumes)  # type: ignore[arg-type]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def of_modality(self, modality: str) -> list[EvalVolume]:
        return [v for v in self.volumes if v.modality == modality]

    def count(self, modes: Sequence[str]) -> int:
        """How many whole-volume predictions scoring `modes` takes."""
        return sum(len(self.pairs()) if mode == Mode.FUSED else
                   len(self.of_modality(self.modalities[0 if mode == Mode.A else 1]))
                   for mode in modes)

    def pairs(self) -> list[tuple[EvalVolume, EvalVolume]]:
        """(a, b) volumes of every case that has both modalities."""
        by_case: dict[str, dict[str, EvalVolume]] = defaultdict(dict)
        for v in self.volumes:
            by_case[v.case_id][v.modality] = v
        a, b = self.modalities
        return [(vols[a], vols[b]) for vols in by_case.values() if a in vols and b in vols]


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel edge lengths (mm) of a voxel-to-world affine."""
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))


def resample_onto(image: torch.Tensor, src_affine: np.ndarray, dst_shape: Sequence[int],
                  dst_affine: np.ndarray) -> torch.Tensor:
    """Trilinear resampling of a [D, H, W] image onto another grid by world position
    (values beyond the source clamp to its border)."""
    same_grid = tuple(image.shape) == tuple(dst_shape) and np.allclose(
        src_affine, dst_affine, atol=_AFFINE_TOL)
    if same_grid:
        return image
    dst_to_src = np.linalg.solve(np.asarray(src_affine, np.float64), np.asarray(dst_affine, np.float64))
    axes = [torch.arange(n, dtype=torch.float64) for n in dst_shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # [D, H, W, 3] dst voxels
    xform = torch.from_numpy(dst_to_src)
    src = idx @ xform[:3, :3].T + xform[:3, 3]
    size = torch.tensor(image.shape, dtype=torch.float64)
    norm = 2.0 * src / (size - 1).clamp(min=1) - 1.0  # align_corners=True convention
    grid = norm.flip(-1).float()[None]  # grid_sample wants (x=W, y=H, z=D)
    out = F.grid_sample(image.float()[None, None], grid, mode="bilinear",
                        padding_mode="border", align_corners=True)
    return out[0, 0]


def _fg_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def validate(net: CMCNet, val_set: ValidationSet, modes: Sequence[str], patch_size: int,
             device: torch.device, on_volume: Callable[[], None] | None = None
             ) -> dict[str, Any]:
    """Mean foreground Dice per class of single-modality modes (the training's model
    selection): {"dice": {modality: [per foreground class]}, "mean_fg_dice": float}.
    `on_volume` is called after each volume (progress)."""
    per_modality: dict[str, list[float]] = {}
    for mode in modes:
        modality = val_set.modalities[0 if mode == Mode.A else 1]
        scores = []
        for vol in val_set.of_modality(modality):
            scores.append(_case_metrics(net, vol, mode, patch_size, device,
                                        val_set.num_classes)["dice"])
            if on_volume is not None:
                on_volume()
        if scores:
            per_modality[modality] = [float(x) for x in np.mean(scores, axis=0)]
    if not per_modality:
        names = [val_set.modalities[0 if mode == Mode.A else 1] for mode in modes]
        raise EvaluationError(f"the validation split has no labelled volume of {names}, the "
                              "modalities being trained")
    mean_fg = float(np.mean([np.mean(v) for v in per_modality.values()]))
    return {"dice": per_modality, "mean_fg_dice": mean_fg,
            "dead_classes": dead_classes(per_modality, val_set.classes[1:])}


def dead_classes(per_modality: dict[str, list[float]], fg_classes: Sequence[str]) -> list[str]:
    """"MODALITY CLASS" for every foreground class whose Dice is 0 on every validation volume
    of that modality: the mode never finds it, a defect to fix (class balance, schedule,
    loss), not a score to average away."""
    return [f"{modality} {name}" for modality, scores in per_modality.items()
            for name, score in zip(fg_classes, scores, strict=True) if score == 0.0]


def _case_metrics(net: CMCNet, vol: EvalVolume, mode: str, patch_size: int,
                  device: torch.device, num_classes: int,
                  other: EvalVolume | None = None) -> dict[str, list[float]]:
    case = _case_prediction(net, vol, mode, patch_size, device, other)
    return per_class_metrics(case.pred, case.ref, num_classes, case.spacing)


def _case_prediction(net: CMCNet, vol: EvalVolume, mode: str, patch_size: int,
                     device: torch.device, other: EvalVolume | None = None) -> CasePrediction:
    image = vol.image[0]
    if mode == Mode.FUSED:
        assert other is not None
        image_b = resample_onto(other.image[0], other.affine, image.shape, vol.affine)
        pred = predict_labels(net, image, image_b, Mode.FUSED, patch_size, device)
    elif mode == Mode.A:
        pred = predict_labels(net, image, None, Mode.A, patch_size, device)
    else:
        pred = predict_labels(net, None, image, Mode.B, patch_size, device)
    ref = vol.label[0].numpy().astype(np.uint8)
    return CasePrediction(vol.case_id, np.asarray(pred, dtype=np.uint8), ref,
                          spacing_of(vol.affine))


def _summarise(cases: dict[str, dict[str, list[float]]], fg_classes: Sequence[str]) -> dict[str, Any]:
    """Per-case values and per-class means. HD95 is undefined (NaN) where exactly one of
    prediction and reference has the class; class means skip those cases, and the mean
    over classes skips classes with no defined case, so `hd95_undefined` (per class) and
    `hd95_undefined_total` (case-class pairs) say what the mean leaves out."""
    dice = np.array([c["dice"] for c in cases.values()], dtype=np.float64)
    hd = np.array([c["hd95"] for c in cases.values()], dtype=np.float64)
    mean_dice = [float(x) for x in dice.mean(axis=0)]
    mean_hd = [_fg_mean(list(hd[:, k])) for k in range(len(fg_classes))]
    return {
        "num_cases": len(cases),
        "dice": dict(zip(fg_classes, mean_dice, strict=True)),
        "hd95_mm": dict(zip(fg_classes, mean_hd, strict=True)),
        "mean_fg_dice": float(np.mean(mean_dice)),
        "mean_fg_hd95_mm": _fg_mean(mean_hd),
        "hd95_undefined": {name: int(np.isnan(hd[:, k]).sum())
                           for k, name in enumerate(fg_classes)},
        "hd95_undefined_total": int(np.isnan(hd).sum()),
        "hd95_pairs": int(hd.size),
        "cases": {cid: {"dice": dict(zip(fg_classes, c["dice"], strict=True)),
                        "hd95_mm": dict(zip(fg_classes, c["hd95"], strict=True))}
                  for cid, c in cases.items()},
    }


def score_predictions(predictions: Sequence[CasePrediction], ops: Sequence[dict[str, Any]],
                      classes: Sequence[str]) -> dict[str, Any]:
    """`_summarise` of the predictions after the post-processing operations `ops` (public:
    the reference arms of `cmc_train.baselines` are scored by it, as the networks are)."""
    cases = {}
    for case in predictions:
        pred = postprocess.apply_operations(case.pred, ops, case.spacing)
        cases[case.case_id] = per_class_metrics(pred, case.ref, len(classes), case.spacing)
    return _summarise(cases, list(classes[1:]))


def evaluate(ckpt_path: Path, datalist_path: Path, split: str = "test",
             modes: Sequence[str] = MODES, device: torch.device | None = None,
             reporter: Reporter | None = None, apply_postprocessing: bool = True,
             choose_postprocessing: bool = False) -> dict[str, Any]:
    """Dice and HD95 (mm) per foreground class for each mode; JSON-ready (NaN -> None).

    The checkpoint's recorded post-processing is applied unless `apply_postprocessing` is
    False; `choose_postprocessing` chooses it on this split instead and returns the choice
    as "postprocessing" (record it with `cmc_train.checkpoint.record_postprocessing`).
    `reporter` shows progress and one line per mode.
    """
    ckpt_path, datalist_path = Path(ckpt_path), Path(datalist_path)
    reporter = reporter or Reporter(bar=False, enabled=False)
    net, metadata = load_model(ckpt_path)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net.to(device)
    datalist = Datalist.load(datalist_path)
    if list(datalist.modalities) != metadata["modalities"]:
        raise EvaluationError(f"{datalist_path}: modalities {list(datalist.modalities)} differ "
                              f"from the checkpoint's {metadata['modalities']} (order matters)")
    if list(datalist.classes) != metadata["classes"]:
        raise EvaluationError(f"{datalist_path}: classes {list(datalist.classes)} differ from "
                              f"the checkpoint's {metadata['classes']}")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise EvaluationError(f"unknown modes {unknown}; choose from {list(MODES)}")
    if choose_postprocessing and split == "test":
        raise EvaluationError("choose the post-processing on the validation split (or the "
                              "labelled one), not on the test split it is to be judged on")
    check_data(datalist, datalist_path, (split,)).raise_first()
    preprocess = PreprocessConfig.from_dict(metadata["preprocessing"])
    reporter.say(f"cmc evaluate: pre-processing the {split} split")
    val_set = ValidationSet.from_datalist(datalist, preprocess, split)
    if not val_set.volumes:
        raise EvaluationError(f"{datalist_path}: split {split!r} has no labelled volumes")
    recorded = metadata.get("postprocessing") if apply_postprocessing else None
    patch = int(metadata["model"]["img_size"])
    classes = list(datalist.classes)
    a_name = val_set.modalities[0]
    results: dict[str, Any] = {}
    chosen: dict[str, list[dict[str, Any]]] = {}
    for mode in modes:
        started = time.perf_counter()
        own = val_set.modalities[0 if mode == Mode.A else 1]
        jobs: list[tuple[EvalVolume, EvalVolume | None]] = (
            [(a, b) for a, b in val_set.pairs()] if mode == Mode.FUSED else
            [(v, None) for v in val_set.of_modality(own)])
        modality = "+".join(val_set.modalities) if mode == Mode.FUSED else own
        task = reporter.stage(f"evaluate {mode}", total=len(jobs))
        predictions = []
        for vol, other in jobs:
            predictions.append(_case_prediction(net, vol, mode, patch, device, other))
            reporter.update(task, advance=1)
        reporter.finish(task)
        if not predictions:
            results[mode] = {"modality": modality, "num_cases": 0,
                             "skipped": f"no labelled {modality} case in split {split!r}"}
            reporter.say(f"cmc evaluate: {mode} ({modality}): skipped, no labelled case")
            continue
        if choose_postprocessing:
            ops = choose_operations(predictions, classes)
            chosen[mode] = ops
        else:
            ops = list((recorded or {}).get("modes", {}).get(mode, []))
        summary = {"modality": modality,
                   "scored_against": f"{a_name} labels" if mode == Mode.FUSED else
                   f"{modality} labels", **score_predictions(predictions, ops, classes),
                   "postprocessing": postprocess.describe(ops)}
        if ops:
            raw = score_predictions(predictions, [], classes)
            summary["without_postprocessing"] = {
                k: raw[k] for k in ("dice", "hd95_mm", "mean_fg_dice", "mean_fg_hd95_mm",
                                    "hd95_undefined_total")}
        results[mode] = summary
        reporter.say(f"cmc evaluate: {mode} ({modality}): {len(predictions)} cases, mean Dice "
                     f"{summary['mean_fg_dice']:.4f}, {time.perf_counter() - started:.0f} s")
    out: dict[str, Any] = {
        "checkpoint": str(ckpt_path), "datalist": str(datalist_path), "split": split,
        "classes": classes, "modalities": list(datalist.modalities),
        "spacing_mm": list(preprocess.spacing),
        "space": "pre-processed grid (RAS, checkpoint spacing); fused on modality a's grid, "
                 "scored against modality a's labels",
        "modes": results,
    }
    if choose_postprocessing:
        out["postprocessing"] = {"chosen_on": f"{split} split of {datalist_path.name} "
                                              f"({len({v.case_id for v in val_set.volumes})} "
                                              "cases)",
                                 "spacing_mm": list(preprocess.spacing), "modes": chosen}
    elif recorded:
        out["postprocessing"] = recorded
    return json_ready(out)


def json_ready(value: Any) -> Any:
    """NaN (undefined HD95) becomes None so the output is strict JSON."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value
