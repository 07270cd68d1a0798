"""latent-move: the move of the latent's content, its control, its validation and its place in the sampler."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm_scene.capture import attached_hooks
from ldm_scene.intervention import (
    KEEP_MARGIN, MOVE_KEEP_MARGIN, InterventionError, default_edit_steps, intervene, keep_background, make_editor,
)
from ldm_scene.intervention_methods import free_cells, guided_sample
from ldm_scene.latent_move import (
    MAX_FIT_SCALE, LatentMoveEditor, carry, harmonic_fill, mask_centroid, row_fill, shifted_mask, translate, warp,
)
from ldm_scene.sampler import GenerationConfig, sample


def _box(h, w, top, left, size):
    m = np.zeros((h, w), bool)
    m[top:top + size, left:left + size] = True
    return m


def test_translate_by_whole_cells_is_a_shift_with_zeros_coming_in():
    x = torch.arange(2 * 6 * 7, dtype=torch.float32).reshape(1, 2, 6, 7)
    moved = translate(x, 2, -1)
    assert torch.allclose(moved[..., :5, 2:], x[..., 1:, :5], atol=1e-5)
    assert moved[..., :, :2].abs().max() < 1e-4 and moved[..., 5:, :].abs().max() < 1e-4
    # half a cell is the mean of two neighbours (bilinear)
    half = translate(x, 0.5, 0)
    assert torch.allclose(half[..., 3], (x[..., 2] + x[..., 3]) / 2, atol=1e-5)


def test_warp_scales_about_the_given_point_and_at_scale_one_is_translate():
    x = torch.arange(2 * 12 * 12, dtype=torch.float32).reshape(1, 2, 12, 12)
    assert torch.equal(warp(x, 2, -1), translate(x, 2, -1))
    box = torch.zeros(1, 1, 16, 16)
    box[..., 4:8, 2:6] = 1  # 4x4 cells, centre (x, y) = (4, 6) from the corner
    half = warp(box, 6, 4, 0.5, 4.0, 6.0)  # halved about its centre, then 6 right and 4 down
    assert half.sum().item() == pytest.approx(4.0, abs=1e-4)  # a quarter of the area
    ys, xs = torch.meshgrid(torch.arange(16.0) + 0.5, torch.arange(16.0) + 0.5, indexing="ij")
    w = half[0, 0]
    assert ((w * xs).sum() / w.sum()).item() == pytest.approx(10.0) and ((w * ys).sum() / w.sum()).item() == pytest.approx(10.0)
    double = warp(box, 0, 0, 2.0, 4.0, 6.0)
    # twice the side about the centre: cells 2-9 x 0-7, full inside, bilinear-soft on its border
    assert double[0, 0, 3:9, 1:7].min() == 1 and double.sum().item() == pytest.approx(64.0, abs=4)


def test_shifted_mask_rounds_and_drops_what_leaves_the_frame():
    m = _box(8, 8, 2, 1, 2)
    assert np.array_equal(shifted_mask(m, 3.4, -1.2), _box(8, 8, 1, 4, 2))
    assert shifted_mask(m, -2, 0).sum() == 2  # one column left the frame
    assert not shifted_mask(m, 20, 0).any()


def test_harmonic_fill_restores_a_linear_field_and_leaves_the_rest():
    """A linear field is harmonic, so filling a hole in it from its border gives it back; cells
    outside the hole are never touched."""
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    field = torch.stack([0.3 * xs - 0.2 * ys + 1, -0.1 * xs + 0.05 * ys])[None]
    hole = torch.zeros(1, 1, 16, 16)
    hole[..., 5:10, 4:9] = 1
    damaged = field * (1 - hole) + 7.0 * hole
    filled = harmonic_fill(damaged, hole, iterations=400)
    assert torch.allclose(filled, field, atol=1e-3)
    assert torch.equal(filled[..., hole[0, 0] == 0], damaged[..., hole[0, 0] == 0])


def test_row_fill_carries_a_horizon_through_the_hole_where_harmonic_fill_blurs_it():
    """A horizon (sky above row 6, ground below, each with a gradient across the frame) behind a
    hole: filled along rows, every hole cell gets its own row's value, so the edge stays on its row;
    harmonic fill mixes the rows above and below into a gradient (what the run redraws off the row)."""
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    field = torch.stack([torch.where(ys < 6, 2.0, -1.0) + 0.1 * xs, torch.where(ys < 6, -0.5, 0.5) - 0.05 * xs])[None]
    hole = torch.zeros(1, 1, 16, 16)
    hole[..., 3:10, 5:11] = 1
    damaged = field * (1 - hole) + 9.0 * hole
    filled = row_fill(damaged, hole)
    assert torch.allclose(filled, field, atol=1e-5)  # linear along each row: given back exactly
    assert torch.equal(filled[..., hole[0, 0] == 0], damaged[..., hole[0, 0] == 0])
    blurred = harmonic_fill(damaged, hole, iterations=400)
    assert (blurred - field)[..., 5:7, 5:11].abs().max() > 0.5  # the rows beside the edge mixed


def test_row_fill_at_the_frame_edge_and_on_a_row_with_nothing_known():
    x = torch.arange(2 * 6 * 8, dtype=torch.float32).reshape(1, 2, 6, 8)
    hole = torch.zeros(1, 1, 6, 8)
    hole[..., 1, 5:] = 1  # reaches the right edge: the nearest known cell's value
    hole[..., 2, :3] = 1  # reaches the left edge
    hole[..., 4, :] = 1  # the whole row: harmonic, from the rows above and below
    filled = row_fill(x, hole)
    assert torch.equal(filled[..., 1, 5:], x[..., 1, 4:5].expand(-1, -1, 3))
    assert torch.equal(filled[..., 2, :3], x[..., 2, 3:4].expand(-1, -1, 3))
    assert torch.allclose(filled[..., 4, :], harmonic_fill(x, hole)[..., 4, :])
    assert ((filled[..., 4, :] > x[..., 3, :]) & (filled[..., 4, :] < x[..., 5, :])).all()  # between its neighbours
    # a whole row left empty joins the row-filled rows around it: each cell the mean of its neighbours as filled
    wide = torch.zeros(1, 1, 6, 8)
    wide[..., 1:5, 2:6] = 1
    wide[..., 3, :] = 1
    x = torch.randn(1, 2, 6, 8, generator=torch.Generator().manual_seed(1))
    filled = row_fill(x, wide)
    rows = row_fill(x, torch.where(torch.arange(6)[:, None] == 3, 0.0, wide))  # the other rows alone
    assert torch.allclose(filled[..., [1, 2, 4], :], rows[..., [1, 2, 4], :])
    inner = filled[..., 3, 1:7]
    around = (filled[..., 2, 1:7] + filled[..., 4, 1:7] + filled[..., 3, :6] + filled[..., 3, 2:]) / 4
    assert torch.allclose(inner, around, atol=1e-3)


def test_carry_fills_the_old_place_with_the_named_fill():
    x0, noise = _scene()
    mask = np.zeros((64, 64), bool)
    mask[12:24, 8:20] = True  # cells 3-5 x 2-4 at 4 px per cell
    for fill, fn in (("rows", row_fill), ("harmonic", harmonic_fill)):
        out = carry(x0 + noise, x0, mask, (32.0, 0.0), 1.0, (14.0, 18.0), dilate=0, fill=fill)
        hole = torch.zeros(1, 1, 16, 16)
        hole[..., 3:6, 2:5] = 1
        assert torch.allclose((out - noise)[..., 3:6, 2:5], fn(x0, hole)[..., 3:6, 2:5], atol=1e-4)
    with pytest.raises(ValueError, match="fill"):
        LatentMoveEditor(mask, np.roll(mask, 8, axis=1), at=3, fill="nearest")
    with pytest.raises(ValueError, match="fill must be one of"):
        carry(x0 + noise, x0, mask, (32.0, 0.0), 1.0, (14.0, 18.0), fill="nearest")


def _scene(h=16, w=16):
    """x0: a ramp of ground with a bright 3x3 object at rows 3-5, columns 2-4; the noise: random."""
    ys, xs = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    x0 = torch.stack([0.1 * ys, 0.05 * xs, torch.zeros(h, w), 0.02 * ys])[None]
    x0[:, :, 3:6, 2:5] += 5.0
    noise = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(0))
    return x0, noise


def test_the_move_carries_the_object_to_the_target_and_fills_where_it_was():
    x0, noise = _scene()
    # image 64 px, latent 16: 4 px per cell; the object (cells 3-5 x 2-4) is pixels 12-23 x 8-19
    source, target = _box(64, 64, 12, 8, 12), _box(64, 64, 36, 40, 12)  # 6 cells down, 8 right
    editor = LatentMoveEditor(source, target, at=2, dilate=0)
    assert editor.displacement == (32.0, 24.0) and np.array_equal(editor.moved, target)
    latent = x0 + 0.5 * noise
    assert torch.equal(editor.after_step(1, latent, x0), latent)  # not its step: untouched
    out = editor.after_step(2, latent, x0)
    assert editor.edited == [2]
    bright = (out[0, 2] > 2.5).nonzero().float()  # channel 2 is 0 everywhere but on the object
    assert len(bright) == 9 and bright.mean(0).tolist() == [10.0, 11.0]
    # where the object was is ground again (the ramp), and the cells it left keep their noise
    assert torch.allclose(out[..., 3:6, 2:5] - 0.5 * noise[..., 3:6, 2:5], x0[..., 3:6, 2:5] - 5.0, atol=1e-2)
    # the object took its own noise along
    torch.testing.assert_close(out[..., 9:12, 10:13] - x0[..., 3:6, 2:5], 0.5 * noise[..., 3:6, 2:5])
    # far from both, nothing changed (but for the rounding of x0 + (latent - x0))
    torch.testing.assert_close(out[..., 12:, :8], latent[..., 12:, :8])


def test_fit_scales_the_object_to_the_targets_area_and_lands_it_on_the_target():
    """A drawn region a quarter of the object's area gets the object at half its side, centred on
    the region; a shifted mask (same area) scales nothing; the control scales as the method does."""
    x0, _ = _scene()
    source = _box(64, 64, 12, 8, 12)  # cells 3-5 x 2-4
    small = _box(64, 64, 40, 40, 6)   # a quarter of the area, centred on cell (10.75, 10.75)
    editor = LatentMoveEditor(source, small, at=2, dilate=0)
    assert editor.scale == 0.5 and mask_centroid(editor.moved) == mask_centroid(small)
    assert editor.moved.sum() == small.sum()
    out = editor.after_step(2, x0, x0)  # no noise: the latent is its x0
    bright = out[0, 2]  # channel 2: 0 but on the object (5.0 on its 9 cells), now on a quarter of the area
    assert bright.sum().item() < 9 * 5.0 / 3 and bright[9:13, 9:13].sum() == bright.sum()
    ys, xs = torch.meshgrid(torch.arange(16.0) + 0.5, torch.arange(16.0) + 0.5, indexing="ij")
    centre = ((bright * xs).sum() / bright.sum()).item(), ((bright * ys).sum() / bright.sum()).item()
    assert centre == pytest.approx((10.75, 10.75), abs=0.1)  # the target's centre, in cells (43 px / 4)
    assert LatentMoveEditor(source, _box(64, 64, 36, 40, 12), 2).scale == 1.0
    assert LatentMoveEditor(source, small, 2, random_seed=3).scale == 0.5
    assert LatentMoveEditor(source, small, 2, fit=False).scale == 1.0
    assert LatentMoveEditor(source, _box(64, 64, 0, 0, 2), 2).scale == 1 / MAX_FIT_SCALE  # clipped


def test_strength_scales_the_move_and_zero_is_exact():
    x0, noise = _scene()
    source, target = _box(64, 64, 12, 8, 12), _box(64, 64, 36, 40, 12)
    assert LatentMoveEditor(source, target, 2, strength=0.5).displacement == (16.0, 12.0)
    latent = x0 + noise
    assert torch.equal(LatentMoveEditor(source, target, 2, strength=0.0).after_step(2, latent, x0), latent)


def test_the_control_moves_as_far_in_another_direction_and_is_reproducible():
    source, target = _box(64, 64, 12, 8, 12), _box(64, 64, 36, 40, 12)
    method = LatentMoveEditor(source, target, 2)
    controls = [LatentMoveEditor(source, target, 2, random_seed=s) for s in (1, 2, 3)]
    for c in controls:
        assert math.hypot(*c.displacement) == pytest.approx(math.hypot(*method.displacement))
        assert c.displacement != pytest.approx(method.displacement)
    assert len({c.displacement for c in controls}) == 3
    assert LatentMoveEditor(source, target, 2, random_seed=2).displacement == controls[1].displacement


def test_the_correction_moves_the_object_from_where_it_is_found_to_the_moves_goal():
    """``correct_after`` steps after the move, the object found 8 px short of the goal is carried the
    rest of the way (unscaled); the move's own step and other steps are untouched by it."""
    x0, _ = _scene()
    source, target = _box(64, 64, 12, 8, 12), _box(64, 64, 36, 40, 12)
    found_masks = []

    def locate(x):
        found_masks.append(x.clone())
        return _box(64, 64, 36, 32, 12)  # cells 9-11 x 8-10: two cells left of the goal

    editor = LatentMoveEditor(source, target, at=2, dilate=0, locate=locate, correct_after=3)
    assert editor.goal == (46.0, 42.0)
    editor.after_step(2, x0, x0)
    assert found_masks == [] and editor.corrections == []
    # the run drew the object two cells short of the goal: cells 9-11 x 8-10
    drawn = x0.clone()
    drawn[:, :, 3:6, 2:5] -= 5.0
    drawn[:, :, 9:12, 8:11] += 5.0
    assert torch.equal(editor.after_step(4, drawn, drawn), drawn)  # not the correction's step
    out = editor.after_step(5, drawn, drawn)
    assert len(found_masks) == 1 and editor.edited == [2, 5] and editor.corrections == [(5, 8.0, 0.0)]
    bright = (out[0, 2] > 2.5).nonzero().float()
    assert len(bright) == 9 and bright.mean(0).tolist() == [10.0, 11.0]  # on the goal's cells


def test_the_correction_is_skipped_when_nothing_is_found_or_the_object_is_on_its_goal():
    x0, noise = _scene()
    source, target = _box(64, 64, 12, 8, 12), _box(64, 64, 36, 40, 12)
    latent = x0 + noise
    for found in (None, np.zeros((64, 64), bool), target, _box(64, 64, 36, 40, 13)):  # the last: 0.5 px off
        editor = LatentMoveEditor(source, target, at=2, locate=lambda x, f=found: f, correct_after=1)
        editor.after_step(2, latent, x0)
        assert torch.equal(editor.after_step(3, latent, x0), latent) and editor.corrections == []
    editor = LatentMoveEditor(source, target, at=2, locate=lambda x: np.ones((32, 32), bool), correct_after=1)
    editor.after_step(2, latent, x0)
    with pytest.raises(ValueError, match="32, 32"):
        editor.after_step(3, latent, x0)
    with pytest.raises(ValueError, match="correct_after"):
        LatentMoveEditor(source, target, at=2, correct_after=0)


def test_the_controls_correction_aims_at_the_controls_own_landing():
    source, target = _box(64, 64, 12, 8, 12), _box(64, 64, 36, 40, 12)
    control = LatentMoveEditor(source, target, 2, random_seed=3, locate=lambda x: source, correct_after=1)
    cx, cy = mask_centroid(source)
    assert control.goal == pytest.approx((cx + control.displacement[0], cy + control.displacement[1]))
    x0 = torch.zeros(1, 4, 16, 16)
    control.after_step(2, x0, x0)
    control.after_step(3, x0, x0)  # found where it started: corrected by its own random displacement
    assert control.corrections[0][1:] == pytest.approx(control.displacement)


@pytest.mark.parametrize("source, message", [
    (np.zeros((64, 64), bool), "empty"),
    (np.ones((32, 32), bool), "must match"),
    (np.ones((64, 64), np.uint8), "bool"),
])
def test_the_editor_refuses_bad_masks(source, message):
    with pytest.raises(ValueError, match=message):
        LatentMoveEditor(source, _box(64, 64, 0, 0, 8), 2)


def test_make_editor_needs_the_objects_mask_and_one_step():
    target, source = _box(32, 32, 0, 0, 8), _box(32, 32, 16, 16, 8)
    with pytest.raises(InterventionError, match="pass the source mask"):
        make_editor("latent-move", {}, target)
    with pytest.raises(InterventionError, match="no object to move"):
        make_editor("latent-move", {}, target, steps=(1,), source=np.zeros((32, 32), bool))
    with pytest.raises(InterventionError, match="target's size"):
        make_editor("latent-move", {}, target, steps=(1,), source=np.ones((8, 8), bool))
    with pytest.raises(InterventionError, match="moves once"):
        make_editor("latent-move", {}, target, steps=(0, 1), source=source)
    editor = make_editor("random-move", {}, target, steps=(1,), source=source, seed=4)
    assert editor.random_seed == 5 and editor.keep_margin == MOVE_KEEP_MARGIN
    assert default_edit_steps(15, "latent-move") == (9,) and default_edit_steps(2, "random-move") == (1,)


def test_keep_background_frees_where_a_move_lands_with_the_moves_margin():
    source, target = _box(64, 64, 0, 0, 8), np.zeros((64, 64), bool)
    target[40:44, 20:60] = True  # a flat strip: the 8x8 object, centred on it, reaches outside
    editor = LatentMoveEditor(source, target, 2)
    keep = keep_background([torch.zeros(1, 4, 16, 16)], source, target, editor=editor)
    assert keep.margin == MOVE_KEEP_MARGIN
    assert np.array_equal(keep.free, source | target | editor.moved) and (editor.moved & ~target).any()
    assert keep_background([torch.zeros(1, 4, 16, 16)], source, target).margin == KEEP_MARGIN


def test_keep_background_also_frees_the_vacated_place_grown_by_the_moves_margin():
    """What the object's mask misses around its old place (shadow, soft edge) must not be held, or
    the run draws the object back there; the ring is the editor's ``vacated_margin`` cells."""
    source, target = _box(64, 64, 16, 16, 8), _box(64, 64, 40, 40, 8)  # cells 4-5 and 10-11
    ref = [torch.zeros(1, 4, 16, 16)]
    keep = keep_background(ref, source, target, editor=LatentMoveEditor(source, target, 2, vacated_margin=2))
    cells = keep.cells((16, 16))[0, 0].bool()
    assert cells[2:8, 2:8].all() and not cells[1, 4] and not cells[8, 4]  # source cells grown by 2, no more
    assert cells[10:12, 10:12].all() and not cells[9, 10] and not cells[12, 11]  # the target: margin 0
    tight = keep_background(ref, source, target, editor=LatentMoveEditor(source, target, 2, vacated_margin=0))
    assert int(tight.cells((16, 16)).sum()) == 8
    with pytest.raises(ValueError, match="vacated_margin"):
        LatentMoveEditor(source, target, 2, vacated_margin=-1)


STEPS = 4


def test_on_the_tiny_model_the_move_changes_only_what_follows_its_step(tiny_model):
    """Every latent up to the move's step equals the plain run's; the one after it differs inside the
    moved region only, where the keep holds the rest; hooks never stay."""
    config = GenerationConfig("a red cube", seed=3, steps=STEPS)
    h, w = tiny_model.image_size
    source, target = _box(h, w, 0, 0, h // 4), _box(h, w, h // 2, w // 2, h // 4)
    plain = list(sample(tiny_model, config))
    editor = make_editor("latent-move", {}, target, steps=(1,), source=source)
    keep = keep_background([s.latent for s in plain], source, target, editor=editor)
    edited = list(guided_sample(tiny_model, config, [editor], keep=keep))
    assert attached_hooks(tiny_model.unet) == 0 and editor.edited == [1]
    assert torch.equal(edited[0].latent, plain[0].latent)
    cells = keep.cells(tuple(plain[1].latent.shape[-2:]))[0, 0].bool()
    assert (cells & ~free_cells(keep.free, tuple(cells.shape), keep.margin)[0, 0].bool()).any()  # the vacated ring
    assert not torch.equal(edited[1].latent[..., cells], plain[1].latent[..., cells])
    for mine, theirs in zip(edited[1:], plain[1:]):
        assert torch.equal(mine.latent[..., ~cells], theirs.latent[..., ~cells])


def test_paste_back_keeps_the_unedited_pixels_outside_the_free_cells_with_a_ramp_of_half_a_cell():
    from PIL import Image

    from ldm_scene.intervention_methods import KeepBackground

    free = np.zeros((64, 64), bool)
    free[21:30, 22:27] = True  # latent cells 5-7 x 5-6 at 4 px per cell: pixels 20-31 x 20-27
    unedited = Image.fromarray(np.full((64, 64, 3), 40, np.uint8))
    edited = Image.fromarray(np.full((64, 64, 3), 240, np.uint8))
    keep = KeepBackground([torch.zeros(1, 4, 16, 16)], free, 0, image=unedited)
    alpha = keep.alpha((16, 16), (64, 64))
    assert (alpha[20:32, 20:28] == 1).all()  # the free cells' pixels: the edit's
    ring = np.zeros((64, 64), bool)
    ring[16:36, 16:32] = True
    assert (alpha[~ring] == 0).all()  # nothing beyond 4 px (2 x half a cell) from them
    column = alpha[20:36, 24]
    assert (np.diff(column[11:]) <= 0).all() and 0 < column[13] < 1  # a ramp down, no step
    out = np.asarray(keep.paste_back(edited, (16, 16)))
    assert (out[20:32, 20:28] == 240).all() and (out[~ring] == 40).all()
    assert np.asarray(KeepBackground([torch.zeros(1, 4, 16, 16)], free).paste_back(edited, (16, 16))).min() == 240
    with pytest.raises(ValueError, match="unedited image"):
        keep.paste_back(edited.resize((32, 32)), (16, 16))
    with pytest.raises(ValueError, match="unedited image is 32x32, the region to keep 64x64"):
        KeepBackground([torch.zeros(1, 4, 16, 16)], free, 0, image=unedited.resize((32, 32)))


def test_on_the_tiny_model_the_final_image_is_the_unedited_one_outside_the_free_cells(tiny_model):
    """Given the unedited image, the edited run's final image is pasted back on it: identical beyond
    the ramp around the free cells, the edited run's own image on them; without it, nothing pasted."""
    config = GenerationConfig("a red cube", seed=3, steps=STEPS)
    h, w = tiny_model.image_size
    source, target = _box(h, w, 0, 0, h // 4), _box(h, w, h // 2, w // 2, h // 4)
    plain = list(sample(tiny_model, config))
    runs = {}
    for name, image in (("bare", None), ("pasted", plain[-1].image)):
        editor = make_editor("latent-move", {}, target, steps=(1,), source=source)
        keep = keep_background([s.latent for s in plain], source, target, editor=editor, image=image)
        runs[name] = np.asarray(list(guided_sample(tiny_model, config, [editor], keep=keep))[-1].image, np.int16)
    alpha = keep.alpha(tuple(plain[-1].latent.shape[-2:]), (h, w))
    unedited = np.asarray(plain[-1].image, np.int16)
    assert np.array_equal(runs["pasted"][alpha == 0], unedited[alpha == 0])
    assert np.array_equal(runs["pasted"][alpha == 1], runs["bare"][alpha == 1])
    assert not np.array_equal(runs["bare"][alpha == 0], unedited[alpha == 0])  # the decoder's spread, now gone


def test_on_the_tiny_model_the_correction_reads_the_decoded_x0_and_moves_the_rest_of_the_way(tiny_model):
    """The locator sees the x0 of the correction's step decoded to an image of the model's size; the
    latents up to that step equal the uncorrected move's, the one after it differs; hooks never stay."""
    from ldm_scene.intervention import decoded_locator

    config = GenerationConfig("a red cube", seed=3, steps=STEPS)
    h, w = tiny_model.image_size
    source, target = _box(h, w, 0, 0, h // 4), _box(h, w, h // 2, w // 2, h // 4)
    seen = []

    def find(image):
        seen.append(image.shape)
        return _box(h, w, h // 2, 0, h // 4)  # found far left of the goal

    def run(locate):
        editor = make_editor("latent-move", {}, target, steps=(1,), source=source, locate=locate)
        editor.correct_after = 2
        return editor, list(guided_sample(tiny_model, config, [editor]))

    plain_editor, plain_move = run(None)
    editor, corrected = run(decoded_locator(tiny_model, find))
    assert seen == [(h, w, 3)] and attached_hooks(tiny_model.unet) == 0
    assert plain_editor.edited == [1] and editor.edited == [1, 3] and editor.corrections[0][1] > 0  # to the right
    assert all(torch.equal(a.latent, b.latent) for a, b in zip(plain_move[:3], corrected[:3]))
    assert not torch.equal(plain_move[3].latent, corrected[3].latent)
    # a run too short for the correction (the default 4 steps after the move) ends without one
    editor = make_editor("latent-move", {}, target, steps=(1,), source=source, locate=decoded_locator(tiny_model, find))
    list(guided_sample(tiny_model, config, [editor]))
    assert editor.edited == [1] and len(seen) == 1


def test_a_move_refuses_a_variance_preserving_scheduler_without_leaving_hooks(tiny_model):
    from diffusers import DDIMScheduler

    config = GenerationConfig("a red cube", seed=3, steps=STEPS)
    h, w = tiny_model.image_size
    original = tiny_model.pipe.scheduler
    tiny_model.pipe.scheduler = DDIMScheduler.from_config(original.config)
    try:
        with pytest.raises(ValueError, match="sigma-parameterised"):
            list(intervene(tiny_model, config, _box(h, w, 0, 0, 8), "latent-move", {}, steps=(1,),
                           source=_box(h, w, 16, 16, 8)))
    finally:
        tiny_model.pipe.scheduler = original
    assert attached_hooks(tiny_model.unet) == 0


def test_mask_centroid_is_in_pixel_centres():
    assert mask_centroid(_box(8, 8, 2, 4, 2)) == (5.0, 3.0)
