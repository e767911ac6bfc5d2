"""MONAI dictionary transforms: deterministic pre-processing and training augmentation.

The deterministic part is the contract with inference: checkpoints record the
PreprocessConfig, and `cmc_serve.preprocess` re-implements exactly these steps in numpy
(checked against `deterministic_transforms` by a parity test). Change them only together.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByLabelClassesd,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from monai.transforms.utils import map_classes_to_indices

from cmc_train.config import PreprocessConfig

# Axis code meaning of Orientationd (nibabel's: "RAS" = axes point to Right, Anterior, Superior).
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@contextmanager
def _quiet_reader_probe() -> Iterator[None]:
    """Silence MONAI's nvImageCodec probe while `LoadImaged` builds its readers.

    LoadImage instantiates every registered reader, whichever one is asked for; the DICOM
    one then logs and warns that the (GPU-only) nvImageCodec plugin is missing on every
    CPU machine, although we read NIfTI with nibabel. Scoped here so no other warning is lost.
    """
    probe = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = probe.level
    probe.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            yield
    finally:
        probe.setLevel(level)


class PercentileZScored(MapTransform):
    """Clip the non-zero voxels to their own `lower`/`upper` percentiles (numpy's linear
    interpolation), then z-score them (population std; 0 -> 1); zeros stay 0.

    MONAI's `ClipIntensityPercentiles` takes its percentiles over every voxel, so on an MR
    volume that is mostly zero background the lower one is 0 and clips nothing; hence this
    transform, which `cmc_serve.preprocess.normalise` mirrors in numpy."""

    def __init__(self, keys: str, lower: float, upper: float) -> None:
        super().__init__(keys)
        self.lower, self.upper = lower, upper

    def __call__(self, data: Any) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            values = np.asarray(image, dtype=np.float32)
            mask = values != 0
            out = values.copy()
            if mask.any():
                inside = values[mask].astype(np.float64)
                low, high = np.percentile(inside, [self.lower, self.upper])
                inside = np.clip(inside, low, high)
                std = float(inside.std())
                out[mask] = ((inside - inside.mean()) / (std if std != 0.0 else 1.0))
            if isinstance(image, torch.Tensor):  # a MetaTensor keeps its affine
                d[key] = image.clone().float()
                d[key][...] = torch.from_numpy(out)
            else:
                d[key] = out
        return d


def normalisation_transform(norm: dict[str, Any]) -> MapTransform:
    """The intensity normalisation of one modality, applied to key "image" only."""
    if norm["kind"] == "ct_window":
        return ScaleIntensityRanged(keys="image", a_min=float(norm["low"]),
                                    a_max=float(norm["high"]), b_min=0.0, b_max=1.0, clip=True,
                                    dtype=np.float32)
    if norm["kind"] == "zscore_nonzero":
        return NormalizeIntensityd(keys="image", nonzero=True, channel_wise=False,
                                   dtype=np.float32)
    if norm["kind"] == "percentile_zscore":
        return PercentileZScored(keys="image", lower=float(norm["lower"]),
                                 upper=float(norm["upper"]))
    raise ValueError(f"unknown normalisation kind {norm['kind']!r}")


def deterministic_transforms(preprocess: PreprocessConfig, modality: str,
                             with_label: bool) -> Compose:
    """Load a NIfTI file pair {"image": path[, "label": path]} and pre-process it.

    Exactly, in this order (keys = ["image", "label"] or ["image"]):

    1. `LoadImaged(keys, reader="NibabelReader", dtype=np.float32, image_only=True)`
       (the label is read as float32 too);
    2. `EnsureChannelFirstd(keys)` -> [1, X, Y, Z];
    3. `Orientationd(keys, axcodes="RAS", labels=RAS_LABELS)` (voxel axes point Right,
       Anterior, Superior; a pure axis permutation/flip, no interpolation);
    4. `Spacingd(keys, pixdim=preprocess.spacing, mode=("bilinear", "nearest"),
       padding_mode="border", align_corners=False, dtype=np.float32)`: image bilinear,
       label nearest. For axis-aligned input the affine is now diagonal-positive, so MONAI's
       `compute_shape_offset` keeps the first voxel centre (the world origin of voxel 0)
       and makes the output shape `np.round(extent / new_spacing + 1)` per axis, with
       extent = (n - 1) * old_spacing (numpy rounding: halves go to even); samples
       outside the input take the border value;
    5. normalisation of "image" per `preprocess.normalisation[modality]`:
       - `ct_window`: `ScaleIntensityRanged(a_min=low, a_max=high, b_min=0, b_max=1,
         clip=True)`: clip to [low, high], scale linearly to [0, 1];
       - `zscore_nonzero`: `NormalizeIntensityd(nonzero=True, channel_wise=False)`:
         (x - mean) / std over the non-zero voxels (population std, ddof 0), zeros stay 0
         (std 0 -> divisor 1);
       - `percentile_zscore`: `PercentileZScored(lower, upper)`: the non-zero voxels
         clipped to their percentiles, then z-scored as above.

    Returns MetaTensors whose `.affine` is the pre-processed RAS voxel-to-world matrix.
    """
    if modality not in preprocess.normalisation:
        raise ValueError(f"no normalisation configured for modality {modality!r}")
    keys = ["image", "label"] if with_label else ["image"]
    modes = ("bilinear", "nearest") if with_label else ("bilinear",)
    with _quiet_reader_probe():
        load = LoadImaged(keys=keys, reader="NibabelReader", dtype=np.float32, image_only=True)
    return Compose([
        load,
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes=preprocess.orientation, labels=RAS_LABELS),
        Spacingd(keys=keys, pixdim=tuple(preprocess.spacing), mode=modes,
                 padding_mode="border", align_corners=False, dtype=np.float32),
        normalisation_transform(preprocess.normalisation[modality]),
    ])


CLASS_INDICES = "class_indices"


def _patch(patch_size: Sequence[int] | int) -> tuple[int, ...]:
    return (patch_size,) * 3 if isinstance(patch_size, int) else tuple(patch_size)


def pad_to_patch(patch_size: Sequence[int] | int, with_label: bool) -> SpatialPadd:
    """Zero-pad volumes smaller than the patch (zeros: air after the CT window,
    background after the non-zero z-score)."""
    keys = ["image", "label"] if with_label else ["image"]
    return SpatialPadd(keys=keys, spatial_size=_patch(patch_size), mode="constant")


def add_crop_indices(sample: dict[str, Any], patch_size: Sequence[int] | int,
                     num_classes: int) -> dict[str, Any]:
    """Pad a labelled sample and attach the voxel indices of each of its `num_classes` classes.

    The class-balanced crop then skips scanning the label at every draw (the sampler calls
    this once per cached volume); the result is the same as without the indices.
    """
    pad: Any = pad_to_patch(patch_size, with_label=True)
    padded: dict[str, Any] = pad(sample)
    return {**padded, CLASS_INDICES: map_classes_to_indices(padded["label"], num_classes)}


def crop_ratios(num_classes: int, fg_ratio: float) -> list[float]:
    """Crop-centre class ratios: `1 - fg_ratio` background, `fg_ratio` shared equally by the
    foreground classes."""
    if not 0.0 <= fg_ratio <= 1.0:
        raise ValueError(f"fg_ratio must be in [0, 1], got {fg_ratio}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    return [1.0 - fg_ratio] + [fg_ratio / (num_classes - 1)] * (num_classes - 1)


def augmentation_transforms(patch_size: Sequence[int] | int, with_label: bool,
                            num_classes: int | None = None, fg_ratio: float = 0.5,
                            intensity_jitter: float = 0.1) -> Compose:
    """Random patch and augmentation of a pre-processed sample (one patch per call).

    Labelled samples: `RandCropByLabelClassesd` centres the patch on a foreground voxel with
    probability `fg_ratio` (1:1 foreground/background by default, as the method says), the
    foreground share split equally between the classes (`crop_ratios`), otherwise on any
    background voxel. Equal class shares matter for small organs: with a plain foreground
    crop the spleen and kidneys, ~2% of the voxels each, are seen 4x less often than the
    liver (measured on the demo study, tiny preset, 250 steps: MR spleen Dice 0.55 with
    foreground crops, 0.69 with class-balanced ones). A class absent from a volume gives its
    share to the others. Unlabelled: a uniform
    `RandSpatialCropd`, which never looks at a mask. Both pad to the patch first
    (`pad_to_patch`). Then flips along the anterior-posterior and superior-inferior axes and
    intensity scale and shift +-0.1. No left-right flip and no axial 90-degree rotation:
    both swap left and right, and the label set has lateral pairs (kidney_r / kidney_l,
    RV / LV), which the network can then only tell apart by context (measured: the right
    kidney and spleen collapsed to Dice 0 on CT with them in).
    Label patches go through the same spatial transforms, so they stay aligned.
    Precomputed `add_crop_indices` keys are used when present.
    """
    size = _patch(patch_size)
    keys = ["image", "label"] if with_label else ["image"]
    crop: MapTransform
    if with_label:
        if num_classes is None:
            raise ValueError("labelled crops need num_classes (background included)")
        ratios = crop_ratios(num_classes, fg_ratio)
        crop = RandCropByLabelClassesd(keys=keys, label_key="label", spatial_size=size,
                                       ratios=ratios, num_classes=num_classes, num_samples=1,
                                       indices_key=CLASS_INDICES, warn=False)
    else:
        crop = RandSpatialCropd(keys=keys, roi_size=size, random_size=False)
    return Compose([
        pad_to_patch(size, with_label),
        crop,
        RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
        RandScaleIntensityd(keys="image", factors=intensity_jitter, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=intensity_jitter, prob=0.5),
    ])
