"""Procedural 3D toy scenes with exact per-pixel labels: analytic ray casting of a :class:`~.scene.Scene`.

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

import functools
import math
import time
from collections.abc import Sequence

import numpy as np

# The scene vocabulary and sampling live in .scene; re-exported here, where callers have always found them.
from .scene import (  # noqa: F401
    _EPS,
    _NEWTON_STEPS,
    _TAN_HALF_FOV,
    COLOURS,
    FAR,
    FOV_DEG,
    PLACE_WORDS,
    PROMPT_WORDS,
    SHAPES,
    Render,
    Scene,
    _shape_geometry,
    colour_hues,
    prompt_for,
    sample_scene,
    scene_from_seed,
)


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
