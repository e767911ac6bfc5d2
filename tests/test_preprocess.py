"""cmc_serve.preprocess: parity with MONAI's training transforms, orientation invariance,
world-space resampling and the label return path."""

from __future__ import annotations

import numpy as np
import pytest

from cmc_serve.preprocess import (
    PreprocessError,
    labels_to_source,
    preprocess,
    resample,
    resample_to_reference,
    spacing_grid,
)
from cmc_serve.volume import Grid, Volume

PREP = {"modalities": ["ct", "mr"], "spacing": [1.5, 2.0, 2.5], "orientation": "RAS",
        "normalisation": {"ct": {"kind": "ct_window", "low": -175.0, "high": 250.0},
                          "mr": {"kind": "zscore_nonzero"}}}


def random_grid_affine(rng: np.random.Generator) -> np.ndarray:
    """Oblique-free affine: permuted, possibly flipped axes, anisotropic spacing, any origin."""
    perm = rng.permutation(3)
    signs = rng.choice([-1.0, 1.0], size=3)
    spacing = rng.uniform(0.6, 3.5, size=3)
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for j in range(3):
        affine[perm[j], j] = signs[j] * spacing[j]
    affine[:3, 3] = rng.uniform(-100, 100, size=3)
    return affine


def monai_pipeline(array: np.ndarray, affine: np.ndarray,
                   norm: dict) -> tuple[np.ndarray, np.ndarray]:
    """The training transforms (cmc_train uses exactly these) applied through MONAI."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import (
        Compose,
        NormalizeIntensityd,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    if norm["kind"] == "ct_window":
        norm_t = ScaleIntensityRanged("img", a_min=norm["low"], a_max=norm["high"],
                                      b_min=0.0, b_max=1.0, clip=True)
    else:
        norm_t = NormalizeIntensityd("img", nonzero=True)
    pipeline = Compose([Orientationd("img", axcodes="RAS", labels=None),
                        Spacingd("img", pixdim=PREP["spacing"], mode="bilinear",
                                 padding_mode="border", align_corners=False, dtype=np.float32),
                        norm_t])
    img = MetaTensor(torch.as_tensor(array[None]), affine=torch.as_tensor(affine))
    out = pipeline({"img": img})["img"]
    return out.array[0] if hasattr(out, "array") else out.numpy()[0], np.asarray(out.affine)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_matches_monai_on_random_grids(seed: int, modality: str) -> None:
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(7, 23, size=3))
    affine = random_grid_affine(rng)
    array = rng.normal(0, 300, size=shape).astype(np.float32)
    if modality == "mr":
        # Positive tissue around an interior zero block. Zeros touching a face would make
        # the comparison depend on float noise: a sample landing exactly on a zero voxel is 0
        # in one implementation and 1e-14 (so "non-zero", and normalised) in the other.
        array = np.abs(array) + 1.0
        array[2:-2, 3:-2, 2:-3] = 0.0
    ours = preprocess(Volume(array, affine), modality, PREP)
    ref, ref_affine = monai_pipeline(array, affine, PREP["normalisation"][modality])
    assert ours.array.shape == ref.shape
    assert ours.array.dtype == np.float32
    np.testing.assert_allclose(ours.affine, ref_affine, atol=1e-6)
    assert np.max(np.abs(ours.array - ref)) <= 1e-4


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_matches_training_transforms_from_nifti(tmp_path, seed: int, modality: str) -> None:
    """The contract itself: cmc_train's deterministic_transforms on a NIfTI file vs
    read_nifti + preprocess with the checkpoint's recorded settings."""
    import nibabel as nib

    from cmc_serve.nifti_io import read_nifti
    from cmc_train.config import PreprocessConfig
    from cmc_train.data.transforms import deterministic_transforms

    rng = np.random.default_rng(100 + seed)
    shape = tuple(int(s) for s in rng.integers(8, 20, size=3))
    array = rng.normal(0, 300, size=shape).astype(np.float32)
    if modality == "mr":
        array = np.abs(array) + 1.0
        array[2:-2, 2:-2, 3:-3] = 0.0
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(array, random_grid_affine(rng)), str(path))
    config = PreprocessConfig.from_dict(PREP)
    ref = deterministic_transforms(config, modality, with_label=False)({"image": str(path)})
    ref_img = ref["image"]
    ours = preprocess(read_nifti(path), modality, config.to_dict())
    assert ours.array.shape == tuple(ref_img.shape[1:])
    np.testing.assert_allclose(ours.affine, np.asarray(ref_img.affine), atol=1e-5)
    assert np.max(np.abs(ours.array - ref_img.numpy()[0])) <= 1e-4


def test_matches_monai_when_spacing_already_fits() -> None:
    """MONAI skips resampling within its 1e-3 tolerance; so must we (same shape, same affine)."""
    rng = np.random.default_rng(42)
    affine = np.diag([-1.5, 2.0, -2.5004, 1.0])
    affine[:3, 3] = [10.0, -5.0, 3.0]
    array = rng.normal(0, 300, size=(9, 8, 7)).astype(np.float32)
    ours = preprocess(Volume(array, affine), "ct", PREP)
    ref, ref_affine = monai_pipeline(array, affine, PREP["normalisation"]["ct"])
    assert ours.array.shape == ref.shape == (9, 8, 7)
    np.testing.assert_allclose(ours.affine, ref_affine, atol=1e-9)
    assert np.max(np.abs(ours.array - ref)) <= 1e-5


def test_spacing_grid_keeps_rotation_of_oblique_grid() -> None:
    theta = 0.3
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0],
                    [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([1.0, 1.0, 3.0])
    target = spacing_grid(Grid((20, 20, 10), affine), np.array([2.0, 2.0, 2.0]))
    np.testing.assert_allclose(target.affine[:3, :3], rot * 2.0, atol=1e-12)
    assert target.shape == (10, 10, 14)  # round(19 / 2 + 1), half to even as in MONAI


def blob(shape: tuple[int, int, int], spacing: float) -> np.ndarray:
    """A smooth off-centre ellipsoid phantom with a gradient (no symmetric ambiguity)."""
    idx = np.indices(shape).astype(np.float64) * spacing
    c = np.array([0.45, 0.55, 0.4]) * (np.array(shape) - 1) * spacing
    r = ((idx[0] - c[0]) / 18) ** 2 + ((idx[1] - c[1]) / 12) ** 2 + ((idx[2] - c[2]) / 9) ** 2
    return (200.0 * (r < 1) + 2.0 * idx[0] - 50.0).astype(np.float32)


def equivalent_volumes(array: np.ndarray, affine: np.ndarray) -> dict[str, Volume]:
    """The same world image stored as RAS, LPS, permuted axes and one flipped axis."""
    def flipped(arr: np.ndarray, aff: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        n = arr.shape[axis]
        flip = np.eye(4)
        flip[axis, axis] = -1.0
        flip[axis, 3] = n - 1
        return np.flip(arr, axis).copy(), aff @ flip

    lps_arr, lps_aff = flipped(*flipped(array, affine, 0), 1)
    perm = (2, 0, 1)
    perm_aff = np.eye(4)
    perm_aff[:3, :3] = affine[:3, :3][:, perm]
    perm_aff[:3, 3] = affine[:3, 3]
    flip_arr, flip_aff = flipped(array, affine, 2)
    return {"ras": Volume(array, affine), "lps": Volume(lps_arr, lps_aff),
            "permuted": Volume(np.transpose(array, perm).copy(), perm_aff),
            "flipped": Volume(flip_arr, flip_aff)}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_orientation_invariance_and_label_round_trip(tmp_path) -> None:
    """One phantom stored as NIfTI in RAS, LPS, permuted and flipped layouts (same world)."""
    import nibabel as nib

    from cmc_serve.nifti_io import read_nifti

    affine = np.diag([1.25, 1.0, 2.0, 1.0])
    affine[:3, 3] = [-30.0, 12.0, 40.0]
    vols = {}
    for name, vol in equivalent_volumes(blob((40, 48, 24), 1.0), affine).items():
        nib.save(nib.Nifti1Image(vol.array, vol.affine), str(tmp_path / f"{name}.nii.gz"))
        vols[name] = read_nifti(tmp_path / f"{name}.nii.gz")
    assert {v.grid.axcodes for v in vols.values()} == {"RAS", "LPS", "SRA", "RAI"}
    prepared = {k: preprocess(v, "ct", PREP) for k, v in vols.items()}
    ref = prepared["ras"]
    for name, p in prepared.items():
        assert p.array.shape == ref.array.shape, name
        np.testing.assert_allclose(p.affine, ref.affine, atol=1e-9, err_msg=name)
        assert np.max(np.abs(p.array - ref.array)) <= 1e-5, name
    # a label made on the prepared grid goes back to every source layout ...
    label = (ref.array > 0.6).astype(np.uint8)
    assert label.sum() > 100
    back = {k: labels_to_source(label, prepared[k], v) for k, v in vols.items()}
    # ... and all four agree in world space once brought onto the RAS source grid.
    ras_grid = vols["ras"].grid
    for name, lab in back.items():
        assert lab.dtype == np.uint8 and lab.shape == vols[name].shape
        on_ras = resample(lab, vols[name].affine, ras_grid, order=0, fill=0)
        assert dice(on_ras == 1, back["ras"] == 1) >= 0.99, name
    # the label matches the phantom it was drawn from: window 0.6 is -175 + 0.6 * 425 = 80 HU
    assert dice(back["ras"] == 1, vols["ras"].array > 80.0) > 0.9


def test_labels_to_source_general_path_for_sheared_source() -> None:
    """A sheared source cannot be mapped axis by axis; the slab path must agree with world."""
    affine = np.array([[1.0, 0.2, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0],
                       [0, 0, 0, 1.0]])
    vol = Volume(blob((30, 30, 15), 1.0), affine)
    p = preprocess(vol, "ct", PREP)
    label = (p.array > 0.6).astype(np.uint8)
    back = labels_to_source(label, p, vol)
    assert back.shape == vol.shape and back.any()
    # a round trip source -> prepared grid -> source reproduces the label almost everywhere
    again = labels_to_source(resample(back, vol.affine, p.grid, order=0, fill=0), p, vol)
    assert dice(again == 1, back == 1) > 0.95


def test_resample_to_reference_uses_world_coordinates() -> None:
    """Modality b on a shifted, flipped, coarser grid lands where the world says, not by index."""
    world = lambda pts: pts[0] * 2.0 + pts[1] * -1.0 + pts[2] * 0.5 + 7.0  # noqa: E731 linear
    ref_aff = np.diag([1.0, 1.0, 1.0, 1.0])
    ref_grid = Grid((20, 20, 20), ref_aff)
    b_aff = np.array([[0.0, 0.0, -1.5, 25.0], [2.0, 0.0, 0.0, -8.0], [0.0, 1.0, 0.0, -4.0],
                      [0, 0, 0, 1.0]])
    b_shape = (20, 28, 22)
    idx = np.indices(b_shape).reshape(3, -1).astype(np.float64)
    pts = b_aff[:3, :3] @ idx + b_aff[:3, 3:4]
    b = Volume(world(pts).reshape(b_shape).astype(np.float32), b_aff)
    out = resample_to_reference(b, ref_grid)
    ridx = np.indices(ref_grid.shape).reshape(3, -1).astype(np.float64)
    expected = world(ridx).reshape(ref_grid.shape)
    # inside b's field of view the linear function is reproduced exactly by trilinear sampling
    inside = (ridx[0] <= 25.0) & (ridx[0] >= 25.0 - 21 * 1.5) & (ridx[1] >= -8) & \
             (ridx[1] <= -8 + 19 * 2) & (ridx[2] >= -4) & (ridx[2] <= -4 + 27)
    inside = inside.reshape(ref_grid.shape)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(out.array[inside], expected[inside], atol=1e-3)
    assert np.all(out.array[~inside] >= b.array.min() - 1e-3)


def test_resample_to_reference_rejects_disjoint_images() -> None:
    b = Volume(np.ones((5, 5, 5), np.float32), np.diag([1.0, 1.0, 1.0, 1.0]) + np.array(
        [[0, 0, 0, 500.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(PreprocessError, match="do not overlap"):
        resample_to_reference(b, Grid((5, 5, 5), np.eye(4)))


@pytest.mark.parametrize("bad, message", [
    ({"spacing": [1, 1]}, "spacing"),
    ({"orientation": "LPS"}, "orientation"),
    ({"normalisation": {"mr": {"kind": "zscore_nonzero"}}}, "no normalisation"),
    ({"normalisation": {"ct": {"kind": "minmax"}}}, "unknown normalisation"),
])
def test_bad_settings_are_rejected(bad: dict, message: str) -> None:
    vol = Volume(np.ones((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(PreprocessError, match=message):
        preprocess(vol, "ct", {**PREP, **bad})


def test_labels_shape_mismatch() -> None:
    vol = Volume(np.ones((6, 6, 6), np.float32), np.eye(4))
    p = preprocess(vol, "ct", PREP)
    with pytest.raises(PreprocessError, match="labels shape"):
        labels_to_source(np.zeros((2, 2, 2), np.uint8), p, vol)


@pytest.mark.parametrize("name, modality", [("percentile", "mr"), ("percentile:2:98", "ct"),
                                            ("ct-brain", "ct")])
def test_normalisation_presets_match_training_transforms(tmp_path, name: str,
                                                         modality: str) -> None:
    """Every normalisation `--set normalisation.M=...` can choose is served as trained."""
    import nibabel as nib

    from cmc_serve.nifti_io import read_nifti
    from cmc_train.config import PreprocessConfig
    from cmc_train.data.transforms import deterministic_transforms
    from cmc_train.normalisation import parse_normalisation

    rng = np.random.default_rng(7)
    array = rng.normal(40, 300, size=(14, 12, 10)).astype(np.float32)
    array[3, 4, 5] = 5000.0  # an outlier the percentile clip must tame
    if modality == "mr":
        array = np.abs(array) + 1.0
        array[2:-2, 2:-2, 3:-3] = 0.0
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(array, random_grid_affine(rng)), str(path))
    norms = {"ct": {"kind": "ct_window", "low": -175.0, "high": 250.0},
             "mr": {"kind": "zscore_nonzero"}, modality: parse_normalisation(name)}
    config = PreprocessConfig.from_dict({**PREP, "normalisation": norms})
    ref = deterministic_transforms(config, modality, with_label=False)({"image": str(path)})
    ours = preprocess(read_nifti(path), modality, config.to_dict())
    assert np.max(np.abs(ours.array - ref["image"].numpy()[0])) <= 1e-4
    if name.startswith("percentile"):  # clipped: the outlier is no longer 10 sigma out
        assert float(ours.array.max()) < 4.0
