"""Subjects of the hard study: the easy phantom's anatomy, varied at every scale, plus lesions.

Why: on the easy phantom four labelled volumes cover nearly all the variation between
subjects, so 10 % and 100 % labels train equally good models and a semi-supervised method
has nothing to add. Here a subject is drawn as in the easy study (`Anatomy.sample`) and then
changed at each scale, so that a few labelled subjects leave most of the population unseen:

- body habitus: torso width and depth, subcutaneous fat from thin to obese;
- organs: each organ's size (per axis), position and orientation; the liver's lobes each
  scaled on their own and an optional extra (Riedel's) lobe, an optional accessory lobule of
  the spleen (part-scale shape);
- a stronger, shorter-wavelength deformation field (local shape);
- one to three lesions inside the organs, labelled as their organ but with their own
  contrast (drawn per lesion by the scanner module: hypo- or hyper-intense).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from cmc_train.synth.phantom import (
    KIDNEY_L,
    KIDNEY_R,
    LIVER,
    MEDULLA_L,
    MEDULLA_R,
    SPLEEN,
    TISSUE_TO_LABEL,
    Anatomy,
    Ellipsoid,
    SmoothField,
    euler_rotation,
)

# Lesion tissue codes follow the easy phantom's 15 codes: lesion i is code FIRST_LESION + i.
FIRST_LESION = len(TISSUE_TO_LABEL)
MAX_LESIONS = 3
ORGANS = (LIVER, SPLEEN, KIDNEY_R, KIDNEY_L)
_MEDULLA = {KIDNEY_R: MEDULLA_R, KIDNEY_L: MEDULLA_L}  # a kidney lesion may reach the medulla


def tissue_to_label(lesion_organs: tuple[int, ...]) -> np.ndarray:
    """Tissue code -> class label, with each lesion labelled as the organ that holds it."""
    table = np.zeros(FIRST_LESION + MAX_LESIONS, dtype=np.uint8)
    table[:FIRST_LESION] = TISSUE_TO_LABEL
    for i, organ in enumerate(lesion_organs):
        table[FIRST_LESION + i] = TISSUE_TO_LABEL[organ]
    return table


def _scaled(ellipsoid: Ellipsoid, about: np.ndarray, shift: np.ndarray, size: np.ndarray,
            turn: np.ndarray) -> Ellipsoid:
    """`ellipsoid` scaled by `size` (per local axis) and turned by `turn` about the organ's
    centre `about`, then moved by `shift` (mm): organ-level variation of a multi-part organ."""
    centre = about + shift + turn @ ((ellipsoid.centre - about) * size)
    return Ellipsoid(centre, ellipsoid.radii * size, turn @ ellipsoid.rotation)


@dataclass(frozen=True)
class HardAnatomy(Anatomy):
    """An `Anatomy` with lesions: (ellipsoid, organ code) each, painted inside their organ."""

    lesions: tuple[tuple[Ellipsoid, int], ...] = ()

    @property
    def lesion_organs(self) -> tuple[int, ...]:
        return tuple(organ for _, organ in self.lesions)

    def tissues(self, pts: np.ndarray) -> np.ndarray:
        """Tissue codes as `Anatomy.tissues`, lesions (codes FIRST_LESION + i) on top, in
        the same deformed frame so that a lesion moves with its organ."""
        out = super().tissues(pts)
        moved = pts + self.deformation(pts)
        for i, (lesion, organ) in enumerate(self.lesions):
            own = np.isin(out, (organ, _MEDULLA.get(organ, organ)))
            out[lesion.inside(moved) & own] = FIRST_LESION + i
        return out


def sample_hard_anatomy(rng: np.random.Generator, fov_mm: np.ndarray) -> HardAnatomy:
    """Draw a subject: `Anatomy.sample`, then habitus, organ, part and local variation."""
    base = Anatomy.sample(rng, fov_mm)
    habitus = np.array([rng.uniform(0.82, 1.12), rng.uniform(0.78, 1.15), 1.0])
    body_radii = base.body_radii * habitus[:2]
    ry = float(body_radii[1])
    unit = np.array([body_radii[0], ry, 0.5 * fov_mm[2]])
    organs: dict[int, list[Ellipsoid]] = {}
    for code in ORGANS:
        parts = base.organs[code]
        if code == LIVER:  # lobes vary on their own, an extra lobe now and then
            parts = [dataclasses.replace(p, radii=p.radii * rng.uniform(0.75, 1.25, 3))
                     for p in parts]
            if rng.uniform() < 0.5:
                tip = parts[0].centre + np.array([0.1, -0.1, -0.55]) * unit
                parts.append(Ellipsoid(tip, np.array([0.16, 0.2, 0.3]) * unit
                                       * rng.uniform(0.8, 1.2, 3), parts[0].rotation))
        elif code == SPLEEN and rng.uniform() < 0.4:  # an accessory lobule below the tip
            tip = parts[0].centre + np.array([0.08, 0.1, -0.42]) * unit
            parts = [*parts, Ellipsoid(tip, np.array([0.12, 0.12, 0.12]) * unit,
                                       parts[0].rotation)]
        with_body = parts[0].centre * habitus  # organs move with the body ...
        shift = rng.uniform(-0.12, 0.12, 3) * unit
        size = rng.uniform(0.72, 1.3) * rng.uniform(0.85, 1.15, 3)  # ... but size on their own
        turn = euler_rotation(np.deg2rad(rng.uniform(-20, 20, 3)))
        move = with_body - parts[0].centre + shift
        organs[code] = [_scaled(p, parts[0].centre, move, size, turn) for p in parts]
    medulla = {code: Ellipsoid(organs[code][0].centre,
                               organs[code][0].radii * rng.uniform(0.45, 0.65),
                               organs[code][0].rotation) for code in (KIDNEY_R, KIDNEY_L)}
    lesions = []
    for _ in range(int(rng.integers(1, MAX_LESIONS + 1))):
        organ = int(rng.choice(ORGANS, p=(0.55, 0.2, 0.125, 0.125)))
        host = organs[organ][0]
        offset = host.rotation @ (rng.uniform(-0.5, 0.5, 3) * host.radii)
        radius = rng.uniform(0.15, 0.35) * float(host.radii.min())
        lesions.append((Ellipsoid(host.centre + offset, radius * rng.uniform(0.8, 1.2, 3),
                                  euler_rotation(rng.uniform(0, np.pi, 3))), organ))
    return HardAnatomy(
        body_radii=body_radii,
        fat_thickness=float(rng.uniform(0.04, 0.3) * ry),
        organs=organs, medulla=medulla,
        bowel=[(dataclasses.replace(e, centre=e.centre * habitus), code)
               for e, code in base.bowel],
        spine_centre=base.spine_centre * habitus[:2], spine_radius=base.spine_radius,
        aorta_centre=base.aorta_centre * habitus[:2], aorta_radius=base.aorta_radius,
        ivc_centre=base.ivc_centre * habitus[:2],
        stomach=dataclasses.replace(base.stomach, centre=base.stomach.centre * habitus,
                                    radii=base.stomach.radii * rng.uniform(0.7, 1.3, 3)),
        deformation=SmoothField(rng, scale_mm=0.35 * float(fov_mm.min()),
                                amplitude_mm=0.06 * float(fov_mm.min())),
        lesions=tuple(lesions),
    )
