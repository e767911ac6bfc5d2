"""Two-modality abdominal phantoms: a CT-like volume a and an MR-like volume b per subject.

Why a phantom: no public labelled two-modality data can be shipped or downloaded here, yet
training, evaluation, export and serving all need realistic inputs with the properties CMC
is built for: two contrasts with different intensity orders, different voxel grids and
fields of view, and anatomy that is *not* aligned between the two scans.

How it works. A subject is a set of implicit shapes (ellipsoid unions) in an anatomical
frame (millimetres, centred on the torso, RAS axes) plus a smooth random displacement field
that makes every subject's organs a little different ("elastic" variation). A volume is
rendered by mapping each voxel centre of its grid from world space (NIfTI RAS, mm) into the
anatomical frame and classifying the point. Modality b's voxels first go through the
rigid + mild elastic "patient moved between the scans" transform, so its labels are
evaluated exactly in its own grid (equivalent to nearest-neighbour sampling of the
continuous label map) rather than resampled from a.

Shared with the hard study (`hard_anatomy`, `hard_study`), which builds on this phantom: the
tissue codes and their tables (`TISSUE_TO_LABEL`: tissue code -> class label, `CT_HU`,
`MR_SIGNAL`), the shapes (`Ellipsoid`, `SmoothField`, `Anatomy`, `euler_rotation`), the
grids (`Grid`, `centred_grid`), the scan-to-scan motion (`Misalignment`) and the intensity
renderers (`ct_intensities`, `mr_intensities`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cmc_train.errors import ConfigError

CLASSES: tuple[str, ...] = ("background", "liver", "spleen", "kidney_r", "kidney_l")

# Tissue codes of the rendered tissue map; TISSUE_TO_LABEL gives each code's class label.
AIR, FAT, SOFT, BONE, CANAL, AORTA, BOWEL_FLUID, BOWEL_GAS = range(8)
LIVER, SPLEEN, KIDNEY_R, KIDNEY_L, MEDULLA_R, MEDULLA_L = range(8, 14)
IVC = 14
TISSUE_TO_LABEL = np.zeros(15, dtype=np.uint8)
TISSUE_TO_LABEL[[LIVER, SPLEEN, KIDNEY_R, KIDNEY_L, MEDULLA_R, MEDULLA_L]] = [1, 2, 3, 4, 3, 4]

# Portal-venous CT (HU): kidney > spleen > liver > muscle > fat; distinct inside the
# [-175, 250] abdominal window. Medulla is labelled kidney but enhances less than cortex.
CT_HU = np.array([-1000, -100, 40, 700, 15, 260, 10, -950, 95, 125, 175, 175, 140, 140, 150],
                 np.float32)
# T2-weighted-like MR (a.u.): fluid and kidney bright, spleen bright, liver dark, flow void.
MR_SIGNAL = np.array([0, 330, 110, 60, 600, 25, 520, 0, 160, 400, 480, 480, 540, 540, 40],
                     np.float32)


@dataclass(frozen=True)
class Grid:
    """A voxel grid: shape (i, j, k) and its 4x4 voxel-to-world affine (NIfTI RAS, mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def world_points(self) -> np.ndarray:
        """World coordinates of every voxel centre (C order), [3, N] float32."""
        idx = np.indices(self.shape, dtype=np.float32).reshape(3, -1)
        return (self.affine[:3, :3].astype(np.float32) @ idx
                + self.affine[:3, 3:4].astype(np.float32))


def centred_grid(fov_mm: np.ndarray, spacing: np.ndarray, axcodes: str,
                 centre: np.ndarray) -> Grid:
    """Axis-aligned grid of `spacing` covering `fov_mm` around world point `centre`.

    `axcodes` gives the direction each voxel axis points to ("RAS", "LPS", ...), so that
    the two modalities are stored in different orientations like real scans are.
    """
    nx, ny, nz = (int(round(f / s)) for f, s in zip(fov_mm, spacing, strict=True))
    shape = (nx, ny, nz)
    signs = {"R": 1.0, "L": -1.0, "A": 1.0, "P": -1.0, "S": 1.0, "I": -1.0}
    affine = np.eye(4)
    for axis, code in enumerate(axcodes):
        affine[axis, axis] = signs[code] * spacing[axis]
    half = (np.asarray(shape) - 1) / 2.0
    affine[:3, 3] = centre - affine[:3, :3] @ half
    return Grid(shape=shape, affine=affine)


@dataclass(frozen=True)
class Ellipsoid:
    """Solid ellipsoid: centre and semi-axes in mm, rotation matrix (columns = local axes)."""

    centre: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray

    def inside(self, pts: np.ndarray) -> np.ndarray:
        """Boolean mask of the points [3, N] inside the ellipsoid.

        Only points within the bounding cube (half-edge = largest semi-axis) are
        transformed: organs are small compared with the volume, so this keeps rendering
        well under a second per case.
        """
        mask = np.zeros(pts.shape[1], dtype=bool)
        reach = float(self.radii.max())
        near = np.flatnonzero(np.abs(pts[0] - np.float32(self.centre[0])) < reach)
        for axis in (1, 2):
            near = near[np.abs(pts[axis, near] - np.float32(self.centre[axis])) < reach]
        centred = pts[:, near] - self.centre[:, None].astype(np.float32)
        local = (self.rotation.T / self.radii[:, None]).astype(np.float32) @ centred
        mask[near] = np.einsum("ij,ij->j", local, local) < 1.0
        return mask


def euler_rotation(angles_rad: np.ndarray) -> np.ndarray:
    """Rotation matrix from three Euler angles (x, then y, then z)."""
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _axis_angle(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rotation by `angle_rad` about unit vector `axis` (Rodrigues)."""
    x, y, z = axis
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * (k @ k)


class SmoothField:
    """A smooth random 3-vector displacement field (mm): a sum of low-frequency cosines.

    Random Fourier modes with wavelengths between `scale_mm` and 2x that, normalised so
    the root-mean-square length of the displacement vectors is `amplitude_mm`: models
    inter-subject shape variation and breathing. Defined everywhere in space, so both
    modalities' grids can sample it.
    """

    def __init__(self, rng: np.random.Generator, scale_mm: float, amplitude_mm: float,
                 modes: int = 6) -> None:
        directions = rng.standard_normal((3, modes, 3))
        directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
        wavelengths = rng.uniform(scale_mm, 2.0 * scale_mm, size=(3, modes, 1))
        self._k = (2 * np.pi * directions / wavelengths).astype(np.float32)
        self._phase = rng.uniform(0, 2 * np.pi, size=(3, modes, 1)).astype(np.float32)
        # A cosine with random phase has mean square 1/2; three components share the length.
        self._amp = np.float32(amplitude_mm / np.sqrt(3.0 * modes / 2.0))

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        """Displacement [3, N] at points [3, N]."""
        return np.stack([
            self._amp * np.cos(self._k[c] @ pts + self._phase[c]).sum(axis=0) for c in range(3)
        ])


@dataclass(frozen=True)
class Anatomy:
    """One subject: torso, skeleton, vessels, bowel and the four labelled organs."""

    body_radii: np.ndarray          # torso semi-axes in x (L-R) and y (P-A), mm
    fat_thickness: float            # subcutaneous fat, mm
    organs: dict[int, list[Ellipsoid]]  # tissue code -> ellipsoid union
    medulla: dict[int, Ellipsoid]   # kidney code -> inner region (labelled kidney, own contrast)
    bowel: list[tuple[Ellipsoid, int]]
    spine_centre: np.ndarray        # (x, y) of the vertebral body, mm
    spine_radius: float
    aorta_centre: np.ndarray
    aorta_radius: float
    ivc_centre: np.ndarray
    stomach: Ellipsoid
    deformation: SmoothField

    @classmethod
    def sample(cls, rng: np.random.Generator, fov_mm: np.ndarray) -> Anatomy:
        """Draw a subject whose torso fills most of a field of view `fov_mm` (x, y, z)."""
        scale = 1.0 + rng.uniform(-0.07, 0.07, size=2)
        rx, ry = 0.44 * fov_mm[0] * scale[0], 0.33 * fov_mm[1] * scale[1]
        rz = 0.5 * fov_mm[2]
        unit = np.array([rx, ry, rz])

        def organ(centre: tuple[float, float, float], radii: tuple[float, float, float],
                  tilt_deg: tuple[float, float, float]) -> Ellipsoid:
            c = (np.asarray(centre) + rng.uniform(-0.04, 0.04, 3)) * unit
            r = np.asarray(radii) * unit * rng.uniform(0.9, 1.1, 3)
            rot = euler_rotation(np.deg2rad(np.asarray(tilt_deg) + rng.uniform(-8, 8, 3)))
            return Ellipsoid(c, r, rot)

        organs = {
            # A large lobed liver on the patient's right (+x in RAS), anterior and superior.
            LIVER: [organ((0.38, 0.12, 0.32), (0.46, 0.58, 0.42), (0, 0, 10)),
                    organ((0.02, 0.32, 0.42), (0.36, 0.30, 0.24), (0, 0, -15)),
                    organ((0.55, -0.05, 0.05), (0.24, 0.36, 0.30), (0, 10, 0))],
            SPLEEN: [organ((-0.56, -0.28, 0.36), (0.24, 0.40, 0.34), (0, 0, -35))],
            # The right kidney sits lower than the left one (pushed down by the liver).
            KIDNEY_R: [organ((0.40, -0.52, -0.22), (0.24, 0.30, 0.42), (0, -12, 20))],
            KIDNEY_L: [organ((-0.40, -0.52, -0.04), (0.24, 0.30, 0.42), (0, 12, -20))],
        }
        medulla = {code: Ellipsoid(organs[code][0].centre, organs[code][0].radii * 0.55,
                                   organs[code][0].rotation) for code in (KIDNEY_R, KIDNEY_L)}
        # The stomach, left upper quadrant and anterior, with gas above its fluid (supine).
        # With the IVC to the right of the aorta it gives CT the lateral landmarks real
        # abdomens have: without them a CT patch of the left kidney and spleen looks like one
        # of the right kidney and liver (spleen and liver differ by 30 HU), and the tiny
        # model never predicted the left-side classes on CT (Dice 0 after 250 steps).
        stomach = organ((-0.36, 0.30, 0.62), (0.26, 0.24, 0.26), (0, 0, 20))
        bowel = []
        for _ in range(int(rng.integers(4, 8))):
            centre = (rng.uniform(-0.45, 0.45), rng.uniform(0.25, 0.7), rng.uniform(-0.9, -0.1))
            radii = tuple(rng.uniform(0.1, 0.2, 3))
            code = BOWEL_GAS if rng.uniform() < 0.3 else BOWEL_FLUID
            bowel.append((organ(centre, radii, (0, 0, float(rng.uniform(0, 180)))), code))
        return cls(
            body_radii=np.array([rx, ry]),
            fat_thickness=float(rng.uniform(0.08, 0.14) * ry),
            organs=organs, medulla=medulla, bowel=bowel,
            spine_centre=np.array([0.0, -0.72 * ry]), spine_radius=0.17 * ry,
            aorta_centre=np.array([-0.16 * rx, -0.45 * ry]), aorta_radius=0.08 * ry,
            ivc_centre=np.array([0.12 * rx, -0.40 * ry]), stomach=stomach,
            deformation=SmoothField(rng, scale_mm=0.6 * float(fov_mm.min()),
                                    amplitude_mm=0.04 * float(fov_mm.min())),
        )

    def tissues(self, pts: np.ndarray) -> np.ndarray:
        """Tissue code (uint8) of each anatomical-frame point [3, N] (mm, float32)."""
        pts = pts + self.deformation(pts)
        x, y = pts[0], pts[1]
        out = np.full(pts.shape[1], AIR, dtype=np.uint8)
        body = np.hypot(x / self.body_radii[0], y / self.body_radii[1])
        out[body < 1.0] = FAT
        out[body < 1.0 - self.fat_thickness / self.body_radii.min()] = SOFT
        for ellipsoid, code in self.bowel:
            out[ellipsoid.inside(pts)] = code
        spine = np.hypot(x - self.spine_centre[0], y - self.spine_centre[1])
        out[spine < self.spine_radius] = BONE
        canal_y = self.spine_centre[1] - 0.9 * self.spine_radius
        out[np.hypot(x - self.spine_centre[0], y - canal_y) < 0.45 * self.spine_radius] = CANAL
        aorta = np.hypot(x - self.aorta_centre[0], y - self.aorta_centre[1])
        out[aorta < self.aorta_radius] = AORTA
        out[np.hypot(x - self.ivc_centre[0], y - self.ivc_centre[1]) < self.aorta_radius] = IVC
        in_stomach = self.stomach.inside(pts)
        out[in_stomach] = BOWEL_FLUID
        gas_level = self.stomach.centre[1] + 0.35 * self.stomach.radii[1]
        out[in_stomach & (y > gas_level)] = BOWEL_GAS
        # Organs last, in priority order: smaller organs win where shapes touch.
        for code in (LIVER, SPLEEN, KIDNEY_R, KIDNEY_L):
            for ellipsoid in self.organs[code]:
                out[ellipsoid.inside(pts)] = code
        for kidney, inner in ((KIDNEY_R, MEDULLA_R), (KIDNEY_L, MEDULLA_L)):
            out[(out == kidney) & self.medulla[kidney].inside(pts)] = inner
        return out


@dataclass(frozen=True)
class Misalignment:
    """World-space motion of the patient between scan a and scan b.

    A point p of scan b's world corresponds to anatomical point
    R^T (p - centre - t) + centre, displaced by a mild elastic field.
    """

    rotation: np.ndarray
    translation: np.ndarray
    centre: np.ndarray
    elastic: SmoothField | None

    @classmethod
    def sample(cls, rng: np.random.Generator, centre: np.ndarray, fov_mm: np.ndarray,
               offset_mm: float, rotation_deg: float, elastic_mm: float) -> Misalignment:
        """Random direction; magnitudes drawn in [0.5, 1] x the given maxima (0 -> none)."""
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        translation = direction * offset_mm * rng.uniform(0.5, 1.0)
        axis = rng.standard_normal(3)
        axis /= np.linalg.norm(axis)
        angle = np.deg2rad(rotation_deg) * rng.uniform(0.5, 1.0)
        elastic = (SmoothField(rng, scale_mm=0.8 * float(fov_mm.min()), amplitude_mm=elastic_mm)
                   if elastic_mm > 0 else None)
        return cls(_axis_angle(axis, angle), translation, centre, elastic)

    def to_anatomy(self, pts: np.ndarray) -> np.ndarray:
        """Map scan-b world points [3, N] to scan-a world (= the subject's pose in a)."""
        centred = pts - (self.centre + self.translation)[:, None].astype(np.float32)
        moved = self.rotation.T.astype(np.float32) @ centred + self.centre[:, None]
        moved = moved.astype(np.float32)
        if self.elastic is not None:
            moved = moved + self.elastic(moved)
        return moved


def _smooth_texture(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-peak low-frequency texture (organ parenchyma heterogeneity)."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return noise / (float(np.abs(noise).max()) or 1.0)


def ct_intensities(tissues: np.ndarray, rng: np.random.Generator,
                   noise_hu: float = 12.0, table: np.ndarray = CT_HU,
                   blur_voxels: float = 0.6) -> np.ndarray:
    """CT volume in integer HU (int16): tissue HU, parenchymal texture, blur, gaussian noise.

    `table` gives each tissue code's HU (the hard study draws one per subject: contrast
    phase and calibration); `blur_voxels` is the point-spread sigma (scanner resolution).
    """
    hu = table[tissues]
    hu = hu + 10.0 * _smooth_texture(rng, tissues.shape, 2.0) * (tissues >= LIVER)
    hu = ndimage.gaussian_filter(hu, blur_voxels)
    hu = hu + rng.normal(0.0, noise_hu, size=hu.shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def mr_intensities(tissues: np.ndarray, rng: np.random.Generator,
                   noise_sigma: float = 14.0, table: np.ndarray = MR_SIGNAL,
                   blur_voxels: float = 0.6, bias: float = 0.18) -> np.ndarray:
    """MR volume (uint16 a.u.): tissue signal, smooth multiplicative bias field, Rician noise.

    `table` gives each tissue code's signal (the hard study draws one per subject: sequence
    weighting, fat suppression, receiver gain); `bias` bounds the bias field's coefficients.
    """
    signal = table[tissues]
    signal = signal * (1.0 + 0.08 * _smooth_texture(rng, tissues.shape, 2.0))
    signal = ndimage.gaussian_filter(signal, blur_voxels)
    # Bias field: exp of a random quadratic over the FOV in [-1, 1] voxel coordinates.
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in tissues.shape]
    u = np.meshgrid(*axes, indexing="ij")
    coeffs = rng.uniform(-bias, bias, size=6)
    log_bias = (coeffs[0] * u[0] + coeffs[1] * u[1] + coeffs[2] * u[2]
                + coeffs[3] * u[0] * u[1] + coeffs[4] * u[0] ** 2 + coeffs[5] * u[2] ** 2)
    signal = signal * np.exp(log_bias).astype(np.float32)
    real = signal + rng.normal(0.0, noise_sigma, size=signal.shape)
    imag = rng.normal(0.0, noise_sigma, size=signal.shape)
    return np.clip(np.rint(np.hypot(real, imag)), 0, 65535).astype(np.uint16)


@dataclass(frozen=True)
class PhantomPair:
    """One case: images and labels of both modalities, each on its own grid."""

    image_a: np.ndarray   # int16 HU
    label_a: np.ndarray   # uint8
    grid_a: Grid
    image_b: np.ndarray   # uint16 a.u.
    label_b: np.ndarray   # uint8
    grid_b: Grid
    misalignment: Misalignment


# Grid geometry of the two modalities (spacing in mm, axis directions, FOV vs a's FOV).
SPACING_A = np.array([1.5, 1.5, 1.5])
SPACING_B = np.array([2.0, 2.0, 3.0])
FOV_B_FACTOR = np.array([1.12, 1.12, 0.9])


def make_pair(rng: np.random.Generator, size: int = 64, offset_mm: float = 10.0,
              rotation_deg: float = 5.0, elastic_mm: float = 2.0,
              unpaired_rng: np.random.Generator | None = None) -> PhantomPair:
    """Render one subject in CT (a, RAS grid) and MR (b, LPS grid) with misalignment.

    With `unpaired_rng`, modality b shows a different subject drawn from that generator
    (the AMOS situation: CT and MRI of different patients).
    """
    if size < 16:
        raise ConfigError(f"phantom size must be >= 16 voxels, got {size}")
    fov_a = SPACING_A * size
    centre = rng.uniform(-5.0, 5.0, 3)
    grid_a = centred_grid(fov_a, SPACING_A, "RAS", centre)
    fov_b = fov_a * FOV_B_FACTOR
    grid_b = centred_grid(fov_b, SPACING_B, "LPS", centre + rng.uniform(-4.0, 4.0, 3))
    subject_a = Anatomy.sample(rng, fov_a)
    subject_b = subject_a if unpaired_rng is None else Anatomy.sample(unpaired_rng, fov_a)
    motion = Misalignment.sample(rng, centre, fov_b, offset_mm, rotation_deg, elastic_mm)

    pts_a = grid_a.world_points() - centre[:, None].astype(np.float32)
    tissues_a = subject_a.tissues(pts_a).reshape(grid_a.shape)
    pts_b = motion.to_anatomy(grid_b.world_points()) - centre[:, None].astype(np.float32)
    tissues_b = subject_b.tissues(pts_b).reshape(grid_b.shape)
    return PhantomPair(
        image_a=ct_intensities(tissues_a, rng), label_a=TISSUE_TO_LABEL[tissues_a],
        grid_a=grid_a,
        image_b=mr_intensities(tissues_b, rng), label_b=TISSUE_TO_LABEL[tissues_b],
        grid_b=grid_b, misalignment=motion,
    )
