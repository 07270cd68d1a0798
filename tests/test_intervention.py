"""Intervention: mask handling, edits confined to chosen sites/steps, exact no-op, hook cleanup."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_scene.capture import attached_hooks, capture
from ldm_scene.intervention import (
    METHOD_DEFAULTS, METHODS, InterventionError, SteerEditor, available_methods, default_edit_steps,
    intervene, make_editor, prepare_target, translate_mask,
)
from ldm_scene.sampler import GenerationConfig, sample
from ldm_scene.sites import SITE_KEYS, UP_SITE_KEYS
from ldm_scene.testing import foreground_banks

STEPS = 4


@pytest.fixture(scope="module")
def banks(tiny_model):
    """A random foreground probe and random class means for every (site, step) of the tiny model."""
    return foreground_banks(tiny_model, STEPS)


@pytest.fixture(scope="module")
def config():
    return GenerationConfig("a red cube", seed=5, steps=STEPS)


def _final(states):
    return np.asarray([s.image for s in states][-1])


def _target(model) -> np.ndarray:
    h, w = model.image_size
    m = np.zeros((h, w), bool)
    m[h // 4 : h // 2, w // 2 :] = True
    return m


def _source(model) -> np.ndarray:
    """Where the object is now (what latent-move carries to the target)."""
    h, w = model.image_size
    m = np.zeros((h, w), bool)
    m[h // 2 : 3 * h // 4, : w // 4] = True
    return m


# -- masks ---------------------------------------------------------------------------------------

def test_prepare_target_resizes_any_size_and_keeps_place():
    big = np.zeros((300, 300), np.uint8)
    big[:150, 150:] = 255  # top-right quarter
    m = prepare_target(big, (32, 32))
    assert m.shape == (32, 32) and m.dtype == bool
    assert m[:16, 16:].all() and not m[16:, :].any() and not m[:, :16].any()


def test_prepare_target_accepts_rgba_stroke_and_pil():
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[10:30, 40:60, 3] = 255  # drawn on a transparent layer: the colour channels stay black
    m = prepare_target(rgba, (32, 32))
    assert m[5:15, 20:30].all() and m.sum() == 10 * 10
    pil = Image.fromarray((np.eye(32) * 255).astype(np.uint8))
    assert prepare_target(pil, (32, 32)).sum() == 32


@pytest.mark.parametrize(
    "mask, message",
    [
        (np.zeros((40, 40)), "empty"),
        (np.ones((40, 40)), "whole image"),
        (np.zeros((0, 4)), "not an image"),
        (np.zeros((2, 3, 4, 5)), "2-D"),
        (np.array([["a", "b"], ["c", "d"]]), "dtype"),
        ("mask.png", "not an image"),
    ],
)
def test_prepare_target_refuses_bad_masks(mask, message):
    with pytest.raises(InterventionError, match=message):
        prepare_target(mask, (32, 32))


def test_translate_mask_moves_and_refuses_leaving_the_image():
    m = np.zeros((8, 8), bool)
    m[2:4, 1:3] = True
    moved = translate_mask(m, 3, -1)
    assert moved.sum() == m.sum() and moved[1:3, 4:6].all()
    assert translate_mask(m, -1, 0)[2:4, 0:2].all()
    with pytest.raises(InterventionError, match="out of the image"):
        translate_mask(m, 20, 0)


# -- edits ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_zero_strength_reproduces_the_unedited_image_exactly(tiny_model, banks, config, method):
    plain = _final(sample(tiny_model, config))
    edited = _final(intervene(tiny_model, config, _target(tiny_model), method, banks, strength=0.0, previews=False,
                              source=_source(tiny_model)))
    assert np.array_equal(plain, edited)


@pytest.mark.parametrize("method", METHODS)
def test_full_strength_changes_the_image_and_leaves_no_hooks(tiny_model, banks, config, method):
    """The counterpart of the no-op: at the default dose every method changes the result."""
    plain = _final(sample(tiny_model, config))
    edited = _final(intervene(tiny_model, config, _target(tiny_model), method, banks, previews=False,
                              source=_source(tiny_model)))
    assert not np.array_equal(plain, edited)
    assert attached_hooks(tiny_model.unet) == 0


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("readout-guidance", "random-guidance",
                                                                    "latent-move", "random-move")])
def test_edit_changes_only_chosen_sites_and_steps(tiny_model, banks, config, method):
    """Before the edited step everything matches; at it, sites upstream of the edit match too."""
    site, step = "up_blocks.2.attentions.1", 2
    editor = make_editor(method, banks, _target(tiny_model), sites=[site], steps=[step])

    def run(editors):
        with capture(tiny_model.unet) as cap:
            final = _final(sample(tiny_model, config, editors=editors))
        return cap.values, final

    plain, plain_img = run([])
    edited, edited_img = run([editor])
    assert editor.edited == [(site, step)]
    order = SITE_KEYS.index(site)
    for (s, t), act in plain.items():
        same = torch.equal(act, edited[(s, t)])
        if t < step or (t == step and SITE_KEYS.index(s) < order):
            assert same, f"{s} at step {t} changed but lies before the edit"
    # The capture hook runs before the edit on the same module, so look one site downstream.
    downstream = SITE_KEYS[order + 1]
    assert not torch.equal(plain[(downstream, step)], edited[(downstream, step)])
    assert not np.array_equal(plain_img, edited_img)


def test_probe_gradient_makes_the_probe_report_the_target(tiny_model, banks):
    """Adam on the activation drives the probe's argmax towards the target mask.

    Adam moves each coordinate by about lr per iteration, so the paper's 128 x 5e-3 budget moves a
    unit-scale activation only partly; given 2000 iterations it must agree almost everywhere.
    """
    site, step = "up_blocks.3.attentions.0", 0
    probe = banks["foreground"]
    target = _target(tiny_model)
    act = torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(1))
    goal = torch.from_numpy(prepare_target(target, (8, 8)).flatten())

    def agreement(x):
        return (probe.logits(site, step, x).argmax(1).flatten() == goal).float().mean().item()

    editor = make_editor("probe-gradient", banks, target, sites=[site], steps=[step])
    default = agreement(editor.edit(site, step, act))
    editor.iterations = 2000
    long = agreement(editor.edit(site, step, act))
    before = agreement(act)
    assert default > before + 0.2
    assert long > 0.98
    # The editor records the same agreement (its objective) for each edit it made.
    assert [(a[0], a[1]) for a in editor.agreement] == [(site, step)] * 2
    assert editor.agreement[0][2] == pytest.approx(before) and editor.agreement[0][3] == pytest.approx(default)
    assert editor.agreement[1][3] == pytest.approx(long)


def test_steer_moves_tokens_to_the_class_means(tiny_model, banks):
    """At gain 1, a background token inside the target becomes exactly a foreground-mean token;
    the default dose pushes it ``gain`` times as far along the same direction."""
    site, step = "up_blocks.3.attentions.0", 1
    means = banks["foreground_means"].weights[(site, step)]
    target = np.zeros(tiny_model.image_size, bool)
    target[:4, :4] = True  # exactly token (0, 0) of the 8x8 grid
    gain = METHOD_DEFAULTS["steer"].gain
    editor = make_editor("steer", banks, target, sites=[site], steps=[step], strength=1 / gain)
    act = means[0].expand(1, 64, -1).clone()  # every token at the background mean
    out = editor.edit(site, step, act)
    assert torch.allclose(out[0, 0], means[1], atol=1e-5)
    assert torch.allclose(out[0, 1:], act[0, 1:], atol=1e-6)
    full = make_editor("steer", banks, target, sites=[site], steps=[step]).edit(site, step, act)
    assert torch.allclose(full[0, 0] - act[0, 0], gain * (means[1] - means[0]), atol=1e-4)
    assert torch.allclose(full[0, 1:], act[0, 1:], atol=1e-6)


def test_method_defaults_choose_sites_and_steps(tiny_model, banks):
    """probe-gradient keeps the paper's 9 up-block sites and first third; steer and its random control
    edit the same 9 sites through the first two-thirds; an explicit choice overrides either."""
    target = _target(tiny_model)
    assert METHODS[0] == "latent-move"  # the default wherever a caller does not choose (best in the evaluation)
    assert make_editor("probe-gradient", banks, target).sites == UP_SITE_KEYS
    assert make_editor("probe-gradient", banks, target).iterations == 128
    assert make_editor("steer", banks, target).sites == UP_SITE_KEYS
    assert make_editor("steer", banks, target, sites=SITE_KEYS).sites == tuple(SITE_KEYS)
    assert make_editor("steer", banks, target, sites=["mid_block.attentions.0"]).sites == ("mid_block.attentions.0",)
    assert default_edit_steps(15, "probe-gradient") == (0, 1, 2, 3, 4)
    assert default_edit_steps(15, "steer") == default_edit_steps(15, "random-control") == tuple(range(10))
    assert default_edit_steps(2, "probe-gradient") == (0,)  # never empty
    steer = make_editor("steer", banks, target, steps=default_edit_steps(15, "steer"))
    control = make_editor("random-control", banks, target, steps=default_edit_steps(15, "random-control"))
    assert isinstance(steer, SteerEditor) and isinstance(control, SteerEditor)
    assert (steer.sites, steer.steps, steer.strength, steer.outside, steer.random_seed) == (
        UP_SITE_KEYS, tuple(range(10)), METHOD_DEFAULTS["steer"].gain, METHOD_DEFAULTS["steer"].outside, None)
    assert (control.sites, control.steps, control.strength, control.outside) == (
        steer.sites, steer.steps, steer.strength, steer.outside) and control.random_seed is not None
    # without class means only the methods that read the foreground probe alone are offered
    assert available_methods(banks) == METHODS
    assert available_methods({"foreground": banks["foreground"]}) == (
        "latent-move", "readout-guidance", "probe-gradient", "random-move", "random-guidance")
    assert available_methods({})[:1] == ("latent-move",)  # a move reads no probe (the object's mask comes with it)
    for method in ("steer", "random-control"):
        with pytest.raises(InterventionError, match="needs the foreground_means probes"):
            make_editor(method, {"foreground": banks["foreground"]}, target)


def test_random_control_has_the_same_norms_and_another_direction(tiny_model, banks):
    """The control is steer's edit with each (site, step)'s direction drawn at random: every token moves
    exactly as far as under steer, in another direction, and the directions differ between steps."""
    site = "up_blocks.3.attentions.0"
    target = _target(tiny_model)
    method = make_editor("steer", banks, target, sites=[site], steps=[0, 1])
    control = make_editor("random-control", banks, target, sites=[site], steps=[0, 1])
    act = torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(2))
    moves = []
    for step in (0, 1):
        d_method = method.edit(site, step, act) - act
        d_ctrl = control.edit(site, step, act) - act
        assert d_method.abs().max() > 0
        assert torch.allclose(d_method.norm(dim=-1), d_ctrl.norm(dim=-1), rtol=1e-4, atol=1e-6)
        cos = torch.nn.functional.cosine_similarity(d_method.flatten(), d_ctrl.flatten(), dim=0)
        assert abs(cos) < 0.9
        token = d_ctrl[0].norm(dim=-1).argmax()
        moves.append(d_ctrl[0, token] / d_ctrl[0, token].norm())
    assert abs(float(moves[0] @ moves[1])) < 0.9
    # the same seed draws the same directions: the control is reproducible
    again = make_editor("random-control", banks, target, sites=[site], steps=[0, 1])
    assert torch.equal(again.edit(site, 1, act), control.edit(site, 1, act))


def test_bad_requests_are_refused_without_leaving_hooks(tiny_model, banks, config):
    target = _target(tiny_model)
    with pytest.raises(InterventionError, match="unknown method"):
        intervene(tiny_model, config, target, "teleport", banks)
    with pytest.raises(InterventionError, match="outside the run"):
        intervene(tiny_model, config, target, "steer", banks, steps=[0, 9])
    with pytest.raises(InterventionError, match="use prepare_target"):
        intervene(tiny_model, config, np.ones((5, 5), bool), "steer", banks)
    with pytest.raises(InterventionError, match="lacks"):
        intervene(tiny_model, config, target, "steer", {"foreground": banks["foreground"]})
    with pytest.raises(InterventionError, match="strength"):
        intervene(tiny_model, config, target, "steer", banks, strength=float("nan"))
    with pytest.raises(InterventionError, match="strength must be between 0 and 4"):
        intervene(tiny_model, config, target, "steer", banks, strength=5)
    assert attached_hooks(tiny_model.unet) == 0


def test_error_inside_an_edit_and_cancel_leave_no_hooks(tiny_model, banks, config):
    class Broken:
        sites, steps = UP_SITE_KEYS, None

        def edit(self, site, step, act):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        list(sample(tiny_model, config, editors=[Broken()]))
    assert attached_hooks(tiny_model.unet) == 0
    stream = intervene(tiny_model, config, _target(tiny_model), "probe-gradient", banks)
    next(stream)
    assert attached_hooks(tiny_model.unet) > 0
    stream.close()
    assert attached_hooks(tiny_model.unet) == 0


class _Recorder:
    """A reader that keeps what each site's activation was when it read it (its sum), per step."""

    name = "recorder"

    def __init__(self, sites):
        self.sites, self.steps, self.seen = tuple(sites), None, {}

    def read(self, site, step, act):
        self.seen[(site, step)] = act.detach().clone()

    def collect(self, step):
        return sorted(s for (s, t) in self.seen if t == step)


@pytest.mark.parametrize("method", ["steer", "readout-guidance"])
def test_intervene_takes_readers_that_see_the_unedited_activation(tiny_model, banks, config, method):
    """Readers go through intervene() as through sample(): they read every step, before the edit,
    and their hooks leave with the stream's."""
    site = UP_SITE_KEYS[0]
    reader = _Recorder([site])
    states = list(intervene(tiny_model, config, _target(tiny_model), method, banks, readers=[reader], previews=False))
    assert [s.readouts["recorder"] for s in states] == [[site]] * STEPS
    assert attached_hooks(tiny_model.unet) == 0
    plain = _Recorder([site])
    list(sample(tiny_model, config, readers=[plain], decode_final=False))
    # step 0 starts from the same noise: the reader saw the UNet's own activation, not the edited one
    torch.testing.assert_close(reader.seen[(site, 0)], plain.seen[(site, 0)])
    # later steps start from an edited latent, so they differ
    assert not torch.allclose(reader.seen[(site, STEPS - 1)], plain.seen[(site, STEPS - 1)])
    if method == "steer":
        editor = make_editor(method, banks, _target(tiny_model), steps=[0])
        assert not torch.allclose(editor.edit(site, 0, plain.seen[(site, 0)]), plain.seen[(site, 0)])



# -- keeping the background ---------------------------------------------------------------------

def test_free_cells_cover_every_touched_cell_and_grow_by_the_margin():
    from ldm_scene.intervention_methods import free_cells

    free = np.zeros((64, 64), bool)
    free[0, 0] = True  # one pixel: the cell it lies in
    assert free_cells(free, (16, 16), 0)[0, 0].nonzero().tolist() == [[0, 0]]
    grown = free_cells(free, (16, 16), 1)[0, 0]
    assert grown.sum() == 4 and grown[:2, :2].all()  # clipped at the border
    free[30, 30] = True
    assert free_cells(free, (16, 16), 1)[0, 0][6:9, 6:9].all()


def test_keep_background_blends_with_the_reference_outside_the_free_cells():
    from ldm_scene.intervention_methods import KeepBackground

    free = np.zeros((32, 32), bool)
    free[:8, :8] = True  # the top-left quarter of an 8x8 latent: cells [0:2, 0:2]
    ref = [torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8)]
    keep = KeepBackground(ref, free, margin=0)
    latent = torch.full((1, 4, 8, 8), 5.0)
    out = keep(1, latent)
    assert (out[..., :2, :2] == 5).all()
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[:2, :2] = False
    assert (out[..., outside] == 1).all()
    with pytest.raises(ValueError, match="step 3"):
        keep(2, latent)
    with pytest.raises(ValueError, match="unedited latent"):
        keep(0, torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="free to change"):
        KeepBackground(ref, np.zeros((32, 32), bool))


def test_guided_run_keeps_the_unedited_latents_outside_the_edit(tiny_model, banks, config):
    """The edited run's latent equals the unedited run's at every step outside the free cells (the
    object's mask and the target, grown by the margin), and differs inside."""
    from ldm_scene.intervention_methods import KeepBackground, free_cells, guided_sample

    reference = [s.latent.clone() for s in sample(tiny_model, config, decode_final=False)]
    target = _target(tiny_model)
    h, w = tiny_model.image_size
    source = np.zeros((h, w), bool)
    source[h // 2:, : w // 4] = True
    keep = KeepBackground(reference, source | target, margin=1)
    editor = make_editor("readout-guidance", banks, target, steps=[0, 1], strength=4.0)
    states = list(guided_sample(tiny_model, config, [editor], keep=keep))
    cells = free_cells(source | target, tuple(reference[0].shape[-2:]), 1)[0, 0].bool()
    assert 0 < cells.sum() < cells.numel()
    for state, ref in zip(states, reference):
        assert torch.equal(state.latent[..., ~cells], ref[..., ~cells])
    assert not torch.allclose(states[-1].latent[..., cells], reference[-1][..., cells])
    assert attached_hooks(tiny_model.unet) == 0
