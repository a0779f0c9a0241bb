"""Synthetic thigh CT: both thighs with known ground truth.

No labelled thigh CT can be downloaded, so training data, test fixtures and the demo input are
generated here. Each subject (one seed) gets its own habitus — muscle mass (sarcopenia), fat
thickness (obesity), intramuscular fat and muscle density (age) — and the anatomy changes along z
from the proximal thigh (large adductors, thin femur) to the distal thigh (quadriceps dominant,
widening femoral condyles). The image is rendered in patient coordinates (mm), so the same subject
looks the same at any matrix size.

Geometry per leg, in a local frame where +u points medially and +v posteriorly:
skin ▸ subcutaneous fat ▸ deep fascia ▸ muscle compartment. Inside the fascia, rays from a point
behind the femur split the compartment into extensor (anterolateral), adductor (medial) and flexor
(posterior) groups, separated by intermuscular fat septa; femoral vessels and the sciatic nerve sit
in fat pockets on the septa. Intramuscular fat is a smooth 3D field inside the groups (labelled as
muscle, as in manual contours); septa, bone, vessels and fat are background.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from thighseg.core.labels import Group

HU_AIR = -1000.0
HU_FAT = -100.0
HU_SKIN = 40.0
HU_FASCIA = 60.0
HU_CORTEX = 1500.0
HU_MARROW = -40.0
HU_VESSEL = 40.0
HU_NERVE = 30.0


@dataclass(frozen=True)
class Site:
    """Scanner, protocol and population of one institution (the paper had an internal and an
    external one): the external site is noisier, uses a wider field of view and thinner slices,
    and sees older, fatter patients."""

    name: str = "internal"
    noise_scale: float = 1.0
    fov_margin_mm: tuple[float, float] = (40.0, 90.0)
    fat_scale: float = 1.0
    age_range: tuple[float, float] = (20.0, 85.0)
    slice_spacing_mm: float = 5.0


INTERNAL = Site()
EXTERNAL = Site(
    name="external",
    noise_scale=1.7,
    fov_margin_mm=(110.0, 160.0),
    fat_scale=1.35,
    age_range=(45.0, 90.0),
    slice_spacing_mm=3.0,
)


@dataclass(frozen=True)
class Subject:
    """Habitus of one synthetic subject; all lengths in mm."""

    seed: int
    age: float
    muscle_radius: float  # radius of the deep-fascia envelope at the proximal thigh
    fat_thickness: float  # subcutaneous fat
    muscle_hu: float  # mean density of lean muscle
    imat_fraction: float  # fraction of group voxels that are intramuscular fat
    septum_width: float  # intermuscular fat septa
    leg_gap: float  # skin-to-skin distance between the thighs
    thigh_length: float
    femur_radius: float
    noise_hu: float  # scanner noise (SD)
    shape_coefficients: tuple[float, ...]  # Fourier shape terms of the fascia, per leg
    boundary_offsets: tuple[float, ...]  # per-subject shifts of the group boundaries (rad)
    asymmetry: float  # relative size difference left vs right

    @staticmethod
    def sample(seed: int, site: Site = INTERNAL) -> Subject:
        rng = np.random.default_rng([seed, 1])
        age = float(rng.uniform(*site.age_range))
        ageing = float(np.clip((age - 20) / 65, 0, 1))
        sarcopenia = float(rng.uniform(0.0, 1.0)) * (0.4 + 0.6 * ageing)
        return Subject(
            seed=seed,
            age=age,
            muscle_radius=float(rng.uniform(58, 70) * (1 - 0.25 * sarcopenia)),
            fat_thickness=float(
                rng.choice([rng.uniform(5, 15), rng.uniform(12, 30), rng.uniform(25, 45)])
                * site.fat_scale
            ),
            muscle_hu=float(rng.normal(58 - 18 * ageing, 4)),
            imat_fraction=float(np.clip(0.02 + 0.12 * ageing * rng.uniform(0.3, 1.2), 0.01, 0.2)),
            septum_width=float(rng.uniform(1.2, 3.0) + 1.5 * ageing),
            leg_gap=float(rng.uniform(4, 40)),
            thigh_length=float(rng.uniform(360, 450)),
            femur_radius=float(rng.uniform(12, 15)),
            noise_hu=float(rng.uniform(8, 20) * site.noise_scale),
            shape_coefficients=tuple(float(c) for c in rng.normal(0, 0.035, size=8)),
            boundary_offsets=tuple(float(o) for o in rng.normal(0, 0.08, size=3)),
            asymmetry=float(rng.normal(0, 0.03)),
        )


@dataclass(frozen=True)
class Geometry:
    """Slice grid: square slices, pixel centres in patient coordinates (LPS, mm)."""

    size: int
    field_of_view: float
    slice_positions: np.ndarray  # z (mm) per slice, proximal first (descending z)
    thigh_levels: np.ndarray  # 0 = proximal thigh ... 1 = distal thigh, per slice

    @property
    def pixel_spacing(self) -> float:
        return self.field_of_view / self.size

    @property
    def slice_spacing(self) -> float:
        if len(self.slice_positions) < 2:
            return self.pixel_spacing
        return float(abs(self.slice_positions[0] - self.slice_positions[1]))

    @property
    def origin_xy(self) -> tuple[float, float]:
        """Patient x, y of the centre of the first (top-left) pixel."""
        half = self.field_of_view / 2
        return -half + self.pixel_spacing / 2, -half + self.pixel_spacing / 2


@dataclass
class Phantom:
    subject: Subject
    geometry: Geometry
    hu: np.ndarray  # float32 (z, y, x)
    labels: np.ndarray  # uint8 (z, y, x), values of Group

    def group_volumes_ml(self) -> dict[str, float]:
        voxel_ml = self.geometry.pixel_spacing**2 * self.geometry.slice_spacing / 1000
        return {g.name.lower(): float((self.labels == g).sum() * voxel_ml) for g in Group if g}


def make_geometry(
    subject: Subject,
    size: int = 512,
    slices: int = 72,
    field_of_view: float | None = None,
    slice_spacing: float | None = None,
    site: Site = INTERNAL,
) -> Geometry:
    """Axial slices, proximal to distal: spread over 5-95 % of the thigh length, or `slice_spacing`
    mm apart around mid-thigh."""
    if size < 32 or slices < 1:
        raise ValueError(
            f"phantom needs size >= 32 and slices >= 1, got size={size}, slices={slices}"
        )
    coverage = (0.05, 0.95)
    if slice_spacing is not None:
        half_span = min(0.45, (slices - 1) * slice_spacing / subject.thigh_length / 2)
        coverage = (0.5 - half_span, 0.5 + half_span)
    if field_of_view is None:
        rng = np.random.default_rng([subject.seed, 2])
        span = 4 * (subject.muscle_radius + subject.fat_thickness) + subject.leg_gap
        field_of_view = float(max(360.0, span + rng.uniform(*site.fov_margin_mm)))
    levels = np.linspace(coverage[0], coverage[1], slices)
    # proximal slice has the highest z (LPS: +z superior)
    z = -levels * subject.thigh_length + 100.0
    return Geometry(size=size, field_of_view=field_of_view, slice_positions=z, thigh_levels=levels)


def generate(
    seed: int,
    size: int = 512,
    slices: int = 72,
    field_of_view: float | None = None,
    slice_spacing: float | None = None,
    site: Site = INTERNAL,
) -> Phantom:
    """Render one subject (deterministic for a seed, site and geometry)."""
    subject = Subject.sample(seed, site)
    geometry = make_geometry(
        subject,
        size=size,
        slices=slices,
        field_of_view=field_of_view,
        slice_spacing=slice_spacing,
        site=site,
    )
    rng = np.random.default_rng([seed, 3, size, slices])
    x0, y0 = geometry.origin_xy
    coords = x0 + geometry.pixel_spacing * np.arange(size, dtype=np.float32)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    imat_field = _smooth_field(rng, geometry, correlation_mm=6.0)
    texture_field = _smooth_field(rng, geometry, correlation_mm=2.5)
    hu = np.empty((slices, size, size), dtype=np.float32)
    labels = np.empty((slices, size, size), dtype=np.uint8)
    for k, level in enumerate(geometry.thigh_levels):
        hu[k], labels[k] = _render_slice(
            subject, float(level), xx, yy, imat_field[k], texture_field[k]
        )
    blur_px = 0.6 / geometry.pixel_spacing + 0.35  # scanner point-spread / partial volume
    hu = ndimage.gaussian_filter(hu, sigma=(0, blur_px, blur_px))
    hu += _scanner_noise(rng, hu.shape, subject.noise_hu, geometry.pixel_spacing)
    return Phantom(subject=subject, geometry=geometry, hu=hu, labels=labels)


def _smooth_field(
    rng: np.random.Generator, geometry: Geometry, correlation_mm: float
) -> np.ndarray:
    """Unit-variance Gaussian random field with the given correlation length, on the slice grid."""
    coarse_mm = correlation_mm / 2
    n = max(8, int(round(geometry.field_of_view / coarse_mm)))
    nz = max(2, int(np.ceil(geometry.slice_spacing * len(geometry.thigh_levels) / coarse_mm)) + 1)
    field = ndimage.gaussian_filter(rng.standard_normal((nz, n, n)).astype(np.float32), sigma=1.5)
    field /= field.std() + 1e-6
    zi = np.linspace(0, nz - 1, len(geometry.thigh_levels))
    yi = np.linspace(0, n - 1, geometry.size, dtype=np.float32)
    grid_y, grid_x = np.meshgrid(yi, yi, indexing="ij")
    out = np.empty((len(zi), geometry.size, geometry.size), dtype=np.float32)
    for k in range(len(zi)):  # per slice keeps memory at one slice of coordinates
        out[k] = ndimage.map_coordinates(
            field, [np.full_like(grid_y, zi[k]), grid_y, grid_x], order=1
        )
    return out


def _scanner_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sd: float, pixel_mm: float
) -> np.ndarray:
    """Slightly correlated noise, as in filtered back-projection reconstructions."""
    noise = rng.standard_normal(shape).astype(np.float32)
    sigma = 0.4 / pixel_mm + 0.3
    noise = ndimage.gaussian_filter(noise, sigma=(0, sigma, sigma))
    return noise * (sd / (noise.std() + 1e-6))


def _render_slice(
    subject: Subject,
    level: float,
    xx: np.ndarray,
    yy: np.ndarray,
    imat: np.ndarray,
    texture: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    hu = np.full(xx.shape, HU_AIR, dtype=np.float32)
    labels = np.zeros(xx.shape, dtype=np.uint8)
    _render_table(subject, xx, yy, hu)
    taper = 1.0 - 0.28 * level  # the thigh narrows towards the knee
    outer = subject.muscle_radius * taper + subject.fat_thickness * (1 - 0.3 * level) + 2.0
    for side in (-1, +1):  # -1: patient right (negative x in LPS), +1: patient left
        size = 1 + side * subject.asymmetry / 2
        centre_x = side * (outer * size + subject.leg_gap / 2)
        _render_leg(
            subject, level, taper * size, side, xx - centre_x, yy, imat, texture, hu, labels
        )
    return hu, labels


def _render_table(subject: Subject, xx: np.ndarray, yy: np.ndarray, hu: np.ndarray) -> None:
    """CT couch below the legs: foam core in a thin carbon shell."""
    top = subject.muscle_radius + subject.fat_thickness + 12.0
    slab = (yy > top) & (yy < top + 25.0)
    hu[slab] = -750.0
    hu[slab & ((yy < top + 1.5) | (yy > top + 23.5))] = 250.0


def _render_leg(
    subject: Subject,
    level: float,
    scale: float,
    side: int,
    dx: np.ndarray,
    yy: np.ndarray,
    imat: np.ndarray,
    texture: np.ndarray,
    hu: np.ndarray,
    labels: np.ndarray,
) -> None:
    u = dx * -side  # medial positive
    v = yy  # posterior positive
    radius = np.hypot(u, v)
    angle = np.arctan2(u, -v)  # 0 anterior, +pi/2 medial, +-pi posterior
    c = subject.shape_coefficients
    drift = 0.5 * np.sin(2 * np.pi * level + side)  # the outline changes smoothly along z
    shape = (
        1
        + 0.06 * np.cos(2 * angle)
        + c[0] * np.cos(2 * angle + c[1] * 20 + drift)
        + c[2] * np.cos(3 * angle + c[3] * 20)
        + c[4] * np.cos(4 * angle + drift)
    )
    fascia_r = subject.muscle_radius * scale * shape
    fat_r = fascia_r + subject.fat_thickness * (1 - 0.3 * level) * (1 + 0.25 * np.cos(angle + 2.2))
    skin_r = fat_r + 2.0

    hu[radius < skin_r] = HU_SKIN
    hu[radius < fat_r] = HU_FAT
    hu[radius < fascia_r + 1.2] = HU_FASCIA
    inside = radius < fascia_r

    # Femur: slightly anterolateral, cortex thins and the shaft widens into the condyles distally.
    femur_r = subject.femur_radius * (1 + 0.9 * max(0.0, level - 0.78) / 0.22)
    femur_u, femur_v = -0.08 * subject.muscle_radius * scale, -0.05 * subject.muscle_radius * scale
    femur_d = np.hypot(u - femur_u, v - femur_v)
    cortex = max(1.5, 5.5 * (1 - 1.6 * abs(level - 0.5)))

    # Group boundaries: rays from a point behind the femur, bending with distance.
    ou, ov = femur_u + 0.1 * femur_r, femur_v + 1.35 * femur_r
    ru, rv = u - ou, v - ov
    r_o = np.hypot(ru, rv)
    beta = np.arctan2(ru, -rv)
    rel = r_o / (subject.muscle_radius * scale)
    b = subject.boundary_offsets
    adductor_span = 1.75 - 1.15 * level
    lateral = -1.95 + b[0] + 0.25 * rel + 0.05 * np.sin(4 * level)
    anteromedial = 0.55 + 0.35 * level + b[1] - 0.2 * rel
    posteromedial = anteromedial + adductor_span + b[2] + 0.15 * rel
    wrapped = np.mod(beta - lateral, 2 * np.pi)  # 0 at the lateral septum, increasing anteriorly
    group = np.full(u.shape, Group.FLEXOR, dtype=np.uint8)
    group[wrapped < np.mod(anteromedial - lateral, 2 * np.pi)] = Group.EXTENSOR
    in_adductor = (wrapped >= np.mod(anteromedial - lateral, 2 * np.pi)) & (
        wrapped < np.mod(posteromedial - lateral, 2 * np.pi)
    )
    group[in_adductor] = Group.ADDUCTOR

    septum = np.zeros(u.shape, dtype=bool)
    half_width = (subject.septum_width * (0.6 + 0.8 * rel)) / 2
    for boundary in (lateral, anteromedial, posteromedial):
        delta = beta - boundary
        septum |= (np.abs(r_o * np.sin(delta)) < half_width) & (np.cos(delta) > 0)
    vessels, vessel_core = _fat_pocket(ru, rv, anteromedial, 0.45, subject, scale, inside)
    nerve, nerve_core = _fat_pocket(ru, rv, posteromedial + 0.3, 0.5, subject, scale, inside)

    muscle = inside & ~septum & ~vessels & ~nerve & (femur_d >= femur_r + 1.0)
    lean_hu = subject.muscle_hu + 6.0 * texture
    fat_weight = np.clip((imat - _imat_threshold(subject.imat_fraction)) / 0.6, 0, 1)
    tissue = lean_hu * (1 - fat_weight) + HU_FAT * fat_weight
    hu[inside & ~muscle] = HU_FAT
    hu[vessel_core] = HU_VESSEL
    hu[nerve_core] = HU_NERVE
    hu[muscle] = tissue[muscle]
    labels[muscle] = group[muscle]
    hu[femur_d < femur_r] = HU_CORTEX
    hu[femur_d < femur_r - cortex] = HU_MARROW


def _fat_pocket(
    ru: np.ndarray,
    rv: np.ndarray,
    angle: float | np.ndarray,
    depth: float,
    subject: Subject,
    scale: float,
    inside: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """A fat pocket on a septum around a round structure (vessels, nerve): (pocket, structure)."""
    a = float(np.mean(angle))
    distance = depth * subject.muscle_radius * scale
    cu, cv = distance * np.sin(a), -distance * np.cos(a)
    d = np.hypot(ru - cu, rv - cv)
    pocket = inside & (d < 4.5 + subject.septum_width)
    return pocket, pocket & (d < 3.0)


def _imat_threshold(fraction: float) -> float:
    """Threshold on a unit Gaussian field that leaves about `fraction` of voxels fatty."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - fraction) - 0.3


def describe(phantom: Phantom) -> dict:
    """Subject and geometry as plain JSON-ready values (for the truth file)."""
    g = phantom.geometry
    return {
        "subject": asdict(phantom.subject),
        "size": g.size,
        "field_of_view_mm": g.field_of_view,
        "pixel_spacing_mm": g.pixel_spacing,
        "slice_spacing_mm": g.slice_spacing,
        "slices": len(g.slice_positions),
        "group_volumes_ml": phantom.group_volumes_ml(),
    }
