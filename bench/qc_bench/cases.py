"""The quality-control benchmark's cases: an in-distribution set and a failure set.

Every case is rendered from the generated studies (`cmc_train.synth`) with its truth: new
subjects of the easy phantom the model was trained on (in distribution), subjects of the
hard study (anatomy, scanner and contrast the few labelled easy cases never showed), and
easy subjects damaged the way real inputs are: noise, blur, a bias field, intensities
rescaled, a field of view cut short, the MR misregistered by 10-40 mm, CT and MR given in
each other's roles, and a volume of another body region (a head). Severities are drawn per
case from a range, so a kind holds cases that still segment well and cases that do not;
the benchmark scores what came out, not what was done to the input.

All random draws use seeds disjoint from the training study's (`case_rng(seed, index)`
with seed 0 there; here seeds >= 9000), so no case repeats a training or validation
subject.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from cmc_train.synth import PAIR_MAKERS, save_nifti
from cmc_train.synth.phantom import Grid, PhantomPair, centred_grid

# kind -> cases; in_distribution decides the flag rate on clean inputs, so it is the
# largest. Kinds other than in_distribution, hard_study and the two mild damages count as
# out-of-distribution inputs (the share flagged is reported per kind).
# 60 in-distribution cases: one flagged case is 1.7 %, so the flag rate can be told from the
# 5 % target (with 24, as in runs 1-7, one case was already 4 %).
DEFAULT_COUNTS = {"in_distribution": 60, "hard_study": 8, "noise": 5, "blur": 4, "bias": 4,
                  "rescale": 4, "truncated_fov": 4, "misregistration": 6, "swapped_roles": 4,
                  "non_abdominal": 3}
OOD_KINDS = ("swapped_roles", "non_abdominal")


@dataclass(frozen=True)
class BenchCase:
    """One case to segment: the two images with their grids and the truth on a's grid."""

    case_id: str
    kind: str
    severity: str
    image_a: np.ndarray
    grid_a: Grid
    image_b: np.ndarray
    grid_b: Grid
    truth: np.ndarray

    def write(self, folder: Path) -> None:
        """nnU-Net-style channel files (`<id>_0000` = a, `_0001` = b) that `cmc segment`
        reads as one case, and the truth beside them in `truth/`."""
        save_nifti(self.image_a, self.grid_a, folder / "cases" / f"{self.case_id}_0000.nii.gz")
        save_nifti(self.image_b, self.grid_b, folder / "cases" / f"{self.case_id}_0001.nii.gz")
        save_nifti(self.truth.astype(np.uint8), self.grid_a,
                   folder / "truth" / f"{self.case_id}.nii.gz")


def _clean(pair: PhantomPair, kind: str, index: int, severity: str = "") -> BenchCase:
    return BenchCase(f"{kind}_{index:02d}", kind, severity, pair.image_a, pair.grid_a,
                     pair.image_b, pair.grid_b, pair.label_a)


def _shifted(grid: Grid, offset_mm: np.ndarray) -> Grid:
    affine = grid.affine.copy()
    affine[:3, 3] += offset_mm
    return Grid(grid.shape, affine)


def _noise(pair: PhantomPair, rng: np.random.Generator) -> tuple[PhantomPair, str]:
    sigma = rng.uniform(0.05, 0.5)  # share of each image's foreground spread
    a = pair.image_a + rng.normal(0, sigma * 400.0, pair.image_a.shape)
    b = pair.image_b + rng.normal(0, sigma * 400.0, pair.image_b.shape)
    return _with(pair, a.astype(np.float32), np.clip(b, 0, None).astype(np.float32)), \
        f"gaussian noise sd {sigma * 400:.0f}"


def _blur(pair: PhantomPair, rng: np.random.Generator) -> tuple[PhantomPair, str]:
    sigma = rng.uniform(1.0, 3.5)  # voxels
    return _with(pair, ndimage.gaussian_filter(pair.image_a.astype(np.float32), sigma),
                 ndimage.gaussian_filter(pair.image_b.astype(np.float32), sigma)), \
        f"gaussian blur {sigma:.1f} voxels"


def _bias(pair: PhantomPair, rng: np.random.Generator) -> tuple[PhantomPair, str]:
    """A smooth multiplicative field across the MR (what a coil gives), linear in log."""
    strength = rng.uniform(0.3, 1.2)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    idx = np.indices(pair.image_b.shape, dtype=np.float32)
    ramp = sum(d * (i / max(n - 1, 1) - 0.5) for d, i, n in
               zip(direction, idx, pair.image_b.shape, strict=True))
    field = np.exp(strength * ramp)
    return _with(pair, pair.image_a, (pair.image_b * field).astype(np.float32)), \
        f"MR bias field x{np.exp(strength / 2):.2f} at the ends"


def _rescale(pair: PhantomPair, rng: np.random.Generator) -> tuple[PhantomPair, str]:
    """CT not in HU (a vendor's slope left out), or an MR of another scale."""
    if rng.uniform() < 0.5:
        factor = rng.uniform(0.4, 0.8)
        return _with(pair, (pair.image_a * factor).astype(np.float32), pair.image_b), \
            f"CT x{factor:.2f}"
    factor = rng.uniform(2.0, 5.0)
    return _with(pair, pair.image_a, (pair.image_b * factor).astype(np.float32)), \
        f"MR x{factor:.1f}"


def _with(pair: PhantomPair, image_a: np.ndarray, image_b: np.ndarray) -> PhantomPair:
    return PhantomPair(image_a, pair.label_a, pair.grid_a, image_b, pair.label_b, pair.grid_b,
                       pair.misalignment)


DAMAGES: dict[str, Callable[[PhantomPair, np.random.Generator], tuple[PhantomPair, str]]] = {
    "noise": _noise, "blur": _blur, "bias": _bias, "rescale": _rescale}


def _truncated(pair: PhantomPair, rng: np.random.Generator, index: int) -> BenchCase:
    """CT (and its truth) cut along S to 35-65 % of its length, from the top or bottom."""
    keep = rng.uniform(0.35, 0.65)
    n = pair.image_a.shape[2]
    size = max(4, int(round(keep * n)))
    start = 0 if rng.uniform() < 0.5 else n - size
    affine = pair.grid_a.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.array([0, 0, start]) + affine[:3, 3]
    grid = Grid((pair.image_a.shape[0], pair.image_a.shape[1], size), affine)
    crop = (slice(None), slice(None), slice(start, start + size))
    return BenchCase(f"truncated_fov_{index:02d}", "truncated_fov", f"{keep:.0%} of S kept",
                     pair.image_a[crop], grid, pair.image_b, pair.grid_b, pair.label_a[crop])


def _misregistered(pair: PhantomPair, rng: np.random.Generator, index: int) -> BenchCase:
    distance = rng.uniform(10.0, 40.0)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    return BenchCase(f"misregistration_{index:02d}", "misregistration",
                     f"MR moved {distance:.0f} mm", pair.image_a, pair.grid_a, pair.image_b,
                     _shifted(pair.grid_b, direction * distance), pair.label_a)


def _swapped(pair: PhantomPair, index: int) -> BenchCase:
    """MR given as a, CT as b; the truth is the labels of the image given as a (the MR)."""
    return BenchCase(f"swapped_roles_{index:02d}", "swapped_roles", "MR as a, CT as b",
                     pair.image_b, pair.grid_b, pair.image_a, pair.grid_a, pair.label_b)


def head_pair(rng: np.random.Generator, size: int) -> BenchCase:
    """A head instead of an abdomen: scalp, skull, brain and ventricles in CT and MR (T2:
    CSF bright, skull dark); no structure the model knows, so the truth is empty."""
    radius = rng.uniform(70.0, 85.0)
    fov = np.full(3, 2.6 * radius)  # the whole head with a margin of air
    grids = (centred_grid(fov, fov / size, "RAS", np.zeros(3)),
             centred_grid(fov, fov / size * np.array([1.0, 1.0, 1.5]), "LPS", np.zeros(3)))
    images = []
    for grid, values in zip(grids, ((-1000, -80, 800, 35, 8), (0, 330, 30, 110, 600)),
                            strict=True):
        points = grid.world_points().reshape(3, *grid.shape)
        r = np.sqrt(points[0] ** 2 + (points[1] / 1.2) ** 2 + points[2] ** 2)
        image = np.full(grid.shape, values[0], np.float32)
        for limit, value in zip((radius, radius - 4, radius - 10, 18.0), values[1:],
                                strict=True):
            image[r < limit] = value
        images.append(image + rng.normal(0, 5, grid.shape).astype(np.float32))
    return BenchCase("", "non_abdominal", f"head, radius {radius:.0f} mm", images[0], grids[0],
                     images[1], grids[1], np.zeros(grids[0].shape, np.uint8))


def build_cases(counts: dict[str, int], size: int = 64, seed: int = 9000) -> list[BenchCase]:
    """Every case of the benchmark, deterministic in `seed`."""
    cases: list[BenchCase] = []
    for kind_index, (kind, count) in enumerate(sorted(counts.items())):
        for index in range(count):
            rng = np.random.default_rng([seed, kind_index, index])
            if kind == "non_abdominal":
                head = head_pair(rng, size)
                cases.append(BenchCase(f"{kind}_{index:02d}", kind, head.severity, head.image_a,
                                       head.grid_a, head.image_b, head.grid_b, head.truth))
                continue
            maker = PAIR_MAKERS["hard" if kind == "hard_study" else "easy"]
            pair = maker(rng, size=size)
            if kind in DAMAGES:
                damaged, severity = DAMAGES[kind](pair, rng)
                cases.append(_clean(damaged, kind, index, severity))
            elif kind == "truncated_fov":
                cases.append(_truncated(pair, rng, index))
            elif kind == "misregistration":
                cases.append(_misregistered(pair, rng, index))
            elif kind == "swapped_roles":
                cases.append(_swapped(pair, index))
            else:
                cases.append(_clean(pair, kind, index))
    return cases
