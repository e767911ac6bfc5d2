"""What quality control needs to know about the training: `qc_reference` in the checkpoint.

Recorded at the end of `cmc train` into checkpoint_best.pt and checkpoint_last.pt
(`record_reference`), carried by `cmc export` into cmc.json, read by serving as
`ModelInfo.qc_reference` and judged by `cmc_serve.qc.verdict.assess_case`:

    {"version": 1,
     "fingerprint": {modality: fingerprint.summarise(...)},   # every training image
     "anatomy": anatomy.summarise(...),                        # every training label
     "calibration": {"cases", "labelled_cases", "grid", "validation_mean_dice",
                     "signals": {"mean_dice" | "mean_margin" | "cross_a" | "cross_b":
                                 {"mean", "std", "min", "max"}},
                     "structures": {name: {"dice": {...}}},
                     "anatomy": anatomy.summarise(...)}}       # the fused answers

Fingerprint and anatomy are measured with the serving side's own functions
(`cmc_serve.qc.fingerprint.measure_image` on the raw images of the labelled, unlabelled,
validation and calibration splits, `cmc_serve.qc.anatomy.measure_labels` on every training
label and on the fused answers to the held-out cases), so a number means the same at
training and at segment time. The held-out answers widen the anatomy's ranges (a model
that segments the spleen smaller than its labels does so on every case, which is no reason
to doubt one): no held-out case is flagged by construction.

Calibration runs the trained network over the held-out cases: the validation split (which
chose the checkpoint) and the datalist's `calibration` split (neither trained on nor used
for the choice, labels optional): the fused pass with each decoder's probabilities kept
apart, and the a-only and b-only modes, measured with `cmc_serve.qc.branches` exactly as
serving measures a case. Why a calibration split: four validation cases give floors that
are coarse, and optimistic, since the checkpoint was chosen for doing well on them; on
the QC benchmark twenty calibration cases took the demo model's in-distribution flag
rate from 8 of 24 to 2 of 24 (BENCHMARKS.md). `validation_mean_dice` is the fused answer's
mean foreground Dice over the held-out cases that have a's label: on the demo model the 4
validation cases alone overrated it by 0.06 (0.77 against 0.71 on 60 new cases), which
labelled calibration cases correct.
It is computed on the evaluation grid (b's pre-processed image resampled onto a's
pre-processed grid, `cmc_train.evaluate`), which differs from `cmc segment`'s order of
resampling only near the edge of b's field of view.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference

from cmc_common.progress import Say
from cmc_serve.qc import anatomy, branches, fingerprint
from cmc_serve.qc.inputs import BranchOutputs
from cmc_serve.qc.verdict import REFERENCE_VERSION
from cmc_train.checkpoint import load_checkpoint, load_model, save_checkpoint
from cmc_train.config import PreprocessConfig
from cmc_train.data.datalist import Datalist
from cmc_train.data.loaders import ImagePair, image_pairs
from cmc_train.evaluate import ValidationSet, resample_onto
from cmc_train.network import CMCNet
from cmc_train.sliding_window import predict_labels

# Normalisations blind to an image's scale (and offset): such a modality's intensities are
# judged by their relative profile (`cmc_serve.qc.fingerprint.relative_profile`).
SCALE_INVARIANT = ("zscore_nonzero", "percentile_zscore")
# Held-out cases below which the reference warns that its floors are coarse: with 20, a
# new case of the same distribution falls below the lowest of them about 1 time in 21.
MIN_CALIBRATION_CASES = 20


def data_reference(datalist: Datalist, normalisation: Mapping[str, Mapping[str, Any]]
                   ) -> dict[str, Any]:
    """Fingerprint (every image of the labelled, unlabelled, validation and calibration
    splits: the images the model was trained, chosen and calibrated on) and anatomy (every
    label of the labelled split) of the training data; no network needed."""
    measures: dict[str, list[dict[str, Any]]] = {m: [] for m in datalist.modalities}
    labels: list[dict[str, Any]] = []
    for entry in (*datalist.labelled, *datalist.unlabelled, *datalist.validation,
                  *datalist.calibration):
        for modality, path in entry.image.items():
            array, affine = _read(path)
            measures[modality].append(fingerprint.measure_image(array, affine))
    for entry in datalist.labelled:
        for path in entry.label.values():
            array, affine = _read(path)
            labels.append(anatomy.measure_labels(np.rint(array).astype(np.uint8), affine,
                                                 datalist.classes))
    out: dict[str, Any] = {"version": REFERENCE_VERSION, "fingerprint": {
        m: fingerprint.summarise(rows, normalisation[m]["kind"] in SCALE_INVARIANT)
        for m, rows in measures.items() if rows}}
    if labels:
        out["anatomy"] = anatomy.summarise(labels, datalist.classes)
    return out


def held_out_pairs(val_set: ValidationSet | None, datalist: Datalist,
                   preprocess: PreprocessConfig) -> Iterator[ImagePair]:
    """The cases calibration runs on: the validation cases with both modalities (already
    in memory), then the calibration split's (read one at a time)."""
    if val_set is not None:
        for vol_a, vol_b in val_set.pairs():
            yield ImagePair.from_volumes(vol_a, vol_b)
    yield from image_pairs(datalist, preprocess, "calibration")


def calibrate(net: CMCNet, pairs: Iterable[ImagePair], classes: Sequence[str],
              patch_size: int, device: torch.device) -> dict[str, Any] | None:
    """Branch agreement, fused margin and cross-modal Dice on every held-out pair, and the
    fused answer's mean foreground Dice against a's labels where a pair has them (the
    validation mean a failed case is measured from). None without pairs."""
    rows: list[dict[str, Any]] = []
    for pair in pairs:
        image_a = pair.image_a[0]
        image_b = resample_onto(pair.image_b[0], pair.affine_b, image_a.shape, pair.affine_a)
        outputs, fused = branch_outputs(net, image_a, image_b, patch_size, device)
        agreement = branches.branch_agreement(outputs, classes)
        single = {"a": predict_labels(net, image_a, None, "a", patch_size, device),
                  "b": predict_labels(net, None, image_b, "b", patch_size, device)}
        cross = branches.cross_modal_agreement(single, fused, classes)
        dice = None
        if pair.label_a is not None:
            truth = branches.dice_per_class(branches.confusion(
                fused, pair.label_a[0].numpy().astype(np.uint8), len(classes)))
            dice = branches.mean_defined(truth) or 0.0
        rows.append({"agreement": agreement, "cross": cross, "dice": dice,
                     "anatomy": anatomy.measure_labels(fused, pair.affine_a, classes)})
    if not rows:
        return None
    scored = [r["dice"] for r in rows if r["dice"] is not None]
    signals = {"mean_dice": [r["agreement"]["mean_dice"] for r in rows],
               "mean_margin": [r["agreement"]["mean_margin"] for r in rows],
               "cross_a": [r["cross"]["a"]["mean_dice"] for r in rows],
               "cross_b": [r["cross"]["b"]["mean_dice"] for r in rows]}
    structures = {name: {"dice": _stats([r["agreement"]["structures"][name]["dice"]
                                         for r in rows])}
                  for name in classes[1:]}
    return {"cases": len(rows), "labelled_cases": len(scored),
            "grid": "evaluation (b resampled onto a, pre-processed)",
            "validation_mean_dice": float(np.mean(scored)) if scored else None,
            "signals": {k: _stats(v) for k, v in signals.items()},
            "anatomy": anatomy.summarise([r["anatomy"] for r in rows], classes),
            "structures": {k: v for k, v in structures.items() if v["dice"] is not None}}


def branch_outputs(net: CMCNet, image_a: torch.Tensor, image_b: torch.Tensor,
                   patch_size: int, device: torch.device) -> tuple[BranchOutputs, np.ndarray]:
    """The fused pass with each decoder's softmax kept apart (the sliding window, overlap
    and gaussian blending of `cmc_train.sliding_window`): the `BranchOutputs` serving gets
    from the fused graph, and the fused labels."""
    def predictor(patches: torch.Tensor) -> torch.Tensor:
        out = net(patches[:, 0:1], patches[:, 1:2])
        return torch.cat([torch.softmax(out.logits_a, 1), torch.softmax(out.logits_b, 1)], 1)

    volume = torch.stack([image_a.float(), image_b.float()])[None]
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            probs = sliding_window_inference(volume, roi_size=(patch_size,) * 3,
                                             sw_batch_size=4, predictor=predictor, overlap=0.5,
                                             mode="gaussian", sw_device=device,
                                             device=torch.device("cpu"))
    finally:
        net.train(was_training)
    assert isinstance(probs, torch.Tensor)
    k = probs.shape[1] // 2
    probs_a, probs_b = probs[0, :k].float(), probs[0, k:].float()
    fused_probs = 0.5 * (probs_a + probs_b)
    top2 = torch.topk(fused_probs, 2, dim=0).values
    margin = (top2[0] - top2[1]).numpy()
    fused = fused_probs.argmax(0).to(torch.uint8).numpy()
    counts = np.bincount(fused.ravel(), minlength=k)
    sums = np.bincount(fused.ravel(), weights=margin.ravel(), minlength=k)
    return BranchOutputs(labels_a=probs_a.argmax(0).to(torch.uint8).numpy(),
                         labels_b=probs_b.argmax(0).to(torch.uint8).numpy(),
                         margin_sum=sums, voxel_count=counts), fused


def record_reference(paths: Sequence[Path], datalist: Datalist, val_set: ValidationSet | None,
                     device: torch.device, data: dict[str, Any] | None = None,
                     say: Say | None = None) -> None:
    """Store `qc_reference` in each checkpoint's metadata (atomically, weights and trainer
    state unchanged); each checkpoint is calibrated with its own weights. `data`: an
    already measured `data_reference` (default: measured with the first checkpoint's
    normalisation)."""
    if data is None:
        preprocess = PreprocessConfig.from_dict(load_checkpoint(paths[0]).metadata[
            "preprocessing"])
        data = data_reference(datalist, preprocess.normalisation)
    for path in paths:
        reference = dict(data)
        net, metadata = load_model(path)
        net.to(device)
        pairs = held_out_pairs(val_set, datalist,
                               PreprocessConfig.from_dict(metadata["preprocessing"]))
        calibration = calibrate(net, pairs, datalist.classes,
                                int(metadata["model"]["img_size"]), device)
        if calibration is not None:
            reference["calibration"] = calibration
        ckpt = load_checkpoint(path)
        save_checkpoint(path, ckpt.state_dict, {**ckpt.metadata, "qc_reference": reference},
                        ckpt.trainer_state)
        if say is not None:
            say(f"{path.name}: quality-control reference recorded ({_describe(calibration)})")


def _describe(calibration: Mapping[str, Any] | None) -> str:
    """What the calibration rests on, and a warning where that is thin."""
    if calibration is None:
        return ("no held-out case with both modalities: not calibrated; only the left/right "
                "order and the field-of-view cut are judged")
    text = (f"{calibration['cases']} held-out cases: branches agree "
            f"{calibration['signals']['mean_dice']['mean']:.2f}")
    if calibration["validation_mean_dice"] is not None:
        text += (f", fused Dice {calibration['validation_mean_dice']:.2f} on the "
                 f"{calibration['labelled_cases']} labelled")
    if calibration["cases"] < MIN_CALIBRATION_CASES:
        text += (f"; fewer than {MIN_CALIBRATION_CASES}: the flags' floors are coarse and "
                 "flag more cases (list held-out volumes, labelled where you can, under "
                 "'calibration' in the datalist)")
    return text


def _stats(values: Sequence[float | None]) -> dict[str, float] | None:
    defined = np.asarray([v for v in values if v is not None], np.float64)
    if not defined.size:
        return None
    return {"mean": float(defined.mean()),
            "std": float(defined.std(ddof=1)) if defined.size > 1 else 0.0,  # sample sd
            "min": float(defined.min()), "max": float(defined.max())}


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img: Any = nib.load(str(path))  # a NIfTI image (nibabel types it as any file image)
    data = np.asanyarray(img.dataobj)
    return data.reshape(data.shape[:3]), np.asarray(img.affine, np.float64)
