"""A second thigh generator for testing only: never used to train or tune a model.

Models trained on `phantom` and `randomised` (rays from a point behind the femur split the
compartment into three groups) could still learn that construction. This one builds the thigh
the way an anatomy atlas does, muscle by muscle: eleven muscles (rectus femoris, vasti and
sartorius; adductor longus, brevis, magnus and gracilis; biceps femoris, semitendinosus and
semimembranosus) each own the part of the compartment nearest to them in a multiplicatively
weighted Voronoi diagram, so boundaries are curved and their number and direction vary; fat
septa are drawn where two *groups* meet, thin fascia (labelled as muscle) where two muscles of
one group meet. The outline is a superellipse with bumps, the femur an ellipse, and a smooth
elastic warp bends everything. Intensities, marbling and noise texture (ramp-filtered, as in
filtered back-projection) have their own models.

Its cohort is "stress" in `thighseg evaluate`. Changing this file to raise a model's score on it
would defeat its purpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from thighseg.core.labels import Group
from thighseg.synthetic.phantom import Geometry, Phantom

# name: (group, centre (medial, posterior) in compartment radii at hip and knee, weight hip/knee)
MUSCLES: dict[str, tuple[Group, tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "rectus_femoris": (Group.EXTENSOR, (0.05, -0.8), (0.0, -0.85), (0.55, 0.35)),
    "vastus_lateralis": (Group.EXTENSOR, (-0.65, -0.15), (-0.6, -0.3), (0.75, 0.8)),
    "vastus_intermedius": (Group.EXTENSOR, (-0.2, -0.45), (-0.15, -0.5), (0.5, 0.6)),
    "vastus_medialis": (Group.EXTENSOR, (0.3, -0.5), (0.45, -0.35), (0.45, 0.9)),
    "sartorius": (Group.EXTENSOR, (0.55, -0.35), (0.7, 0.1), (0.3, 0.3)),
    "adductor_longus": (Group.ADDUCTOR, (0.6, -0.05), (0.6, 0.0), (0.5, 0.15)),
    "adductor_brevis": (Group.ADDUCTOR, (0.35, 0.05), (0.35, 0.1), (0.4, 0.1)),
    "adductor_magnus": (Group.ADDUCTOR, (0.35, 0.4), (0.35, 0.35), (0.7, 0.35)),
    "gracilis": (Group.ADDUCTOR, (0.85, 0.25), (0.75, 0.4), (0.3, 0.3)),
    "biceps_femoris": (Group.FLEXOR, (-0.4, 0.6), (-0.45, 0.55), (0.55, 0.7)),
    "semitendinosus": (Group.FLEXOR, (0.05, 0.8), (0.15, 0.75), (0.45, 0.55)),
    "semimembranosus": (Group.FLEXOR, (0.2, 0.6), (0.25, 0.6), (0.35, 0.6)),
}

HU_AIR = -1000.0


@dataclass(frozen=True)
class StressSubject:
    seed: int
    age: float
    compartment_radius: float  # mm
    fat_thickness: float
    leg_gap: float
    exponent: float  # superellipse exponent of the outline
    aspect: float
    bumps: tuple[tuple[float, float, float], ...]  # (angle, width, height) of outline bumps
    centre_jitter: tuple[tuple[float, float], ...]  # per muscle
    weight_scale: tuple[float, ...]  # per muscle
    femur: tuple[float, float, float, float]  # centre (medial, posterior), semi-axes (mm)
    septum_mm: float
    warp_mm: float
    muscle_hu: float
    fat_hu: float
    marbling: float  # fraction of muscle that is fat (labelled muscle)
    noise_hu: float


def sample_subject(seed: int) -> StressSubject:
    rng = np.random.default_rng([seed, 991])
    n = len(MUSCLES)
    return StressSubject(
        seed=seed,
        age=float(rng.uniform(25, 90)),
        compartment_radius=float(rng.uniform(48, 72)),
        fat_thickness=float(rng.gamma(4.0, 5.0)),
        leg_gap=float(rng.uniform(5, 60)),
        exponent=float(rng.uniform(1.7, 3.0)),
        aspect=float(rng.uniform(0.8, 1.15)),
        bumps=tuple(
            (
                float(rng.uniform(-np.pi, np.pi)),
                float(rng.uniform(0.3, 0.9)),
                float(rng.normal(0, 0.07)),
            )
            for _ in range(4)
        ),
        centre_jitter=tuple((float(a), float(b)) for a, b in rng.normal(0, 0.08, (n, 2))),
        weight_scale=tuple(float(w) for w in rng.lognormal(0, 0.2, n)),
        femur=(
            float(rng.uniform(-0.2, 0.0)),
            float(rng.uniform(-0.15, 0.1)),
            float(rng.uniform(11, 15)),
            float(rng.uniform(11, 15)),
        ),
        septum_mm=float(rng.uniform(1.0, 4.0)),
        warp_mm=float(rng.uniform(1.0, 5.0)),
        muscle_hu=float(rng.normal(48, 9)),
        fat_hu=float(rng.normal(-100, 10)),
        marbling=float(rng.uniform(0.02, 0.25)),
        noise_hu=float(rng.uniform(10, 30)),
    )


def generate(
    seed: int,
    size: int = 512,
    slices: int = 24,
    slice_spacing: float = 5.0,
    field_of_view: float | None = None,
) -> Phantom:
    """Slices `slice_spacing` mm apart around mid-thigh; FOV 300-500 mm (wider when the thighs
    would not fit) unless given."""
    subject = sample_subject(seed)
    rng = np.random.default_rng([seed, 992, size, slices])
    span = 4 * (subject.compartment_radius + subject.fat_thickness) + subject.leg_gap
    fov = field_of_view or float(max(rng.uniform(300, 500), span + 20))
    thigh_length = 420.0
    half = min(0.45, (slices - 1) * slice_spacing / thigh_length / 2)
    levels = np.linspace(0.5 - half, 0.5 + half, slices)
    geometry = Geometry(
        size=size,
        field_of_view=fov,
        slice_positions=-levels * thigh_length + 100.0,
        thigh_levels=levels,
    )
    x0, _ = geometry.origin_xy
    coords = x0 + geometry.pixel_spacing * np.arange(size, dtype=np.float32)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    warp = _warp(rng, size, subject.warp_mm, geometry.pixel_spacing)
    hu = np.full((slices, size, size), HU_AIR, dtype=np.float32)
    labels = np.zeros((slices, size, size), dtype=np.uint8)
    for k, level in enumerate(levels):
        wx, wy = xx + warp[0] * np.cos(3 * level), yy + warp[1] * np.sin(2 + 3 * level)
        for side in (-1, 1):
            centre = side * (
                subject.compartment_radius + subject.fat_thickness + subject.leg_gap / 2
            )
            _leg(subject, float(level), side, (wx - centre) * -side, wy, hu[k], labels[k])
        hu[k] = _scanner(hu[k], subject, rng, geometry.pixel_spacing)
    return Phantom(subject=subject, geometry=geometry, hu=hu, labels=labels)  # type: ignore[arg-type]


def _warp(rng: np.random.Generator, size: int, amplitude_mm: float, pixel_mm: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal((2, size, size)), (0, size / 10, size / 10))
    return (field / (np.abs(field).max() + 1e-6) * amplitude_mm).astype(np.float32)


def _leg(
    subject: StressSubject,
    level: float,
    side: int,
    u: np.ndarray,
    v: np.ndarray,
    hu: np.ndarray,
    labels: np.ndarray,
) -> None:
    """Draw one leg; u medial, v posterior (mm from the leg centre)."""
    radius = subject.compartment_radius * (1 - 0.25 * level) * (1 + 0.02 * side)
    theta = np.arctan2(v, u)
    bump = sum(
        h * np.exp(-(np.angle(np.exp(1j * (theta - a))) ** 2) / w**2) for a, w, h in subject.bumps
    )
    p = subject.exponent
    norm = (np.abs(u / (radius * subject.aspect)) ** p + np.abs(v / radius) ** p) ** (1 / p)
    norm = norm / (1 + bump)
    fat_norm = 1 + subject.fat_thickness / radius
    hu[norm < fat_norm + 2.5 / radius] = 35.0  # skin
    hu[norm < fat_norm] = subject.fat_hu
    compartment = norm < 1
    hu[(norm < 1 + 1.0 / radius) & ~compartment] = 70.0  # deep fascia
    fu, fv, fa, fb = subject.femur
    femur = ((u - fu * radius) / fa) ** 2 + ((v - fv * radius) / fb) ** 2
    group_distance, muscle_margin = _muscle_map(subject, level, u / radius, v / radius)
    owner_group = np.argmin(group_distance, axis=0)
    ordered = np.sort(group_distance, axis=0)
    septum = (ordered[1] - ordered[0]) * radius < subject.septum_mm
    muscle = compartment & ~septum & (femur > 1.25)
    hu[compartment] = subject.fat_hu  # septa and the fat around the femur
    intra_fascia = muscle & (muscle_margin * radius < 0.6)
    hu[muscle] = subject.muscle_hu
    hu[intra_fascia] = 0.7 * subject.muscle_hu + 0.3 * subject.fat_hu
    labels[muscle] = np.array([Group.EXTENSOR, Group.FLEXOR, Group.ADDUCTOR])[owner_group[muscle]]
    # femoral vessels in the fat between extensors and adductors
    vessel = compartment & septum & (np.hypot(u / radius - 0.45, v / radius + 0.15) < 0.07)
    hu[vessel] = 45.0
    hu[femur < 1] = 1300.0
    hu[femur < 0.55] = -20.0


def _muscle_map(
    subject: StressSubject, level: float, u: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted Voronoi of the muscles: per group the smallest weighted distance (3, H, W), and
    the margin between the nearest and second-nearest muscle."""
    distances = []
    for k, (_, hip, knee, weight) in enumerate(MUSCLES.values()):
        cu = hip[0] + (knee[0] - hip[0]) * level + subject.centre_jitter[k][0]
        cv = hip[1] + (knee[1] - hip[1]) * level + subject.centre_jitter[k][1]
        w = (weight[0] + (weight[1] - weight[0]) * level) * subject.weight_scale[k]
        distances.append(np.hypot(u - cu, v - cv) / w)
    stack = np.stack(distances).astype(np.float32)
    groups = np.array([m[0] for m in MUSCLES.values()])
    group_distance = np.stack(
        [stack[groups == g].min(axis=0) for g in (Group.EXTENSOR, Group.FLEXOR, Group.ADDUCTOR)]
    )
    ordered = np.sort(stack, axis=0)
    return group_distance, ordered[1] - ordered[0]


def _scanner(
    hu: np.ndarray, subject: StressSubject, rng: np.random.Generator, pixel_mm: float
) -> np.ndarray:
    """Marbling, point-spread and ramp-filtered (FBP-like) noise."""
    muscle = (hu > subject.muscle_hu - 1) & (hu < subject.muscle_hu + 1)
    streaks = ndimage.gaussian_filter(
        rng.standard_normal(hu.shape), (0.6 / pixel_mm, 3.0 / pixel_mm)
    )
    threshold = np.quantile(streaks[muscle], 1 - subject.marbling) if muscle.any() else np.inf
    hu[muscle & (streaks > threshold)] = subject.fat_hu + 30
    hu = ndimage.gaussian_filter(hu, 0.7 / pixel_mm)
    spectrum = np.fft.fft2(rng.standard_normal(hu.shape))
    fy, fx = np.meshgrid(np.fft.fftfreq(hu.shape[0]), np.fft.fftfreq(hu.shape[1]), indexing="ij")
    ramp = np.hypot(fy, fx) * np.exp(-np.hypot(fy, fx) * pixel_mm * 2.5)
    noise = np.real(np.fft.ifft2(spectrum * ramp))
    return (hu + noise / (noise.std() + 1e-9) * subject.noise_hu).astype(np.float32)
