"""Randomised thigh CT for training: anatomy and appearance drawn far wider than real (SynthSeg).

Billot et al. (Medical Image Analysis 2023) showed that networks trained only on synthetic images
whose shape and contrast are randomised beyond realism segment real scans of any contrast. The
fixed phantom (`thighseg.synthetic.phantom`) lets a network learn *where* the groups sit; here
the septa turn, bend and wave per subject and along z, group proportions span the anatomical
range, the femur moves, the outline changes (flattened on the table, legs touching or apart, one
leg, cropped), and atrophy, fatty infiltration, oedema and metal appear, so the only reliable cue
left is what the image shows: the fat planes between the groups.

Rendering goes through a tissue map (SynthSeg's label-to-image idea): geometry decides a tissue
per pixel, then each tissue gets an HU drawn per subject, then the scanner (kernel, partial
volume, bias field, noise texture, streaks) is applied. Labels are set where the muscle is drawn,
so they follow the fat planes in the image. Used for training only; testing uses
`thighseg.synthetic.stress`, built differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from scipy import ndimage

from thighseg.core.labels import MUSCLE_GROUPS, Group
from thighseg.synthetic.phantom import Geometry, Phantom


class Tissue(IntEnum):
    AIR = 0
    SKIN = 1
    FAT = 2
    FASCIA = 3
    SEPTUM = 4
    MUSCLE = 5
    CORTEX = 6
    MARROW = 7
    VESSEL = 8
    NERVE = 9
    METAL = 10
    TABLE_FOAM = 11
    TABLE_SHELL = 12


@dataclass(frozen=True)
class Septa:
    """Three group boundaries as rays from an origin behind the femur (angles in rad from
    anterior, medial positive): where they start, how they bend outwards, wave and drift in z."""

    lateral: float
    extensor_span: float
    adductor_span: float
    distal_adductor_factor: float  # adductor span at the knee relative to the hip
    curvature: tuple[float, float, float]
    wave_amplitude: tuple[float, float, float]
    wave_frequency: float
    wave_phase: tuple[float, float, float]
    z_drift: tuple[float, float, float]
    origin: tuple[float, float]  # relative to the femur centre, in femur radii
    width_mm: float
    visibility: float  # 1: pure fat HU, 0: the HU of muscle (invisible)


@dataclass(frozen=True)
class Appearance:
    """HU per tissue and scanner behaviour of one subject."""

    hu: dict[int, float]
    texture_hu: float
    noise_hu: float
    noise_correlation_px: float
    kernel: float  # > 0 Gaussian blur sigma (px); < 0 sharpening amount
    bias_hu: float
    slice_thickness_mm: float


@dataclass(frozen=True)
class RandomSubject:
    seed: int
    age: float
    sides: tuple[int, ...]  # -1 patient right, +1 patient left
    muscle_radius: float
    fat_thickness: float
    leg_gap: float  # negative: thighs pressed together
    ellipticity: float
    table_flattening: float  # 1: none; < 1 the posterior outline is cut flat
    leg_rotation: tuple[float, float]  # rotation of each leg's anatomy about its long axis
    shape_coefficients: tuple[float, ...]
    femur_offset: tuple[float, float]  # in muscle radii, (medial, posterior)
    femur_radius: float
    septa: Septa
    infiltration: tuple[float, float, float]  # fraction of each group that is fat (labelled)
    atrophy_group: int  # 0: none
    atrophy_mm: float
    oedema_group: int
    metal: str  # "none", "nail", "prosthesis"
    table: bool
    table_gap: float  # mm between the lowest skin and the couch
    taper: float  # relative narrowing of the thigh from hip to knee
    single_leg_offset: float  # x of a lone leg, as a fraction of half the field of view
    thigh_length: float
    appearance: Appearance


def _septa(rng: np.random.Generator) -> Septa:
    """Boundaries far more varied than the phantom's (±5°) yet in their anatomical order:
    extensors anterior, adductors medial (a small wedge to a large posteromedial mass), flexors
    posterior (a thin band to a broad one), so a group is still named by where it lies."""
    lateral = rng.uniform(-2.35, -1.55)
    anteromedial = rng.uniform(0.45, 1.3)
    adductor = rng.uniform(0.35, 2.4)
    adductor = min(adductor, 2 * np.pi + lateral - anteromedial - 0.8)  # flexors >= 0.8 rad
    return Septa(
        lateral=float(lateral),
        extensor_span=float(anteromedial - lateral),
        adductor_span=float(adductor),
        distal_adductor_factor=float(rng.uniform(0.25, 1.0)),
        curvature=tuple(float(c) for c in rng.uniform(-0.5, 0.5, 3)),
        wave_amplitude=tuple(float(a) for a in rng.uniform(0, 0.15, 3)),
        wave_frequency=float(rng.uniform(0.5, 3.0)),
        wave_phase=tuple(float(p) for p in rng.uniform(0, 2 * np.pi, 3)),
        z_drift=tuple(float(d) for d in rng.normal(0, 0.15, 3)),
        origin=(float(rng.uniform(-0.5, 0.5)), float(rng.uniform(0.8, 2.0))),
        width_mm=float(np.exp(rng.uniform(np.log(0.8), np.log(6.0)))),
        visibility=float(rng.choice([rng.uniform(0.15, 0.5), rng.uniform(0.5, 1.0)], p=[0.2, 0.8])),
    )


def _appearance(rng: np.random.Generator) -> Appearance:
    fat = rng.uniform(-160, -40)
    muscle = rng.uniform(5, 90)
    contrast_vessels = rng.random() < 0.3
    hu = {
        Tissue.AIR: rng.uniform(-1024, -950),
        Tissue.SKIN: rng.uniform(0, 90),
        Tissue.FAT: fat,
        Tissue.FASCIA: rng.uniform(20, 120),
        Tissue.MUSCLE: muscle,
        Tissue.CORTEX: rng.uniform(500, 2000),
        Tissue.MARROW: rng.uniform(-120, 150),
        Tissue.VESSEL: rng.uniform(150, 450) if contrast_vessels else rng.uniform(20, 70),
        Tissue.NERVE: rng.uniform(0, 60),
        Tissue.METAL: rng.uniform(2500, 3070),
        Tissue.TABLE_FOAM: rng.uniform(-900, -600),
        Tissue.TABLE_SHELL: rng.uniform(100, 500),
    }
    low_dose = rng.random() < 0.25
    return Appearance(
        hu={int(k): float(v) for k, v in hu.items()},
        texture_hu=float(rng.uniform(2, 12)),
        noise_hu=float(rng.uniform(35, 70) if low_dose else rng.uniform(3, 35)),
        noise_correlation_px=float(rng.uniform(0.3, 1.6)),
        kernel=float(rng.choice([rng.uniform(0.2, 1.6), -rng.uniform(0.2, 1.0)], p=[0.7, 0.3])),
        bias_hu=float(rng.uniform(0, 40)),
        slice_thickness_mm=float(rng.choice([0.0, rng.uniform(2, 8)], p=[0.6, 0.4])),
    )


def sample_subject(seed: int) -> RandomSubject:
    rng = np.random.default_rng([seed, 71])
    age = float(rng.uniform(18, 95))
    group_choice = [0, *MUSCLE_GROUPS]
    return RandomSubject(
        seed=seed,
        age=age,
        sides=(-1, 1) if rng.random() > 0.08 else (int(rng.choice([-1, 1])),),
        muscle_radius=float(rng.uniform(38, 78)),
        fat_thickness=float(np.exp(rng.uniform(np.log(2), np.log(60)))),
        leg_gap=float(rng.uniform(-12, 90)),
        ellipticity=float(rng.uniform(0.75, 1.25)),
        table_flattening=float(rng.choice([1.0, rng.uniform(0.7, 0.95)], p=[0.5, 0.5])),
        leg_rotation=(float(rng.uniform(-0.25, 0.25)), float(rng.uniform(-0.25, 0.25))),
        shape_coefficients=tuple(float(c) for c in rng.normal(0, 0.06, 8)),
        femur_offset=(float(rng.uniform(-0.3, 0.15)), float(rng.uniform(-0.3, 0.2))),
        femur_radius=float(rng.uniform(10, 17)),
        septa=_septa(rng),
        infiltration=tuple(
            float(rng.choice([rng.uniform(0, 0.1), rng.uniform(0.1, 0.5)], p=[0.75, 0.25]))
            for _ in range(3)
        ),
        atrophy_group=int(rng.choice(group_choice, p=[0.7, 0.1, 0.1, 0.1])),
        atrophy_mm=float(rng.uniform(2, 10)),
        oedema_group=int(rng.choice(group_choice, p=[0.85, 0.05, 0.05, 0.05])),
        metal=str(rng.choice(["none", "nail", "prosthesis"], p=[0.85, 0.1, 0.05])),
        table=bool(rng.random() < 0.8),
        table_gap=float(rng.uniform(2, 20)),
        taper=float(rng.uniform(0.15, 0.35)),
        single_leg_offset=float(rng.uniform(-0.4, 0.4)),
        thigh_length=float(rng.uniform(330, 480)),
        appearance=_appearance(rng),
    )


def generate(
    seed: int, size: int = 256, slices: int = 6, levels: np.ndarray | None = None
) -> Phantom:
    """`slices` axial slices of one randomised subject at random thigh levels (independent 2D
    training samples; the field of view is random, sometimes cropping the thighs), or at the
    given `levels` (0 hip ... 1 knee)."""
    subject = sample_subject(seed)
    rng = np.random.default_rng([seed, 72, size, slices])
    levels = np.sort(rng.uniform(0.03, 0.97, slices)) if levels is None else np.asarray(levels)
    slices = len(levels)
    legs_span = len(subject.sides) * 2 * (subject.muscle_radius + subject.fat_thickness)
    span = legs_span + max(0.0, subject.leg_gap)
    field_of_view = float(np.clip(span * rng.uniform(0.8, 1.7), 220.0, 520.0))
    geometry = Geometry(
        size=size,
        field_of_view=field_of_view,
        slice_positions=-levels * subject.thigh_length + 100.0,
        thigh_levels=levels,
    )
    hu = np.empty((slices, size, size), dtype=np.float32)
    labels = np.empty((slices, size, size), dtype=np.uint8)
    for k, level in enumerate(levels):
        hu[k], labels[k] = render_slice(subject, float(level), geometry, rng)
    return Phantom(subject=subject, geometry=geometry, hu=hu, labels=labels)  # type: ignore[arg-type]


def render_slice(
    subject: RandomSubject, level: float, geometry: Geometry, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One slice: HU with the scanner applied, and labels at the slice centre."""
    x0, _ = geometry.origin_xy
    coords = x0 + geometry.pixel_spacing * np.arange(geometry.size, dtype=np.float32)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    tissue, labels, fat_fraction = _anatomy(subject, level, xx, yy, geometry)
    hu = _intensities(subject, tissue, fat_fraction, rng, geometry)
    thickness = subject.appearance.slice_thickness_mm
    if thickness > 0:  # partial volume across a thick slice: average the anatomy above and below
        dz = thickness / 2 / subject.thigh_length
        for offset in (-dz, dz):
            t, _, f = _anatomy(subject, level + offset, xx, yy, geometry)
            hu += _intensities(subject, t, f, rng, geometry)
        hu /= 3
    return _scanner(subject, hu, tissue, geometry, rng), labels


def _anatomy(
    subject: RandomSubject,
    level: float,
    xx: np.ndarray,
    yy: np.ndarray,
    geometry: Geometry,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tissue map, labels, fat fraction of the muscle) at one thigh level."""
    tissue = np.full(xx.shape, Tissue.AIR, dtype=np.uint8)
    labels = np.zeros(xx.shape, dtype=np.uint8)
    fat_fraction = np.zeros(xx.shape, dtype=np.float32)
    taper = 1.0 - subject.taper * level
    fat = subject.fat_thickness * (1 - 0.3 * level)
    outer = subject.muscle_radius * taper + fat + 2.0
    if subject.table:
        top = outer * subject.table_flattening + subject.table_gap
        slab = (yy > top) & (yy < top + 25.0)
        tissue[slab] = Tissue.TABLE_FOAM
        tissue[slab & ((yy < top + 1.5) | (yy > top + 23.5))] = Tissue.TABLE_SHELL
    centres = {
        side: side * (outer * subject.ellipticity + subject.leg_gap / 2)
        if len(subject.sides) == 2
        else subject.single_leg_offset * geometry.field_of_view / 2
        for side in subject.sides
    }
    # each pixel belongs to the leg whose outline it is deepest inside (legs may touch)
    depth = {
        side: np.hypot((xx - cx) / subject.ellipticity, yy) / outer for side, cx in centres.items()
    }
    for side, cx in centres.items():
        owned = depth[side] <= depth[-side] if -side in depth else np.ones(xx.shape, bool)
        _leg(subject, level, side, taper, fat, xx - cx, yy, owned, tissue, labels, fat_fraction)
    return tissue, labels, fat_fraction


def _leg(
    subject: RandomSubject,
    level: float,
    side: int,
    taper: float,
    fat: float,
    dx: np.ndarray,
    yy: np.ndarray,
    owned: np.ndarray,
    tissue: np.ndarray,
    labels: np.ndarray,
    fat_fraction: np.ndarray,
) -> None:
    u, v = dx * -side / subject.ellipticity, yy  # medial, posterior
    rotation = subject.leg_rotation[0 if side < 0 else 1]
    u, v = u * np.cos(rotation) - v * np.sin(rotation), u * np.sin(rotation) + v * np.cos(rotation)
    radius = np.hypot(u, v)
    angle = np.arctan2(u, -v)
    c = subject.shape_coefficients
    shape = (
        1
        + c[0] * np.cos(2 * angle + c[1] * 20 + 2 * level)
        + c[2] * np.cos(3 * angle + c[3] * 20)
        + c[4] * np.cos(4 * angle + c[5] * 20 + level)
        + c[6] * np.cos(5 * angle + c[7] * 20)
    )
    muscle_r = subject.muscle_radius * taper
    fascia_r = muscle_r * shape
    fat_r = fascia_r + fat * (1 + 0.3 * np.cos(angle + c[5] * 20))
    skin_r = fat_r + 2.0
    posterior = np.cos(angle - np.pi)
    if subject.table_flattening < 1:  # lying on the table flattens the back of the thigh
        flat = (muscle_r + fat) * subject.table_flattening
        limit = np.where(posterior > 0.05, flat / np.maximum(posterior, 0.05), np.inf)
        skin_r = np.minimum(skin_r, limit)
        fat_r = np.minimum(fat_r, skin_r - 2.0)
        fascia_r = np.minimum(fascia_r, np.maximum(skin_r - 3.0, 0.6 * fascia_r))
    tissue[owned & (radius < skin_r)] = Tissue.SKIN
    tissue[owned & (radius < fat_r)] = Tissue.FAT
    tissue[owned & (radius < fascia_r + 1.2)] = Tissue.FASCIA
    inside = owned & (radius < fascia_r)

    femur_r = subject.femur_radius * (1 + 0.9 * max(0.0, level - 0.78) / 0.22)
    fu = subject.femur_offset[0] * muscle_r
    fv = subject.femur_offset[1] * muscle_r
    femur_d = np.hypot(u - fu, v - fv)
    cortex = max(1.5, 5.5 * (1 - 1.6 * abs(level - 0.5)))

    group, septum = _groups(subject, level, u - fu, v - fv, femur_r, muscle_r)
    vessel = _pocket(u - fu, v - fv, femur_r, muscle_r, subject, level, boundary=1)
    nerve = _pocket(u - fu, v - fv, femur_r, muscle_r, subject, level, boundary=2)
    bone = femur_d < femur_r + 1.0
    muscle = inside & ~septum & ~vessel[0] & ~nerve[0] & ~bone
    muscle &= ~_atrophy(subject, group, muscle, pixel_mm=float(dx[0, 1] - dx[0, 0]))
    tissue[inside & ~muscle] = Tissue.FAT
    tissue[inside & septum & ~vessel[0] & ~nerve[0]] = Tissue.SEPTUM
    tissue[inside & vessel[1]] = Tissue.VESSEL
    tissue[inside & nerve[1]] = Tissue.NERVE
    tissue[muscle] = Tissue.MUSCLE
    labels[muscle] = group[muscle]
    for g, share in zip(MUSCLE_GROUPS, subject.infiltration, strict=True):
        fat_fraction[muscle & (group == g)] = share
    if subject.oedema_group:
        fat_fraction[muscle & (group == subject.oedema_group)] = -1.0  # marker: oedema
    in_femur = owned & (femur_d < femur_r)
    tissue[in_femur] = Tissue.CORTEX
    tissue[in_femur & (femur_d < femur_r - cortex)] = Tissue.MARROW
    if subject.metal != "none":
        metal_r = femur_r * (0.9 if subject.metal == "prosthesis" else 0.4)
        tissue[owned & (femur_d < metal_r)] = Tissue.METAL


def _boundaries(
    subject: RandomSubject, level: float, rel: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Angles of the lateral, anteromedial and posteromedial septa at relative radius `rel`."""
    s = subject.septa
    adductor = s.adductor_span * (1 - (1 - s.distal_adductor_factor) * level)
    starts = (s.lateral, s.lateral + s.extensor_span, s.lateral + s.extensor_span + adductor)
    return tuple(  # type: ignore[return-value]
        start
        + s.z_drift[i] * np.sin(np.pi * level)
        + s.curvature[i] * (rel - 0.5)
        + s.wave_amplitude[i] * np.sin(2 * np.pi * s.wave_frequency * rel + s.wave_phase[i])
        for i, start in enumerate(starts)
    )


def _groups(
    subject: RandomSubject,
    level: float,
    u: np.ndarray,
    v: np.ndarray,
    femur_r: float,
    muscle_r: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Group per pixel and the fat septa between groups (u, v relative to the femur centre)."""
    s = subject.septa
    ru, rv = u - s.origin[0] * femur_r, v - s.origin[1] * femur_r
    r_o = np.hypot(ru, rv)
    beta = np.arctan2(ru, -rv)
    lateral, anteromedial, posteromedial = _boundaries(subject, level, r_o / muscle_r)
    wrapped = np.mod(beta - lateral, 2 * np.pi)
    group = np.full(u.shape, Group.FLEXOR, dtype=np.uint8)
    group[wrapped < np.mod(anteromedial - lateral, 2 * np.pi)] = Group.EXTENSOR
    group[
        (wrapped >= np.mod(anteromedial - lateral, 2 * np.pi))
        & (wrapped < np.mod(posteromedial - lateral, 2 * np.pi))
    ] = Group.ADDUCTOR
    septum = np.zeros(u.shape, dtype=bool)
    half_width = s.width_mm * (0.6 + 0.8 * r_o / muscle_r) / 2
    for boundary in (lateral, anteromedial, posteromedial):
        delta = beta - boundary
        septum |= (np.abs(r_o * np.sin(delta)) < half_width) & (np.cos(delta) > 0)
    return group, septum


def _pocket(
    u: np.ndarray,
    v: np.ndarray,
    femur_r: float,
    muscle_r: float,
    subject: RandomSubject,
    level: float,
    boundary: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Fat pocket around a vessel bundle or the nerve on septum `boundary`: (pocket, core)."""
    s = subject.septa
    depth = 0.45 + 0.1 * boundary
    rel = np.array(depth)
    angle = float(_boundaries(subject, level, rel)[boundary]) + (0.3 if boundary == 2 else 0.0)
    cu = s.origin[0] * femur_r + depth * muscle_r * np.sin(angle)
    cv = s.origin[1] * femur_r - depth * muscle_r * np.cos(angle)
    d = np.hypot(u - cu, v - cv)
    pocket = d < 4.0 + s.width_mm
    return pocket, d < 3.0


def _atrophy(
    subject: RandomSubject, group: np.ndarray, muscle: np.ndarray, pixel_mm: float
) -> np.ndarray:
    """Muscle of the atrophied group within `atrophy_mm` of its edge (becomes fat)."""
    if not subject.atrophy_group:
        return np.zeros(muscle.shape, dtype=bool)
    region = muscle & (group == subject.atrophy_group)
    return region & (ndimage.distance_transform_edt(region) * pixel_mm < subject.atrophy_mm)


def _intensities(
    subject: RandomSubject,
    tissue: np.ndarray,
    fat_fraction: np.ndarray,
    rng: np.random.Generator,
    geometry: Geometry,
) -> np.ndarray:
    a = subject.appearance
    lut = np.array([a.hu.get(t, a.hu[Tissue.FAT]) for t in range(len(Tissue))], np.float32)
    septum_hu = a.hu[Tissue.FAT] * subject.septa.visibility + a.hu[Tissue.MUSCLE] * (
        1 - subject.septa.visibility
    )
    lut[Tissue.SEPTUM] = septum_hu
    hu = lut[tissue]
    muscle = tissue == Tissue.MUSCLE
    texture = _field(rng, tissue.shape, rng.uniform(1.0, 4.0) / geometry.pixel_spacing)
    hu[muscle] += a.texture_hu * texture[muscle]
    marbling = _field(rng, tissue.shape, rng.uniform(2.0, 8.0) / geometry.pixel_spacing)
    share = np.clip(fat_fraction, 0, 1)
    # Fat streaks thinner than a voxel show as partial volume (HU between fat and muscle, like a
    # faint septum) as often as pure fat: both stay labelled muscle, so the model must tell
    # infiltration from the planes between groups by shape, not by HU alone.
    softness = float(rng.choice([0.02, rng.uniform(0.3, 2.0)]))
    weight = np.clip((marbling - _quantile(share)) / softness, 0, 1)[muscle]
    fat_hu = a.hu[Tissue.FAT] + 25 * rng.random()
    hu[muscle] = hu[muscle] * (1 - weight) + fat_hu * weight
    oedema = muscle & (fat_fraction < 0)
    hu[oedema] -= rng.uniform(10, 35)
    return hu


def _quantile(share: np.ndarray) -> np.ndarray:
    """Threshold on a unit Gaussian field leaving about `share` of pixels above it."""
    from scipy.special import ndtri

    return ndtri(np.clip(1 - share, 1e-6, 1 - 1e-6)).astype(np.float32)


def _scanner(
    subject: RandomSubject,
    hu: np.ndarray,
    tissue: np.ndarray,
    geometry: Geometry,
    rng: np.random.Generator,
) -> np.ndarray:
    a = subject.appearance
    if a.kernel > 0:
        hu = ndimage.gaussian_filter(hu, a.kernel)
    else:
        hu = hu + -a.kernel * (hu - ndimage.gaussian_filter(hu, 1.0))
    hu = hu + a.bias_hu * _field(rng, hu.shape, hu.shape[0] / 3)
    metal = tissue == Tissue.METAL
    if metal.any():
        hu = hu + _streaks(rng, metal)
    noise = ndimage.gaussian_filter(
        rng.standard_normal(hu.shape).astype(np.float32), a.noise_correlation_px
    )
    return (hu + noise * (a.noise_hu / (noise.std() + 1e-6))).astype(np.float32)


def _field(rng: np.random.Generator, shape: tuple[int, ...], correlation_px: float) -> np.ndarray:
    """Unit-variance smooth random field."""
    field = ndimage.gaussian_filter(
        rng.standard_normal(shape).astype(np.float32), max(0.5, correlation_px)
    )
    return field / (field.std() + 1e-6)


def _streaks(rng: np.random.Generator, metal: np.ndarray) -> np.ndarray:
    """Bright and dark streaks through the metal, fading with distance (beam hardening)."""
    cy, cx = (float(c.mean()) for c in np.nonzero(metal))
    yy, xx = np.indices(metal.shape, dtype=np.float32)
    out = np.zeros(metal.shape, np.float32)
    fade = np.exp(-np.hypot(yy - cy, xx - cx) / (metal.shape[0] * rng.uniform(0.1, 0.4)))
    for theta in rng.uniform(0, np.pi, int(rng.integers(4, 12))):
        distance = np.abs((xx - cx) * np.sin(theta) - (yy - cy) * np.cos(theta))
        out += rng.choice([-1, 1]) * rng.uniform(100, 700) * np.exp(-((distance / 1.5) ** 2))
    return out * fade
