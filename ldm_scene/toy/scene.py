"""Toy scenes: what a seed draws (one salient object of a named colour on a ground plane, a camera,
a light) and the prompt that says what it is, never where.

World frame: x to the right of the image, y up, z away from the camera. An object's local frame
has its origin at the centre of its footprint on the ground and is rotated by ``yaw`` about the
vertical axis. Because the camera sits on the plane x = 0 and the pixel grid is symmetric, a scene
mirrored in that plane renders as the horizontally flipped image (:func:`.render.flip_horizontal`).
:mod:`.render` ray-casts a scene into its image and exact labels.
"""

from __future__ import annotations

import colorsys
import math
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


def colour_hues() -> dict[str, float]:
    """Hue of each named colour in degrees (HSV on its linear-RGB albedo)."""
    return {name: colorsys.rgb_to_hsv(*rgb)[0] * 360.0 for name, rgb in COLOURS.items()}
