"""The hard study's scans: per-subject scanners and contrast, and the CT / MR pair of a case.

Why: besides anatomy (`hard_anatomy`), what a few labelled scans fail to cover in real data
is the scanner and the modality. Every subject here gets its own:

- CT protocol: contrast phase (liver 70-120 HU; the spleen only 0-20 HU above the liver,
  nearly iso-intense as in portal-venous CT; kidney cortex 140-240 HU with a medulla 10-110
  HU darker, i.e. from no to strong corticomedullary differentiation; oral contrast in the
  bowel now and then, as bright as kidney), calibration (scale and offset), noise, blur,
  in-plane spacing, slice thickness and a field of view that may cut organs;
- MR protocol: a T2-like weighting in which the spleen is clearly brighter than the liver
  (the modality gap: what CT hardly shows, MR shows) and muscle darker than the liver, a
  kidney medulla from much darker to brighter than the cortex (sequence and hydration),
  bowel bright with fluid or dark with a negative oral contrast agent now and then, fat
  either bright or suppressed, receiver gain, noise, bias field strength, blur, spacing,
  slice thickness and field of view;
- lesion contrast: each lesion hypo- or hyper-intense against its organ, on its own in
  each modality.

Rendering reuses the easy phantom's `ct_intensities` / `mr_intensities` with the drawn
tables, so both studies share one code path; the easy study is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cmc_train.errors import ConfigError
from cmc_train.synth.hard_anatomy import (
    FIRST_LESION,
    MAX_LESIONS,
    HardAnatomy,
    sample_hard_anatomy,
    tissue_to_label,
)
from cmc_train.synth.phantom import (
    AORTA,
    BONE,
    BOWEL_FLUID,
    BOWEL_GAS,
    CANAL,
    CT_HU,
    FAT,
    IVC,
    KIDNEY_L,
    KIDNEY_R,
    LIVER,
    MEDULLA_L,
    MEDULLA_R,
    MR_SIGNAL,
    SOFT,
    SPLEEN,
    Grid,
    Misalignment,
    PhantomPair,
    centred_grid,
    ct_intensities,
    mr_intensities,
)


@dataclass(frozen=True)
class Protocol:
    """One scan's acquisition: tissue -> intensity table, noise, blur, bias and grid."""

    table: np.ndarray
    noise: float
    blur_voxels: float
    bias: float
    spacing: np.ndarray
    fov_factor: np.ndarray   # field of view as a multiple of the nominal one, per axis


def _lesion_values(table: np.ndarray, anatomy: HardAnatomy, rng: np.random.Generator,
                   contrast: tuple[float, float], relative: bool) -> None:
    """Fill the lesion codes of `table`: organ value + (or x) a draw from `contrast`."""
    for i, organ in enumerate(anatomy.lesion_organs):
        change = rng.uniform(*contrast)
        table[FIRST_LESION + i] = table[organ] * change if relative else table[organ] + change


def ct_protocol(rng: np.random.Generator, anatomy: HardAnatomy) -> Protocol:
    """A CT scan: contrast phase, calibration, noise, resolution and field of view."""
    table = np.zeros(FIRST_LESION + MAX_LESIONS, np.float32)
    table[:len(CT_HU)] = CT_HU
    liver = rng.uniform(70, 120)
    cortex = rng.uniform(140, 240)
    table[[FAT, SOFT, BONE, CANAL, AORTA]] = [rng.uniform(-120, -80), rng.uniform(30, 60),
                                             rng.uniform(500, 900), rng.uniform(5, 25),
                                             rng.uniform(120, 320)]
    table[IVC] = table[AORTA] * rng.uniform(0.5, 1.0)
    table[BOWEL_FLUID] = rng.uniform(150, 300) if rng.uniform() < 0.3 else rng.uniform(0, 30)
    table[[LIVER, SPLEEN]] = [liver, liver + rng.uniform(0, 20)]
    table[[KIDNEY_R, KIDNEY_L]] = cortex
    table[[MEDULLA_R, MEDULLA_L]] = cortex - rng.uniform(10, 110)
    _lesion_values(table, anatomy, rng, (-60.0, 40.0), relative=False)
    table = table * rng.uniform(0.93, 1.07) + rng.uniform(-25, 25)
    in_plane = rng.uniform(1.25, 1.75)
    return Protocol(table=table.astype(np.float32), noise=rng.uniform(6, 30),
                    blur_voxels=rng.uniform(0.4, 1.2), bias=0.0,
                    spacing=np.array([in_plane, in_plane, rng.uniform(1.5, 3.5)]),
                    fov_factor=np.array([*[rng.uniform(0.85, 1.05)] * 2,
                                         rng.uniform(0.6, 1.0)]))


def mr_protocol(rng: np.random.Generator, anatomy: HardAnatomy) -> Protocol:
    """An MR scan: T2-like weighting, fat suppression or not, gain, noise, bias, grid.

    Tried and measured instead (BENCHMARKS.md, hard synthetic study): T1-like scans mixed
    in at even odds (the tiny model then learnt no MR in 250 steps, worse with 40 labelled
    cases than with 4), wider MR contrast ranges (the spleen died on MR at 100 %), normal,
    fatty or iron-loaded livers (the MR liver fell at both ratios) and less noise and bias
    alone (10 % gained as much as 100 %): the kidney and bowel variation is what makes the
    MR side need its labels.
    """
    table = np.zeros(FIRST_LESION + MAX_LESIONS, np.float32)
    table[:len(MR_SIGNAL)] = MR_SIGNAL
    liver = rng.uniform(100, 190)
    cortex = rng.uniform(380, 560)
    fat = rng.uniform(40, 90) if rng.uniform() < 0.5 else rng.uniform(280, 420)
    table[[FAT, SOFT, BONE, CANAL, AORTA, IVC, BOWEL_FLUID]] = [
        fat, rng.uniform(50, 85), rng.uniform(40, 90), rng.uniform(550, 700),
        rng.uniform(10, 60), rng.uniform(20, 80),
        rng.uniform(20, 80) if rng.uniform() < 0.3 else rng.uniform(450, 700)]
    table[BOWEL_GAS] = 0.0
    table[[LIVER, SPLEEN]] = [liver, liver * rng.uniform(2.0, 3.2)]
    table[[KIDNEY_R, KIDNEY_L]] = cortex
    table[[MEDULLA_R, MEDULLA_L]] = cortex * rng.uniform(0.45, 1.35)
    _lesion_values(table, anatomy, rng, (0.5, 1.9), relative=True)
    gain = rng.uniform(0.4, 3.0)
    in_plane = rng.uniform(1.6, 2.4)
    return Protocol(table=(table * gain).astype(np.float32), noise=gain * rng.uniform(4, 14),
                    blur_voxels=rng.uniform(0.4, 1.2), bias=rng.uniform(0.1, 0.35),
                    spacing=np.array([in_plane, in_plane, rng.uniform(2.5, 4.5)]),
                    fov_factor=np.array([*[rng.uniform(0.95, 1.2)] * 2,
                                         rng.uniform(0.6, 1.0)]))


def _grid(protocol: Protocol, nominal_fov: np.ndarray, axcodes: str,
          centre: np.ndarray) -> Grid:
    return centred_grid(nominal_fov * protocol.fov_factor, protocol.spacing, axcodes, centre)


def make_hard_pair(rng: np.random.Generator, size: int = 64, offset_mm: float = 10.0,
                   rotation_deg: float = 5.0, elastic_mm: float = 2.0,
                   unpaired_rng: np.random.Generator | None = None) -> PhantomPair:
    """Render one hard-study subject in CT (a, RAS grid) and MR (b, LPS grid).

    Same contract as `phantom.make_pair` (`size`: the nominal CT field of view is 1.5 x size
    mm per axis; the misalignment options and `unpaired_rng` mean the same), but grids,
    contrast and anatomy vary per subject as the module docstring says. The field of view
    is moved along z by up to 15 % of its nominal length, so organs at its ends are cut.
    """
    if size < 16:
        raise ConfigError(f"phantom size must be >= 16 voxels, got {size}")
    nominal = np.full(3, 1.5 * size)
    subject_a = sample_hard_anatomy(rng, nominal)
    subject_b = subject_a if unpaired_rng is None else sample_hard_anatomy(unpaired_rng,
                                                                           nominal)
    ct, mr = ct_protocol(rng, subject_a), mr_protocol(rng, subject_b)
    centre = rng.uniform(-5.0, 5.0, 3)  # of the subject; the scans look a little off it
    cut = np.array([0.0, 0.0, rng.uniform(-0.15, 0.15) * nominal[2]])
    grid_a = _grid(ct, nominal, "RAS", centre + cut)
    grid_b = _grid(mr, nominal, "LPS", centre + cut + rng.uniform(-6.0, 6.0, 3))
    motion = Misalignment.sample(rng, centre, nominal, offset_mm, rotation_deg, elastic_mm)

    shift = centre[:, None].astype(np.float32)
    tissues_a = subject_a.tissues(grid_a.world_points() - shift).reshape(grid_a.shape)
    tissues_b = subject_b.tissues(motion.to_anatomy(grid_b.world_points())
                                  - shift).reshape(grid_b.shape)
    return PhantomPair(
        image_a=ct_intensities(tissues_a, rng, ct.noise, ct.table, ct.blur_voxels),
        label_a=tissue_to_label(subject_a.lesion_organs)[tissues_a], grid_a=grid_a,
        image_b=mr_intensities(tissues_b, rng, mr.noise, mr.table, mr.blur_voxels, mr.bias),
        label_b=tissue_to_label(subject_b.lesion_organs)[tissues_b], grid_b=grid_b,
        misalignment=motion,
    )
