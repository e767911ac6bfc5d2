"""Inputs of the parity gates: seeded random patches and a pre-processed synthetic volume.

Random patches exercise the whole input range; the synthetic volume (a rendered CT/MR
phantom pair written as NIfTI and run through the training pre-processing, MONAI's
`deterministic_transforms`) gives the realistic intensities and organ shapes on which the
FP16/BF16 candidates must reproduce the fp32 segmentation.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from cmc_common.contract import MODE_INPUTS
from cmc_train.config import PreprocessConfig
from cmc_train.data.transforms import deterministic_transforms
from cmc_train.synth.phantom import SPACING_A, make_pair

# The gate volume is TILES patches along each axis, tiled without overlap.
TILES = (2, 2, 1)


def random_patches(mode: str, patch_size: int, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded N(0, 1) patches [batch, 1, S, S, S] for every input of the `mode` graph."""
    rng = np.random.default_rng(seed)
    shape = (batch, 1, patch_size, patch_size, patch_size)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name in MODE_INPUTS[mode]}


def preprocessed_phantom(preprocess: PreprocessConfig, patch_size: int,
                         seed: int = 0) -> dict[str, np.ndarray]:
    """A phantom pair pre-processed exactly like training data: {"image_a", "image_b"} [X, Y, Z].

    The phantom's field of view covers TILES patches at the checkpoint's spacing.
    """
    extent_mm = max(t * patch_size * s for t, s in zip(TILES, preprocess.spacing, strict=True))
    size = max(16, math.ceil(extent_mm / float(SPACING_A.min())))
    pair = make_pair(np.random.default_rng(seed), size=size)
    rendered = {"image_a": (pair.image_a, pair.grid_a.affine, preprocess.modalities[0]),
                "image_b": (pair.image_b, pair.grid_b.affine, preprocess.modalities[1])}
    volumes = {}
    with tempfile.TemporaryDirectory(prefix="cmc-gate-") as tmp:
        for key, (image, affine, modality) in rendered.items():
            path = Path(tmp) / f"{key}.nii.gz"
            nib.save(nib.Nifti1Image(image, affine), str(path))
            sample = deterministic_transforms(preprocess, modality, with_label=False)({"image": str(path)})
            volumes[key] = np.asarray(sample["image"][0], dtype=np.float32)
    return volumes


def centre_fit(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Centre-crop / zero-pad `volume` to `shape` (zero is air / background after normalisation)."""
    out = np.zeros(shape, dtype=np.float32)
    src, dst = [], []
    for have, want in zip(volume.shape, shape, strict=True):
        n = min(have, want)
        a, b = (have - n) // 2, (want - n) // 2
        src.append(slice(a, a + n))
        dst.append(slice(b, b + n))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def tile_volume(volume: np.ndarray, patch_size: int) -> np.ndarray:
    """Split a volume whose shape is a multiple of the patch into patches [N, 1, S, S, S]."""
    s = patch_size
    tx, ty, tz = (n // s for n in volume.shape)
    tiles = volume.reshape(tx, s, ty, s, tz, s).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(tiles.reshape(-1, 1, s, s, s))


def synthetic_tiles(preprocess: PreprocessConfig, patch_size: int,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """The gate volume of both modalities as non-overlapping patches {"image_a", "image_b"}."""
    shape = tuple(t * patch_size for t in TILES)
    return {key: tile_volume(centre_fit(volume, shape), patch_size)
            for key, volume in preprocessed_phantom(preprocess, patch_size, seed).items()}


def mode_inputs(tiles: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    """The subset of `tiles` a `mode` graph takes."""
    return {name: tiles[name] for name in MODE_INPUTS[mode]}
