"""Tests of the toy scene renderer: determinism, exact labels, geometry, placement, words and flips."""

from __future__ import annotations

import colorsys
import dataclasses
import math

import numpy as np
import pytest

from ldm_scene.toy.render import (
    COLOURS,
    FAR,
    FOV_DEG,
    PLACE_WORDS,
    PROMPT_WORDS,
    SHAPES,
    Render,
    Scene,
    flip_horizontal,
    render,
    render_batch,
    render_seed,
    sample_scene,
    scene_from_seed,
)
from ldm_scene.toy.scene import _shape_geometry

SEEDS = range(12)


def _rays(scene: Scene, size: int) -> np.ndarray:
    """Unit ray directions [H, W, 3], written independently of the renderer from its documented camera."""
    tan_half = math.tan(math.radians(FOV_DEG) / 2)
    coords = ((np.arange(size) + 0.5) / size * 2 - 1) * tan_half
    right, down = np.meshgrid(coords, coords)
    s, c = math.sin(scene.cam_pitch), math.cos(scene.cam_pitch)
    forward, up = np.array([0.0, -s, c]), np.array([0.0, c, s])
    dirs = forward + right[..., None] * np.array([1.0, 0.0, 0.0]) - down[..., None] * up
    return dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def _named_hues() -> dict[str, float]:
    return {name: colorsys.rgb_to_hsv(*rgb)[0] * 360.0 for name, rgb in COLOURS.items()}


def test_vocabulary() -> None:
    assert SHAPES == ("sphere", "cube", "cylinder", "cone", "torus")
    assert tuple(COLOURS) == ("red", "orange", "yellow", "green", "blue", "purple")
    expected = {"red": 0, "orange": 30, "yellow": 60, "green": 120, "blue": 225, "purple": 280}
    hues = _named_hues()
    for name, rgb in COLOURS.items():
        assert all(0.0 <= v <= 1.0 for v in rgb)
        assert colorsys.rgb_to_hsv(*rgb)[1] > 0.8, f"{name} is not saturated"
        assert _hue_distance(hues[name], expected[name]) < 12, (name, hues[name])
    pairs = [(a, b) for a in hues for b in hues if a < b]
    assert min(_hue_distance(hues[a], hues[b]) for a, b in pairs) > 20


def test_same_seed_same_arrays_and_different_seeds_differ() -> None:
    scene_a, render_a = render_seed(7)
    scene_b, render_b = render_seed(7)
    assert scene_a == scene_b == scene_from_seed(7)
    for field in ("image", "mask", "depth", "shading", "albedo"):
        np.testing.assert_array_equal(getattr(render_a, field), getattr(render_b, field))
    _, render_c = render_seed(8)
    assert scene_from_seed(8) != scene_a
    assert np.abs(render_a.image - render_c.image).mean() > 1e-3
    assert (render_a.mask != render_c.mask).any()


def test_fixing_a_word_keeps_the_other_draws() -> None:
    free = sample_scene(np.random.default_rng(3))
    fixed = sample_scene(np.random.default_rng(3), shape="torus", colour="blue")
    assert (fixed.shape, fixed.colour) == ("torus", "blue")
    assert fixed.light_dir == free.light_dir and fixed.ambient == free.ambient
    assert fixed.ground_rgb == free.ground_rgb and fixed.sky_rgb == free.sky_rgb and fixed.yaw == free.yaw


@pytest.mark.parametrize("seed", SEEDS)
def test_labels_are_consistent(seed: int) -> None:
    scene, r = render_seed(seed)
    size = 64
    assert r.image.shape == (size, size, 3) and r.albedo.shape == (size, size, 3)
    assert r.mask.shape == r.depth.shape == r.shading.shape == (size, size)
    assert r.image.dtype == r.depth.dtype == r.shading.dtype == r.albedo.dtype == np.float32
    assert r.mask.dtype == np.bool_
    np.testing.assert_array_equal(r.image, r.albedo * r.shading[..., None])
    assert r.shading.min() >= 0.0 and r.shading.max() <= 1.0
    assert r.image.min() >= 0.0 and r.image.max() <= 1.0
    assert np.isfinite(r.depth).all() and r.depth.max() <= FAR and r.depth.min() > 0

    sky = r.depth == FAR
    assert sky.any() and not (sky & r.mask).any()
    np.testing.assert_array_equal(r.shading[sky], 1.0)
    np.testing.assert_allclose(r.albedo[sky], np.broadcast_to(np.float32(scene.sky_rgb), r.albedo[sky].shape))
    # The camera looks down, so the sky is above the image centre and fills part of the top row.
    assert np.nonzero(sky)[0].max() < size // 2
    # (a salient object may cover some of it, the ground never does).
    assert sky[0].any() and (sky | r.mask)[0].all()

    assert r.mask.any()
    assert r.depth[r.mask].max() < FAR
    np.testing.assert_array_equal(r.albedo[r.mask], np.broadcast_to(np.float32(COLOURS[scene.colour]),
                                                                     r.albedo[r.mask].shape))
    ground = ~r.mask & ~sky
    np.testing.assert_allclose(r.albedo[ground], np.broadcast_to(np.float32(scene.ground_rgb),
                                                                 r.albedo[ground].shape))
    # Lit ground is ambient + (1 - ambient) * l_y, shadowed ground is ambient: nothing else.
    lit = np.float32(scene.ambient + (1 - scene.ambient) * scene.light_dir[1])
    ground_shading = r.shading[ground]
    assert np.all(np.isclose(ground_shading, lit, atol=1e-6) | np.isclose(ground_shading, scene.ambient, atol=1e-6))


@pytest.mark.parametrize("seed", SEEDS)
def test_ground_recedes_up_each_column(seed: int) -> None:
    _, r = render_seed(seed)
    ground = ~r.mask & (r.depth < FAR)
    checked = 0
    for col in range(r.depth.shape[1]):
        values = r.depth[ground[:, col], col]  # top to bottom
        if len(values) > 1:
            assert np.all(np.diff(values) < 0), f"ground depth not decreasing down column {col}"
            checked += 1
    # A near, salient object may hide the ground in some columns down to the bottom edge.
    assert checked >= r.depth.shape[1] // 2


def _surface_function(shape: str, size: float, p: np.ndarray) -> np.ndarray:
    """A function of local points that is zero on the shape's surface (and < 0 inside)."""
    g = _shape_geometry(shape, size)
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    if shape == "sphere":
        return np.sqrt(x * x + (y - g["radius"]) ** 2 + z * z) - g["radius"]
    if shape == "cube":
        return np.maximum.reduce([np.abs(x), np.abs(y - g["half"]), np.abs(z)]) - g["half"]
    if shape == "cylinder":
        return np.maximum(np.hypot(x, z) - g["radius"], np.abs(y - g["height"] / 2) - g["height"] / 2)
    if shape == "cone":
        return np.maximum(np.hypot(x, z) - g["radius"] * (1 - y / g["height"]), -y)
    ring = np.hypot(x, y - g["cy"]) - g["major"]
    return np.hypot(ring, z) - g["minor"]


@pytest.mark.parametrize("shape", SHAPES)
def test_depth_is_the_distance_to_the_surface(shape: str) -> None:
    # Reconstruct hit points from depth along independently computed rays: ground points lie on
    # y = 0 and object points on the object's surface.
    rng = np.random.default_rng(0)
    for _ in range(2):
        scene = sample_scene(rng, shape=shape)
        r = render(scene, 64)
        dirs = _rays(scene, 64)
        points = np.array([0.0, scene.cam_height, 0.0]) + r.depth[..., None].astype(np.float64) * dirs
        ground = ~r.mask & (r.depth < FAR)
        assert np.abs(points[ground][:, 1]).max() < 1e-4
        c, s = math.cos(scene.yaw), math.sin(scene.yaw)
        to_local = np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])  # rotation by -yaw
        local = (points[r.mask] - np.array([scene.x, 0.0, scene.z])) @ to_local.T
        assert np.abs(_surface_function(shape, scene.size, local)).max() < 1e-4 * scene.size
        # Just in front of each hit the ray is still outside the object: it is the first hit.
        before = local - 1e-3 * scene.size * (dirs[r.mask] @ to_local.T)
        assert (_surface_function(shape, scene.size, before) > 0).all()


def test_sphere_mask_is_exactly_the_rays_that_meet_it() -> None:
    scene = sample_scene(np.random.default_rng(1), shape="sphere")
    r = render(scene, 64)
    radius = scene.size / 2
    oc = np.array([0.0, scene.cam_height, 0.0]) - np.array([scene.x, radius, scene.z])
    b = _rays(scene, 64) @ oc
    # The sphere rests above the ground, so any ray that meets it meets it before the ground.
    assert np.array_equal(r.mask, b * b - (oc @ oc - radius * radius) > 0)


def _centroids_and_coverage(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    size = masks.shape[-1]
    ys, xs = np.mgrid[0:size, 0:size]
    area = masks.sum((1, 2))
    return (masks * xs).sum((1, 2)) / area / size, (masks * ys).sum((1, 2)) / area / size, area / size ** 2


def test_objects_are_salient_and_placed_by_the_seed_not_the_words() -> None:
    # The v2 world: a prompt never says where; the object's place varies continuously in x and y
    # (left-right and near-far) and it covers 15-30% of the frame on average, never under 4%.
    batch = render_batch(range(600))
    cx, cy, coverage = _centroids_and_coverage(batch["mask"])
    assert coverage.min() >= 0.04, f"an object covers only {coverage.min():.1%} of the frame"
    assert 0.15 <= coverage.mean() <= 0.30, coverage.mean()
    # Continuous placement over the image: every third holds a good share, x and y both spread.
    counts = np.bincount(np.minimum((cx * 3).astype(int), 2), minlength=3) / len(cx)
    assert counts.min() >= 0.15, counts
    assert cx.std() >= 0.15 and cy.std() >= 0.08, (cx.std(), cy.std())
    assert len(np.unique(np.round(cx, 2))) >= 50  # continuous, not a few bins
    # The words say nothing of the place: per shape and per colour the x distribution is the same.
    for key, names in (("shape", SHAPES), ("colour", tuple(COLOURS))):
        for k in range(len(names)):
            mine = cx[batch[key] == k]
            assert abs(np.median(mine) - 0.5) < 0.08, (names[k], np.median(mine))
            assert (mine < 1 / 3).mean() > 0.08 and (mine > 2 / 3).mean() > 0.08, names[k]


def test_the_same_words_land_everywhere() -> None:
    # One prompt, many seeds: the object's centroid reaches all three thirds and a range of rows.
    scenes = [sample_scene(np.random.default_rng(seed), shape="cube", colour="red") for seed in range(60)]
    masks = np.stack([render(s).mask for s in scenes])
    cx, cy, _ = _centroids_and_coverage(masks)
    assert {s.prompt for s in scenes} == {"a red cube"}
    assert np.bincount(np.minimum((cx * 3).astype(int), 2), minlength=3).min() >= 5
    assert np.ptp(cy) >= 0.25
    # The projected centre the sampler aims at agrees with where the silhouette lands.
    columns = np.array([s.centre_column for s in scenes])
    rows = np.array([s.centre_row for s in scenes])
    assert np.corrcoef(columns, cx)[0, 1] > 0.95 and np.corrcoef(rows, cy)[0, 1] > 0.8


def test_prompt_and_batch_indices_match_attributes() -> None:
    batch = render_batch(range(10), size=32)
    assert batch["image"].shape == (10, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["mask"].shape == (10, 32, 32) and batch["mask"].dtype == np.bool_
    assert batch["depth"].shape == batch["shading"].shape == (10, 32, 32)
    assert len(batch["prompt"]) == 10
    assert "position" not in batch
    for i in range(10):
        scene = scene_from_seed(i)
        shape, colour = SHAPES[batch["shape"][i]], tuple(COLOURS)[batch["colour"][i]]
        assert (shape, colour) == (scene.shape, scene.colour)
        prompt = batch["prompt"][i]
        assert prompt == scene.prompt == f"{'an' if colour == 'orange' else 'a'} {colour} {shape}"
        assert set(prompt.split()) <= set(PROMPT_WORDS)
        np.testing.assert_array_equal(batch["mask"][i], render(scene, 32).mask)


def test_no_place_word_in_the_vocabulary_or_any_prompt() -> None:
    assert not PLACE_WORDS & set(PROMPT_WORDS)
    assert {"left", "right", "middle", "on", "in", "the"}.isdisjoint(PROMPT_WORDS)
    assert set(PROMPT_WORDS) == {"a", "an", *COLOURS, *SHAPES}
    prompts = {scene_from_seed(seed).prompt for seed in range(400)}
    assert len(prompts) == len(SHAPES) * len(COLOURS)  # every combination, each three words
    for prompt in prompts:
        assert len(prompt.split()) == 3 and not PLACE_WORDS & set(prompt.split())


def test_object_hue_is_the_named_colour() -> None:
    hues = _named_hues()
    rng = np.random.default_rng(11)
    for colour in COLOURS:
        for _ in range(2):
            scene = sample_scene(rng, colour=colour)
            r = render(scene, 48)
            mean_rgb = r.image[r.mask].mean(axis=0)
            hue = colorsys.rgb_to_hsv(*mean_rgb)[0] * 360.0
            nearest = min(hues, key=lambda name: _hue_distance(hue, hues[name]))
            assert nearest == colour, f"{colour} object looks {nearest} (hue {hue:.1f})"


@pytest.mark.parametrize("seed", range(6))
def test_flip_keeps_the_prompt_and_matches_a_rerender(seed: int) -> None:
    scene, r = render_seed(seed)
    flipped_scene, flipped = flip_horizontal(scene, r)
    assert flipped_scene.prompt == scene.prompt
    assert flipped_scene.x == -scene.x and flipped_scene.yaw == -scene.yaw
    for field in ("image", "mask", "depth", "shading", "albedo"):
        np.testing.assert_array_equal(getattr(flipped, field), getattr(r, field)[:, ::-1])
    rerendered = render(flipped_scene)
    assert (rerendered.mask != flipped.mask).mean() < 1e-3
    agree = rerendered.mask == flipped.mask
    assert np.abs(rerendered.image - flipped.image)[agree].max() < 1e-4
    assert np.abs(rerendered.depth - flipped.depth)[agree].max() < 1e-3
    back_scene, back = flip_horizontal(flipped_scene, flipped)
    assert back_scene == scene
    np.testing.assert_array_equal(back.image, r.image)


def test_an_object_casts_a_shadow_under_side_light() -> None:
    scene = dataclasses.replace(sample_scene(np.random.default_rng(5), shape="cube"),
                                light_dir=(math.cos(0.5), math.sin(0.5), 0.0))
    r = render(scene)
    ground = ~r.mask & (r.depth < FAR)
    shadow = ground & np.isclose(r.shading, scene.ambient, atol=1e-6)
    assert shadow.sum() >= 5
    # Light comes from +x, so the shadow falls to the object's left in the image.
    assert np.nonzero(shadow)[1].mean() < np.nonzero(r.mask)[1].mean()


def _valid_kwargs() -> dict:
    return dataclasses.asdict(scene_from_seed(0))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("shape", "pyramid", "unknown shape"),
    ("colour", "pink", "unknown colour"),
    ("size", -1.0, "size must be > 0"),
    ("size", float("nan"), "size must be a finite number"),
    ("cam_height", 0.0, "cam_height must be > 0"),
    ("cam_pitch", 2.0, "cam_pitch must be in"),
    ("ambient", 1.5, "ambient must be in"),
    ("light_dir", (0.0, 2.0, 0.0), "unit vector"),
    ("light_dir", (0.0, -1.0, 0.0), "point up"),
    ("light_dir", (1.0, 0.0), "three"),
    ("ground_rgb", (0.5, 1.2, 0.5), "ground_rgb must be three numbers in"),
    ("sky_rgb", "blue", "sky_rgb must be three numbers in"),
    ("z", -5.0, "not in front of the camera"),
])
def test_scene_rejects_bad_values(field: str, value: object, message: str) -> None:
    kwargs = _valid_kwargs()
    kwargs[field] = value
    with pytest.raises(ValueError, match=message):
        Scene(**kwargs)


def test_render_validates_its_inputs() -> None:
    with pytest.raises(ValueError, match="size must be an integer"):
        render(scene_from_seed(0), size=1)
    with pytest.raises(ValueError, match="mask must be bool"):
        Render(image=np.zeros((2, 2, 3)), mask=np.zeros((2, 2)), depth=np.zeros((2, 2)),
               shading=np.zeros((2, 2)), albedo=np.zeros((2, 2, 3)))


def test_larger_renders_agree_with_small_ones() -> None:
    scene = scene_from_seed(4)
    small, large = render(scene, 32), render(scene, 128)
    # Same scene at 4x resolution: the coverage fractions agree closely.
    assert abs(small.mask.mean() - large.mask.mean()) < 0.02
    assert abs((small.depth == FAR).mean() - (large.depth == FAR).mean()) < 0.04


def test_sample_scene_rejects_unknown_words() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown shape"):
        sample_scene(rng, shape="pyramid")
    with pytest.raises(ValueError, match="unknown colour"):
        sample_scene(rng, colour="pink")
    with pytest.raises(TypeError):
        sample_scene(rng, position="left")  # a scene has no place word to fix
