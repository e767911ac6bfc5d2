"""What quality control needs to know about the training: `qc_reference` in the checkpoint.

Recorded at the end of `cmc train` into checkpoint_best.pt and checkpoint_last.pt
(`record_reference`), carried by `cmc export` into cmc.json, read by serving as
`ModelInfo.qc_reference` and judged by `cmc_serve.qc.verdict.assess_case`:

    {"version": 1,
     "fingerprint": {modality: fingerprint.summarise(...)},   # every training image
     "anatomy": anatomy.summarise(...),                        # every training label
     "calibration": {"cases", "grid", "validation_mean_dice",
                     "signals": {"mean_dice" | "mean_margin" | "cross_a" | "cross_b":
                                 {"mean", "std", "min", "max"}},
                     "structures": {name: {"dice": {...}}},
                     "anatomy": anatomy.summarise(...)}}       # the fused answers

Fingerprint and anatomy are measured with the serving side's own functions
(`cmc_serve.qc.fingerprint.measure_image` on the raw images of the labelled, unlabelled
and validation splits, `cmc_serve.qc.anatomy.measure_labels` on every training label and
on the fused answers to the validation cases), so a number means the same at training and
at segment time. The validation answers widen the anatomy's ranges (a model that
segments the spleen smaller than its labels does so on every case, which is no reason to
doubt one): no validation case is flagged by construction.

Calibration runs the trained network over the validation cases (the split that chose the
checkpoint, never a test split): the fused pass with each decoder's probabilities kept
apart, and the a-only and b-only modes, measured with `cmc_serve.qc.branches` exactly as
serving measures a case. It is computed on the evaluation grid (b's pre-processed image
resampled onto a's pre-processed grid, `cmc_train.evaluate`), which differs from
`cmc segment`'s order of resampling only near the edge of b's field of view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
from cmc_train.evaluate import ValidationSet, resample_onto
from cmc_train.network import CMCNet
from cmc_train.sliding_window import predict_labels

# Normalisations blind to an image's scale (and offset): such a modality's intensities are
# judged by their relative profile (`cmc_serve.qc.fingerprint.relative_profile`).
SCALE_INVARIANT = ("zscore_nonzero", "percentile_zscore")


def data_reference(datalist: Datalist, normalisation: Mapping[str, Mapping[str, Any]]
                   ) -> dict[str, Any]:
    """Fingerprint (every image of the labelled, unlabelled and validation splits: the
    images the model was trained and chosen on) and anatomy (every label of the labelled
    split) of the training data; no network needed."""
    measures: dict[str, list[dict[str, Any]]] = {m: [] for m in datalist.modalities}
    labels: list[dict[str, Any]] = []
    for entry in (*datalist.labelled, *datalist.unlabelled, *datalist.validation):
        for modality, path in entry.image.items():
            array, affine = _read(path)
            measures[modality].append(fingerprint.measure_image(array, affine))
        if entry in datalist.validation:
            continue
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


def calibrate(net: CMCNet, val_set: ValidationSet, patch_size: int,
              device: torch.device) -> dict[str, Any] | None:
    """Branch agreement, fused margin and cross-modal Dice on every validation case with
    both modalities, and the fused answer's mean foreground Dice against a's labels (the
    validation mean a failed case is measured from). None without such cases."""
    rows: list[dict[str, Any]] = []
    for vol_a, vol_b in val_set.pairs():
        image_a = vol_a.image[0]
        image_b = resample_onto(vol_b.image[0], vol_b.affine, image_a.shape, vol_a.affine)
        outputs, fused = branch_outputs(net, image_a, image_b, patch_size, device)
        agreement = branches.branch_agreement(outputs, val_set.classes)
        single = {"a": predict_labels(net, image_a, None, "a", patch_size, device),
                  "b": predict_labels(net, None, image_b, "b", patch_size, device)}
        cross = branches.cross_modal_agreement(single, fused, val_set.classes)
        truth = branches.dice_per_class(branches.confusion(
            fused, vol_a.label[0].numpy().astype(np.uint8), val_set.num_classes))
        rows.append({"agreement": agreement, "cross": cross,
                     "dice": branches.mean_defined(truth) or 0.0,
                     "anatomy": anatomy.measure_labels(fused, vol_a.affine, val_set.classes)})
    if not rows:
        return None
    signals = {"mean_dice": [r["agreement"]["mean_dice"] for r in rows],
               "mean_margin": [r["agreement"]["mean_margin"] for r in rows],
               "cross_a": [r["cross"]["a"]["mean_dice"] for r in rows],
               "cross_b": [r["cross"]["b"]["mean_dice"] for r in rows]}
    structures = {name: {"dice": _stats([r["agreement"]["structures"][name]["dice"]
                                         for r in rows])}
                  for name in val_set.classes[1:]}
    return {"cases": len(rows), "grid": "evaluation (b resampled onto a, pre-processed)",
            "validation_mean_dice": float(np.mean([r["dice"] for r in rows])),
            "signals": {k: _stats(v) for k, v in signals.items()},
            "anatomy": anatomy.summarise([r["anatomy"] for r in rows], val_set.classes),
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
        if val_set is not None:
            net, metadata = load_model(path)
            net.to(device)
            calibration = calibrate(net, val_set, int(metadata["model"]["img_size"]), device)
            if calibration is not None:
                reference["calibration"] = calibration
        ckpt = load_checkpoint(path)
        save_checkpoint(path, ckpt.state_dict, {**ckpt.metadata, "qc_reference": reference},
                        ckpt.trainer_state)
        if say is not None:
            cal = reference.get("calibration")
            say(f"{path.name}: quality-control reference recorded" + (
                f" (validation: branches agree {cal['signals']['mean_dice']['mean']:.2f}, "
                f"fused Dice {cal['validation_mean_dice']:.2f}, {cal['cases']} cases)"
                if cal else " (no validation cases with both modalities: not calibrated)"))


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
