"""What quality control is given about one segmented case (`QcInputs`).

The engine and the pipeline gather these while they segment (nothing is run twice for
QC): the fused pass's two decoders come out of the same graph call, the raw images are the
ones already read. `cmc_serve.qc.verdict.assess_case(reference, inputs)` turns them into a
`CaseQc`; `reference` is what the model directory recorded about its training data
(`ModelInfo.qc_reference`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class RoleImage:
    """One input image as read, before any pre-processing: `array` in the modality's own
    units (HU for CT) on its source grid, `affine` voxel -> RAS mm of that grid, and the
    modality name the model expects in this role."""

    modality: str
    array: np.ndarray
    affine: np.ndarray


@dataclass(frozen=True)
class BranchOutputs:
    """The fused pass's two decoders on the model grid: each decoder's argmax labels
    (uint8 [D, H, W]) and, per fused class k, the sum over the voxels labelled k of the
    fused probability margin (top-1 minus top-2) and their count, so that the mean margin
    inside a structure costs no volume-sized array."""

    labels_a: np.ndarray
    labels_b: np.ndarray
    margin_sum: np.ndarray
    voxel_count: np.ndarray


@dataclass(frozen=True)
class QcInputs:
    """Everything QC looks at for one case: the final labels on the model grid (after
    post-processing) with that grid's affine (voxel -> RAS mm), the images per role, the
    fused pass's branches (None for a single-modality mode or a graph exported without
    them) and, when the cross-modal opinion was asked for, the labels of the a-only and
    b-only modes on the same grid (role -> labels)."""

    class_names: tuple[str, ...]
    mode: str
    labels: np.ndarray
    affine: np.ndarray
    images: Mapping[str, RoleImage]
    branches: BranchOutputs | None = None
    single_modality: Mapping[str, np.ndarray] = field(default_factory=dict)
