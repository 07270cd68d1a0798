"""Procedural 3D toy scenes with exact per-pixel labels.

One salient object (sphere, cube, cylinder, cone or torus) of a named colour rests on a ground
plane (y = 0) under a sky and is seen by a pinhole camera at x = 0 that looks along +z, pitched
slightly down. Everything is analytic ray casting in numpy, vectorised over pixels, so the
foreground mask, depth (distance along the ray), Lambertian shading and albedo are exact at each
pixel centre, and ``image == albedo * shading`` holds by construction.

World frame: x to the right of the image, y up, z away from the camera. An object's local frame
has its origin at the centre of its footprint on the ground and is rotated by ``yaw`` about the
vertical axis. Because the camera sits on the plane x = 0 and the pixel grid is symmetric, a scene
mirrored in that plane renders as the horizontally flipped image; ``flip_horizontal`` relies on it.
"""

from __future__ import annotations

import colorsys
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone", "torus")

# Linear-RGB albedos, saturated, hues roughly 0, 30, 60, 120, 225 and 280 degrees. No channel is 0
# or 1 so that the object is never pure black or clipped, whatever the shading.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.08, 0.06),
    "orange": (0.90, 0.45, 0.05),
    "yellow": (0.85, 0.80, 0.08),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.08, 0.25, 0.90),
    "purple": (0.55, 0.12, 0.85),
}

# Depth given to sky pixels; the ground farther than this also counts as sky, so every depth is
# finite and <= FAR.
FAR: float = 30.0

# Vertical (and, the image being square, horizontal) field of view of the pinhole camera.
FOV_DEG: float = 50.0
_TAN_HALF_FOV = math.tan(math.radians(FOV_DEG) / 2)

# Apparent width of the object as a fraction of the image width: salient, as the objects in the
# photos SD draws (mean coverage about a fifth of the frame, never under 4%).
_WIDTH_MIN, _WIDTH_MAX = 0.30, 0.62
# The projected centre's column stays at least this far from the image's side edges (or half the
# object's width, if more), so most of the object is in frame; between those limits it is uniform.
_EDGE_MIN = 0.12
# Pitch offset (radians) between the view axis and the direction to the object's centre: the
# object's centre lands anywhere from about a quarter above to a quarter below the image centre.
_PITCH_OFFSET = 0.22

# Cap on the safeguarded Newton iterations for the torus' quartic (7-12 are typical; rays that
# graze the tube, with a near-double root, fall back to bisection and take the longest).
_NEWTON_STEPS = 24

# Rays start this far (world units) off a surface to avoid hitting it again (shadow acne).
_EPS = 1e-6

# Every word a prompt can contain, for building a word-level tokenizer's vocabulary. A prompt says
# what the object is, never where: as in SD, the noise decides the layout.
PROMPT_WORDS: tuple[str, ...] = ("a", "an", *COLOURS, *SHAPES)

# Words that say where something is. No prompt of the renderer contains one, and the toy model's
# vocabulary has none; front ends use this list to refuse them with a clear message.
PLACE_WORDS: frozenset[str] = frozenset({
    "left", "right", "middle", "centre", "center", "top", "bottom", "above", "below", "near", "far",
    "front", "behind", "upper", "lower", "corner", "side",
})


# --------------------------------------------------------------------------------------------
# Scene description
# --------------------------------------------------------------------------------------------


def _shape_geometry(shape: str, size: float) -> dict[str, float]:
    """Dimensions of a shape of overall width ``size`` and its bounding sphere (local frame).

    ``size`` is the horizontal extent (diameter or edge). ``cy`` is the height of the bounding
    sphere's centre, the point the camera placement aims from.
    """
    half = size / 2
    if shape == "sphere":
        return {"radius": half, "cy": half, "bound": half}
    if shape == "cube":
        return {"half": half, "cy": half, "bound": half * math.sqrt(3.0)}
    if shape == "cylinder":
        height = size
        return {"radius": half, "height": height, "cy": height / 2,
                "bound": math.hypot(half, height / 2)}
    if shape == "cone":
        height = 1.3 * size
        return {"radius": half, "height": height, "cy": height / 2,
                "bound": math.hypot(half, height / 2)}
    if shape == "torus":
        # Standing ring (in the local x-y plane, axis along local z) touching the ground at one
        # point: seen from the front its hole is visible, which a flat ring at low pitch hides.
        major, minor = 0.34 * size, 0.16 * size
        return {"major": major, "minor": minor, "cy": major + minor, "bound": major + minor}
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _camera_basis(pitch: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Forward, right and up unit vectors of a camera looking along +z, pitched down by ``pitch``."""
    s, c = math.sin(pitch), math.cos(pitch)
    forward = np.array([0.0, -s, c])
    right = np.array([1.0, 0.0, 0.0])
    up = np.array([0.0, c, s])
    return forward, right, up


def _check_rgb(name: str, value: object) -> tuple[float, float, float]:
    try:
        rgb = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be three numbers in [0, 1], got {value!r}") from err
    if len(rgb) != 3 or not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in rgb):
        raise ValueError(f"{name} must be three numbers in [0, 1], got {value!r}")
    return rgb  # type: ignore[return-value]


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one toy scene; validated on construction.

    ``x``, ``z``: world position of the object's footprint centre; ``size``: its horizontal
    extent; ``yaw``: rotation about the vertical axis (radians). ``cam_height`` and ``cam_pitch``
    (radians, positive = looking down) place the camera at (0, cam_height, 0) looking along +z.
    ``light_dir`` is the unit vector towards a directional light above the ground. ``ambient`` is
    the shading of surfaces facing away from the light. ``ground_rgb`` and ``sky_rgb`` are albedos.
    Nothing in the scene's words says where the object is.
    """

    shape: str
    colour: str
    x: float
    z: float
    size: float
    yaw: float
    cam_height: float
    cam_pitch: float
    light_dir: tuple[float, float, float]
    ambient: float
    ground_rgb: tuple[float, float, float]
    sky_rgb: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {tuple(COLOURS)}")
        for name in ("x", "z", "size", "yaw", "cam_height", "cam_pitch", "ambient"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.size <= 0:
            raise ValueError(f"size must be > 0, got {self.size}")
        if self.cam_height <= 0:
            raise ValueError(f"cam_height must be > 0 (camera above the ground), got {self.cam_height}")
        if not 0.0 <= self.cam_pitch < math.pi / 2:
            raise ValueError(f"cam_pitch must be in [0, pi/2) (looking level or down), got {self.cam_pitch}")
        if not 0.0 <= self.ambient <= 1.0:
            raise ValueError(f"ambient must be in [0, 1], got {self.ambient}")
        try:
            light = tuple(float(v) for v in self.light_dir)
        except (TypeError, ValueError) as err:
            raise ValueError(f"light_dir must be three numbers, got {self.light_dir!r}") from err
        if len(light) != 3 or not all(math.isfinite(v) for v in light):
            raise ValueError(f"light_dir must be three finite numbers, got {self.light_dir!r}")
        if abs(math.sqrt(sum(v * v for v in light)) - 1.0) > 1e-6:
            raise ValueError(f"light_dir must be a unit vector, got {light} (norm {math.sqrt(sum(v * v for v in light)):.6f})")
        if light[1] <= 0:
            raise ValueError(f"light_dir must point up (y > 0: light from above), got {light}")
        object.__setattr__(self, "light_dir", light)
        object.__setattr__(self, "ground_rgb", _check_rgb("ground_rgb", self.ground_rgb))
        object.__setattr__(self, "sky_rgb", _check_rgb("sky_rgb", self.sky_rgb))

        geometry = _shape_geometry(self.shape, self.size)
        # The camera must be outside the object and the object in front of the camera.
        if math.hypot(self.x, self.cam_height - geometry["cy"], self.z) <= geometry["bound"]:
            raise ValueError("the camera is inside the object's bounding sphere")
        if self._centre_camera_depth() <= geometry["bound"]:
            raise ValueError(
                f"the object (bounding radius {geometry['bound']:.3f}) is not in front of the camera "
                f"(its centre is at depth {self._centre_camera_depth():.3f} along the view axis)")

    def _centre_camera_depth(self) -> float:
        forward, _, _ = _camera_basis(self.cam_pitch)
        cy = _shape_geometry(self.shape, self.size)["cy"]
        rel = np.array([self.x, cy - self.cam_height, self.z])
        return float(rel @ forward)

    @property
    def centre_column(self) -> float:
        """Column of the object's projected centre as a fraction of the image width (0 = left edge)."""
        depth = self._centre_camera_depth()
        return 0.5 + self.x / (2 * _TAN_HALF_FOV * depth)

    @property
    def centre_row(self) -> float:
        """Row of the object's projected centre as a fraction of the image height (0 = top edge)."""
        forward, _, up = _camera_basis(self.cam_pitch)
        cy = _shape_geometry(self.shape, self.size)["cy"]
        rel = np.array([self.x, cy - self.cam_height, self.z])
        return 0.5 - float(rel @ up) / (2 * _TAN_HALF_FOV * float(rel @ forward))

    @property
    def prompt(self) -> str:
        """The caption of this scene, e.g. ``"a red cone"``, ``"an orange cube"``: what, never where."""
        return prompt_for(self.shape, self.colour)


def prompt_for(shape: str, colour: str) -> str:
    """The renderer's caption for an object: ``"a red cone"``, ``"an orange cube"``."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape}"


@dataclass(frozen=True)
class Render:
    """A rendered scene and its exact per-pixel labels.

    ``image`` (float32 [H, W, 3]) equals ``albedo * shading[..., None]``. ``mask`` (bool [H, W]) is
    True where the pixel centre's ray hits the object first. ``depth`` (float32 [H, W]) is the
    distance along the ray to the first hit, ``FAR`` for sky. ``shading`` (float32 [H, W]) is
    ambient + (1 - ambient) * max(n.l, 0) * visibility, 1 for sky. ``albedo`` is float32 [H, W, 3].
    """

    image: np.ndarray
    mask: np.ndarray
    depth: np.ndarray
    shading: np.ndarray
    albedo: np.ndarray

    def __post_init__(self) -> None:
        height, width = self.mask.shape
        expected = {"image": (height, width, 3), "depth": (height, width),
                    "shading": (height, width), "albedo": (height, width, 3)}
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected {shape}")
        if self.mask.dtype != np.bool_:
            raise ValueError(f"mask must be bool, got {self.mask.dtype}")


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def sample_scene(rng: np.random.Generator, shape: str | None = None, colour: str | None = None) -> Scene:
    """Draw a random scene, keeping the given shape and colour words.

    Every random number is drawn whatever is given, so fixing a word changes only what depends
    on it: ``sample_scene(rng(s), shape="cube")`` differs from ``sample_scene(rng(s))`` in the
    shape alone (and the sizes it implies). The object is salient: it takes 30-62% of the image
    width. Its place is continuous and independent of the words: the projected centre's column is
    uniform across the image (keeping most of the object in frame), its distance follows from its
    size, and the camera's pitch is offset from the object by a random angle, so the centre's row
    varies too. The camera looks slightly down so the sky fills the top of the image.
    """
    u = rng.random(16)
    shape = SHAPES[int(u[0] * len(SHAPES))] if shape is None else shape
    colour = tuple(COLOURS)[int(u[1] * len(COLOURS))] if colour is None else colour
    # Checked before the geometry, which depends on the shape.
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {tuple(COLOURS)}")

    # Apparent width first, then a world size and distance that give it: the camera depth of the
    # object stays in [2, 8] so the camera never has to look steeply down at it.
    width_fraction = _WIDTH_MIN + (_WIDTH_MAX - _WIDTH_MIN) * u[3]
    size_lo = max(0.6, 2.0 * 2 * _TAN_HALF_FOV * width_fraction)
    size_hi = min(2.0, 8.0 * 2 * _TAN_HALF_FOV * width_fraction)
    size = size_lo + (size_hi - size_lo) * u[4]
    distance = size / (2 * _TAN_HALF_FOV * width_fraction)
    geometry = _shape_geometry(shape, size)
    cy = geometry["cy"]

    # Camera above the object's centre, pitched at it with a random offset (up to _PITCH_OFFSET
    # either way) that moves the object up or down the image; the pitch stays in [0.04, 0.40] so
    # the horizon (and the sky above it) is always in the top half of the image.
    height_lo = max(0.8, cy + 0.15)
    height_hi = max(height_lo, min(2.5, cy + 0.42 * distance))
    cam_height = height_lo + (height_hi - height_lo) * u[5]
    pitch = math.atan2(cam_height - cy, distance) + (2 * u[6] - 1) * _PITCH_OFFSET
    pitch = min(max(pitch, 0.04), 0.40)

    # Column of the projected centre: uniform between the edge limits.
    edge = min(0.5, max(_EDGE_MIN, 0.8 * width_fraction / 2))
    column = edge + (1 - 2 * edge) * u[7]
    # Distance is measured along the view axis; solve for the world z that gives it, then x.
    s, c = math.sin(pitch), math.cos(pitch)
    z = (distance - (cam_height - cy) * s) / c
    x = (2 * column - 1) * _TAN_HALF_FOV * distance

    yaw = (u[8] - 0.5) * (math.pi / 2)  # the cube's full period; keeps the torus' hole in view
    # Light from above, mostly from the camera's side so the visible face is lit, sometimes from
    # the side or slightly behind so shadows fall where they can be seen.
    elevation = 0.5 + 0.7 * u[9]
    azimuth = (2 * u[10] - 1) * 1.8
    light = (math.cos(elevation) * math.sin(azimuth), math.sin(elevation),
             -math.cos(elevation) * math.cos(azimuth))
    ambient = 0.2 + 0.25 * u[11]
    # Low-saturation tints so the object's hue dominates the image.
    grey = 0.35 + 0.3 * u[12]
    tint = rng.uniform(-0.04, 0.04, size=3)
    ground_rgb = tuple(float(v) for v in np.clip(grey + tint, 0.0, 1.0))
    sky = 0.8 + 0.18 * u[13]
    sky_rgb = (sky - 0.05 - 0.10 * u[14], sky - 0.07 * u[15], sky)
    return Scene(shape=shape, colour=colour, x=x, z=z, size=size, yaw=yaw,
                 cam_height=cam_height, cam_pitch=pitch, light_dir=light, ambient=ambient,
                 ground_rgb=ground_rgb, sky_rgb=sky_rgb)


def scene_from_seed(seed: int) -> Scene:
    """The scene drawn by ``sample_scene`` from ``np.random.default_rng(seed)``; same seed, same scene."""
    return sample_scene(np.random.default_rng(seed))


# --------------------------------------------------------------------------------------------
# Ray-shape intersection (local frame, unit directions). Each returns t [M] (inf on a miss)
# and the outward unit normal [M, 3] at the hit (undefined where missed).
# --------------------------------------------------------------------------------------------


def _quadratic_roots(a: np.ndarray, half_b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both roots of a t^2 + 2 half_b t + c (nan where complex), stable also when a -> 0."""
    disc = half_b * half_b - a * c
    root = np.sqrt(np.maximum(disc, 0.0))
    q = -(half_b + np.where(half_b >= 0, root, -root))
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = q / a
        t2 = c / q
    bad = disc < 0
    t1[bad] = np.nan
    t2[bad] = np.nan
    return t1, t2


def _first_candidate(ts: np.ndarray, normals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest valid candidate per ray from ts [M, K] (inf or nan = invalid) and normals [M, K, 3]."""
    ts = np.where(np.isfinite(ts) & (ts > _EPS), ts, np.inf)
    best = np.argmin(ts, axis=1)
    rows = np.arange(ts.shape[0])
    return ts[rows, best], normals[rows, best]


def _hit_sphere(o: np.ndarray, d: np.ndarray, g: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    radius = g["radius"]
    oc = o - np.array([0.0, radius, 0.0])
    t1, t2 = _quadratic_roots(np.ones(len(o)), np.einsum("ij,ij->i", oc, d),
                              np.einsum("ij,ij->i", oc, oc) - radius * radius)
    ts = np.stack([t1, t2], axis=1)
    normals = (oc[:, None, :] + ts[..., None] * d[:, None, :]) / radius
    return _first_candidate(ts, normals)


def _hit_cube(o: np.ndarray, d: np.ndarray, g: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    half = g["half"]
    oc = o - np.array([0.0, half, 0.0])
    # Slab method; a zero direction component becomes a tiny one of the same sign so the slab
    # it never crosses gives (-inf, inf) or an empty interval, as it should.
    safe = np.where(np.abs(d) < 1e-300, 1e-300, d)
    inv = 1.0 / safe
    with np.errstate(over="ignore", invalid="ignore"):
        t_a = (-half - oc) * inv
        t_b = (half - oc) * inv
    t_min = np.minimum(t_a, t_b)
    t_max = np.maximum(t_a, t_b)
    axis = np.argmax(t_min, axis=1)
    rows = np.arange(len(o))
    t_near = t_min[rows, axis]
    t_far = t_max.min(axis=1)
    hit = (t_near <= t_far) & (t_far > _EPS)
    t = np.where(hit, np.where(t_near > _EPS, t_near, t_far), np.inf)
    normals = np.zeros_like(o)
    normals[rows, axis] = -np.sign(d[rows, axis])
    return t, normals


def _hit_cylinder(o: np.ndarray, d: np.ndarray, g: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    radius, height = g["radius"], g["height"]
    ox, oy, oz = o.T
    dx, dy, dz = d.T
    t1, t2 = _quadratic_roots(dx * dx + dz * dz, ox * dx + oz * dz, ox * ox + oz * oz - radius * radius)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_top = (height - oy) / dy
        t_bottom = -oy / dy
    ts = np.stack([t1, t2, t_top, t_bottom], axis=1)
    points = o[:, None, :] + ts[..., None] * d[:, None, :]
    px, py, pz = points[..., 0], points[..., 1], points[..., 2]
    inside_disc = px * px + pz * pz <= radius * radius
    valid = np.stack([(py[:, 0] >= 0) & (py[:, 0] <= height), (py[:, 1] >= 0) & (py[:, 1] <= height),
                      inside_disc[:, 2], inside_disc[:, 3]], axis=1)
    ts = np.where(valid, ts, np.inf)
    normals = np.zeros(points.shape)
    normals[:, :2, 0] = px[:, :2] / radius
    normals[:, :2, 2] = pz[:, :2] / radius
    normals[:, 2, 1] = 1.0
    normals[:, 3, 1] = -1.0
    return _first_candidate(ts, normals)


def _hit_cone(o: np.ndarray, d: np.ndarray, g: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    radius, height = g["radius"], g["height"]
    k2 = (radius / height) ** 2
    ox, oy, oz = o.T
    dx, dy, dz = d.T
    # x^2 + z^2 = k^2 (height - y)^2, the double cone; keep 0 <= y <= height.
    h = height - oy
    t1, t2 = _quadratic_roots(dx * dx + dz * dz - k2 * dy * dy, ox * dx + oz * dz + k2 * h * dy,
                              ox * ox + oz * oz - k2 * h * h)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_bottom = -oy / dy
    ts = np.stack([t1, t2, t_bottom], axis=1)
    points = o[:, None, :] + ts[..., None] * d[:, None, :]
    px, py, pz = points[..., 0], points[..., 1], points[..., 2]
    valid = np.stack([(py[:, 0] >= 0) & (py[:, 0] <= height), (py[:, 1] >= 0) & (py[:, 1] <= height),
                      px[:, 2] * px[:, 2] + pz[:, 2] * pz[:, 2] <= radius * radius], axis=1)
    ts = np.where(valid, ts, np.inf)
    normals = np.zeros(points.shape)
    normals[:, :2, 0] = px[:, :2]
    normals[:, :2, 1] = k2 * (height - py[:, :2])
    normals[:, :2, 2] = pz[:, :2]
    with np.errstate(invalid="ignore", divide="ignore"):
        normals[:, :2] /= np.linalg.norm(normals[:, :2], axis=-1, keepdims=True)
    normals[:, 2, 1] = -1.0
    return _first_candidate(ts, normals)


def _cubic_real_roots(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Real roots [M, 3] of s^3 + a s^2 + b s + c (a lone real root repeated three times)."""
    p = b - a * a / 3
    q = 2 * a ** 3 / 27 - a * b / 3 + c
    disc = (q / 2) ** 2 + (p / 3) ** 3
    shift = -a / 3
    # One real root (disc > 0): Cardano.
    root_disc = np.sqrt(np.maximum(disc, 0.0))
    one = np.cbrt(-q / 2 + root_disc) + np.cbrt(-q / 2 - root_disc)
    # Three real roots (disc <= 0, so p <= 0): trigonometric form.
    m = 2 * np.sqrt(np.maximum(-p / 3, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        arg = np.where(p < 0, 3 * q / (p * m), 0.0)
    theta = np.arccos(np.clip(arg, -1.0, 1.0)) / 3
    three = m[:, None] * np.cos(theta[:, None] - np.array([0.0, 2.0, 4.0]) * (math.pi / 3))
    roots = np.where((disc > 0)[:, None], one[:, None], three)
    return roots + shift[:, None]


def _quartic(s: np.ndarray, c3: np.ndarray, c2: np.ndarray, c1: np.ndarray, c0: np.ndarray) -> np.ndarray:
    """s^4 + c3 s^3 + c2 s^2 + c1 s + c0 (Horner)."""
    return (((s + c3) * s + c2) * s + c1) * s + c0


def _quartic_slope(s: np.ndarray, c3: np.ndarray, c2: np.ndarray, c1: np.ndarray, c0: np.ndarray) -> np.ndarray:
    """Derivative of ``_quartic`` in s."""
    return ((4 * s + 3 * c3) * s + 2 * c2) * s + c1


def _hit_torus(o: np.ndarray, d: np.ndarray, g: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """First hit on a standing torus, exactly, by bracketing the quartic's first real root.

    Along the ray inside the bounding sphere the quartic f(s) is monotone between the real roots of
    its derivative (a cubic, solved in closed form), so the first root lies in the first such
    interval whose end has f <= 0; a bracketed Newton iteration then finds it to full precision.
    Unlike sphere tracing this cannot stall on grazing rays, and unlike a companion-matrix
    eigensolver it stays a handful of array operations.
    """
    major, minor, cy = g["major"], g["minor"], g["cy"]
    scale = major + minor
    n_rays = len(o)
    t_out = np.full(n_rays, np.inf)
    normals_out = np.zeros((n_rays, 3))
    # Centre, normalise to bounding radius 1, and start each ray where it enters the bounding sphere.
    oc = (o - np.array([0.0, cy, 0.0])) / scale
    b_half = np.einsum("ij,ij->i", oc, d)
    disc = b_half * b_half - (np.einsum("ij,ij->i", oc, oc) - 1.0)
    root = np.sqrt(np.maximum(disc, 0.0))
    s_enter = np.maximum(-b_half - root, 0.0)
    s_exit = -b_half + root
    keep = np.flatnonzero((disc > 0) & (s_exit > _EPS))
    if keep.size == 0:
        return t_out, normals_out
    d = d[keep]
    start = oc[keep] + s_enter[keep, None] * d
    length = s_exit[keep] - s_enter[keep]
    big_r2 = (major / scale) ** 2
    small_r2 = (minor / scale) ** 2
    ox, oy, oz = start.T
    dx, dy, dz = d.T
    m = np.einsum("ij,ij->i", start, d)
    q = np.einsum("ij,ij->i", start, start) + big_r2 - small_r2
    # (|p|^2 + R^2 - r^2)^2 - 4 R^2 (px^2 + py^2) with p = start + s d, |d| = 1; axis along z.
    c3 = 4 * m
    c2 = 4 * m * m + 2 * q - 4 * big_r2 * (dx * dx + dy * dy)
    c1 = 4 * m * q - 8 * big_r2 * (ox * dx + oy * dy)
    c0 = q * q - 4 * big_r2 * (ox * ox + oy * oy)

    coeffs = (c3, c2, c1, c0)
    crit = _cubic_real_roots(0.75 * c3, 0.5 * c2, 0.25 * c1)
    crit = np.clip(crit, 0.0, length[:, None])
    breaks = np.concatenate([np.zeros((len(d), 1)), np.sort(crit, axis=1), length[:, None]], axis=1)
    values = _quartic(breaks, *(c[:, None] for c in coeffs))
    below = values <= 0
    hit = below.any(axis=1)
    first = np.argmax(below, axis=1)
    rows = np.arange(len(d))
    hi = breaks[rows, first]
    lo = breaks[rows, np.maximum(first - 1, 0)]
    f_hi = values[rows, first]
    f_lo = values[rows, np.maximum(first - 1, 0)]
    # Start from the secant point: lo is usually a critical point, where Newton cannot start.
    # Then Newton steps kept inside the bracket [lo, hi] (f(lo) > 0 >= f(hi)); bisection otherwise.
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(f_lo > f_hi, lo + (hi - lo) * f_lo / (f_lo - f_hi), lo)
    for _ in range(_NEWTON_STEPS):
        with np.errstate(divide="ignore", invalid="ignore"):
            step = s - _quartic(s, *coeffs) / _quartic_slope(s, *coeffs)
        s_new = np.where((step >= lo) & (step <= hi), step, 0.5 * (lo + hi))
        positive = _quartic(s_new, *coeffs) > 0
        lo = np.where(positive, s_new, lo)
        hi = np.where(positive, hi, s_new)
        converged = np.all(np.abs(s_new - s) <= 1e-10)  # float32 labels need far less
        s = s_new
        if converged:
            break
    s = np.where(first == 0, 0.0, s)  # the ray starts on or in the surface (touching shadow rays)
    point = start + s[:, None] * d
    ring = point.copy()
    ring[:, 2] = 0.0
    ring *= (major / scale) / np.maximum(np.linalg.norm(ring, axis=1, keepdims=True), 1e-12)
    normal = point - ring
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    t = (s_enter[keep] + s) * scale
    t_out[keep] = np.where(hit & (t > _EPS), t, np.inf)
    normals_out[keep] = normal
    return t_out, normals_out


_HITTERS = {"sphere": _hit_sphere, "cube": _hit_cube, "cylinder": _hit_cylinder,
            "cone": _hit_cone, "torus": _hit_torus}


def _rotation_y(angle: float) -> np.ndarray:
    """Matrix rotating column vectors by ``angle`` about the vertical axis (local -> world for yaw)."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _intersect(scene: Scene, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World-space first hit of rays (o [M, 3], unit d [M, 3]) on the scene's object.

    Rays that miss the object's bounding sphere are culled before the exact test, which is what
    keeps shadow rays (one per ground pixel) cheap.
    """
    g = _shape_geometry(scene.shape, scene.size)
    to_local = _rotation_y(-scene.yaw)
    o_local = (o - np.array([scene.x, 0.0, scene.z])) @ to_local.T
    d_local = d @ to_local.T
    centre = np.array([0.0, g["cy"], 0.0])
    oc = o_local - centre
    b_half = np.einsum("ij,ij->i", oc, d_local)
    disc = b_half * b_half - (np.einsum("ij,ij->i", oc, oc) - g["bound"] ** 2 * (1 + 1e-9))
    candidates = np.flatnonzero((disc > 0) & (-b_half + np.sqrt(np.maximum(disc, 0.0)) > _EPS))
    t = np.full(len(o), np.inf)
    normals = np.zeros((len(o), 3))
    if candidates.size:
        t_c, n_c = _HITTERS[scene.shape](o_local[candidates], d_local[candidates], g)
        t[candidates] = t_c
        normals[candidates] = n_c @ to_local  # back to world: inverse of to_local is its transpose
    return t, normals


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _screen_coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel-centre tangent coordinates (right, down) for a square image, flattened row-major."""
    # (j + 0.5) / size * 2 - 1 is exactly antisymmetric under j -> size - 1 - j for power-of-two
    # sizes, which makes mirrored scenes render as bit-for-bit mirrored rays.
    centres = ((np.arange(size) + 0.5) / size * 2 - 1) * _TAN_HALF_FOV
    right = np.tile(centres, size)
    down = np.repeat(centres, size)
    right.flags.writeable = False
    down.flags.writeable = False
    return right, down


def render(scene: Scene, size: int = 64) -> Render:
    """Ray-cast ``scene`` into a ``size`` x ``size`` image with exact labels at pixel centres.

    One primary ray per pixel is tested against the ground plane and the object; ground points
    then cast one shadow ray towards the light, which only the object can block. Surfaces are
    Lambertian: shading = ambient + (1 - ambient) * max(n.l, 0) * visibility, and the image is
    albedo * shading, so the labels and the image agree exactly. No anti-aliasing.
    """
    if not isinstance(size, (int, np.integer)) or size < 2:
        raise ValueError(f"size must be an integer >= 2, got {size!r}")
    size = int(size)
    right, down = _screen_coords(size)
    s, c = math.sin(scene.cam_pitch), math.cos(scene.cam_pitch)
    # forward + right * x - up * y, with forward (0, -s, c) and up (0, c, s).
    dirs = np.stack([right, -s - down * c, c - down * s], axis=1)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    n_pix = size * size
    camera = np.array([0.0, scene.cam_height, 0.0])
    origins = np.broadcast_to(camera, (n_pix, 3))

    with np.errstate(divide="ignore"):
        t_ground = np.where(dirs[:, 1] < 0, scene.cam_height / -dirs[:, 1], np.inf)
    t_object, normals = _intersect(scene, origins, dirs)
    mask = (t_object < t_ground) & (t_object < FAR)
    ground = ~mask & (t_ground < FAR)
    depth = np.where(mask, t_object, np.where(ground, t_ground, FAR))

    light = np.array(scene.light_dir)
    shading = np.ones(n_pix)
    lambert = np.maximum(normals[mask] @ light, 0.0)
    shading[mask] = scene.ambient + (1 - scene.ambient) * lambert
    ground_idx = np.flatnonzero(ground)
    ground_points = camera + t_ground[ground_idx, None] * dirs[ground_idx]
    ground_points[:, 1] = 0.0  # exactly on the plane, so shadow rays start on it
    t_shadow, _ = _intersect(scene, ground_points, np.broadcast_to(light, ground_points.shape))
    visibility = np.isinf(t_shadow)
    shading[ground_idx] = scene.ambient + (1 - scene.ambient) * light[1] * visibility

    albedo = np.empty((n_pix, 3))
    albedo[:] = scene.sky_rgb
    albedo[ground] = scene.ground_rgb
    albedo[mask] = COLOURS[scene.colour]

    albedo32 = albedo.astype(np.float32).reshape(size, size, 3)
    shading32 = shading.astype(np.float32).reshape(size, size)
    image = albedo32 * shading32[..., None]  # in [0, 1] since both factors are
    return Render(image=image, mask=mask.reshape(size, size),
                  depth=depth.astype(np.float32).reshape(size, size), shading=shading32,
                  albedo=albedo32)


def render_seed(seed: int, size: int = 64) -> tuple[Scene, Render]:
    """The scene of ``seed`` (see ``scene_from_seed``) and its render at ``size`` pixels."""
    scene = scene_from_seed(seed)
    return scene, render(scene, size)


def flip_horizontal(scene: Scene, r: Render) -> tuple[Scene, Render]:
    """Mirror a scene and its render left-right, keeping the prompt true.

    The scene is reflected in the camera's vertical plane (x -> -x, yaw -> -yaw, the light's x
    component negated); the prompt, which says nothing of place, stays as it is. The render's arrays are flipped, not re-rendered;
    since the camera and the pixel grid are symmetric and every shape is mirror-symmetric in its
    local frame, they equal ``render(flipped_scene)`` up to floating-point rounding (bit-exact
    labels except, rarely, a pixel centre lying on a silhouette edge).
    """
    lx, ly, lz = scene.light_dir
    mirrored = Scene(shape=scene.shape, colour=scene.colour,
                     x=-scene.x, z=scene.z, size=scene.size, yaw=-scene.yaw,
                     cam_height=scene.cam_height, cam_pitch=scene.cam_pitch,
                     light_dir=(-lx, ly, lz), ambient=scene.ambient,
                     ground_rgb=scene.ground_rgb, sky_rgb=scene.sky_rgb)
    flipped = Render(image=np.ascontiguousarray(r.image[:, ::-1]),
                     mask=np.ascontiguousarray(r.mask[:, ::-1]),
                     depth=np.ascontiguousarray(r.depth[:, ::-1]),
                     shading=np.ascontiguousarray(r.shading[:, ::-1]),
                     albedo=np.ascontiguousarray(r.albedo[:, ::-1]))
    return mirrored, flipped


def render_batch(seeds: Sequence[int], size: int = 64) -> dict[str, np.ndarray]:
    """Render the scenes of ``seeds`` and stack them, with their words as class indices.

    Returns ``image`` [N, H, W, 3] float32, ``mask`` [N, H, W] bool, ``depth`` and ``shading``
    [N, H, W] float32, ``albedo`` [N, H, W, 3] float32, ``shape`` and ``colour`` as int64 [N]
    indices into SHAPES and COLOURS (insertion order), ``seed`` int64 [N], and ``prompt`` as a
    list of N strings.
    """
    colour_names = tuple(COLOURS)
    scenes, renders = [], []
    for seed in seeds:
        scene, rendered = render_seed(int(seed), size)
        scenes.append(scene)
        renders.append(rendered)
    n = len(scenes)
    if n == 0:
        empty = np.zeros((0, size, size), np.float32)
        return {"image": np.zeros((0, size, size, 3), np.float32), "mask": empty.astype(bool),
                "depth": empty, "shading": empty.copy(), "albedo": np.zeros((0, size, size, 3), np.float32),
                "shape": np.zeros(0, np.int64), "colour": np.zeros(0, np.int64),
                "seed": np.zeros(0, np.int64), "prompt": []}
    return {
        "image": np.stack([r.image for r in renders]),
        "mask": np.stack([r.mask for r in renders]),
        "depth": np.stack([r.depth for r in renders]),
        "shading": np.stack([r.shading for r in renders]),
        "albedo": np.stack([r.albedo for r in renders]),
        "shape": np.array([SHAPES.index(s.shape) for s in scenes], np.int64),
        "colour": np.array([colour_names.index(s.colour) for s in scenes], np.int64),
        "seed": np.array([int(seed) for seed in seeds], np.int64),
        "prompt": [s.prompt for s in scenes],
    }


def colour_hues() -> dict[str, float]:
    """Hue of each named colour in degrees (HSV on its linear-RGB albedo)."""
    return {name: colorsys.rgb_to_hsv(*rgb)[0] * 360.0 for name, rgb in COLOURS.items()}


def _benchmark(n_per_shape: int = 60, size: int = 64) -> dict[str, float]:
    """Scenes per second for each shape at ``size`` pixels (one thread)."""
    rates = {}
    for shape in SHAPES:
        rng = np.random.default_rng(0)
        scenes = [sample_scene(rng, shape=shape) for _ in range(n_per_shape)]
        start = time.perf_counter()
        for scene in scenes:
            render(scene, size)
        rates[shape] = n_per_shape / (time.perf_counter() - start)
    return rates


if __name__ == "__main__":
    for px in (64, 128):
        rates = _benchmark(size=px)
        mean_time = sum(1 / r for r in rates.values()) / len(rates)
        print(f"{px} px: " + ", ".join(f"{k} {v:.0f}/s" for k, v in rates.items())
              + f"; average shape {1 / mean_time:.0f} scenes/s")
