"""Intervention: mask handling, edits confined to chosen sites/steps, exact no-op, hook cleanup."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_scene.capture import attached_hooks, capture
from ldm_scene.intervention import (
    METHOD_DEFAULTS, METHODS, ComposedEditor, InterventionError, PositionEditor, available_methods, class_means_bank,
    default_edit_steps, fit_position_means, intervene, make_editor, position_bin, prepare_target, translate_mask,
)
from ldm_scene.probes import POSITION, POSITION_MEANS, ProbeBank, ProbeMeta, load_probe_dir
from ldm_scene.sampler import GenerationConfig, sample
from ldm_scene.sites import SITE_KEYS, UP_SITE_KEYS

STEPS = 4


@pytest.fixture(scope="module")
def banks(tiny_model):
    """A random foreground probe, random class means and random position means for every (site, step)
    of the tiny model."""
    sites = {s.key: (s.channels, s.height, s.width) for s in tiny_model.sites()}
    meta = ProbeMeta("foreground", tiny_model.model_id, tiny_model.image_size, "LMSDiscreteScheduler", STEPS, sites)
    gen = torch.Generator().manual_seed(0)
    weights = {(s, t): torch.randn(2, c, generator=gen) for s, (c, _, _) in sites.items() for t in range(STEPS)}
    probe = ProbeBank(meta, weights)
    sums = {k: torch.randn(2, w.shape[1], generator=gen) for k, w in weights.items()}
    counts = {k: torch.tensor([3.0, 1.0]) for k in weights}
    position = ProbeBank(ProbeMeta(POSITION, tiny_model.model_id, tiny_model.image_size, "LMSDiscreteScheduler", STEPS,
                                   sites), {k: torch.randn(3, w.shape[1], generator=gen) for k, w in weights.items()})
    return {"foreground": probe, "foreground_means": class_means_bank(sums, counts, probe), POSITION_MEANS: position}


@pytest.fixture(scope="module")
def config():
    return GenerationConfig("a red cube on the left", seed=5, steps=STEPS)


def _final(states):
    return np.asarray([s.image for s in states][-1])


def _target(model) -> np.ndarray:
    h, w = model.image_size
    m = np.zeros((h, w), bool)
    m[h // 4 : h // 2, w // 2 :] = True
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
    edited = _final(intervene(tiny_model, config, _target(tiny_model), method, banks, strength=0.0, previews=False))
    assert np.array_equal(plain, edited)


@pytest.mark.parametrize("method", ["steer", "probe-gradient", "position-steer"])
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
    if method == "position-steer":  # the cross-attention and the self-attention of the one block
        assert sorted(editor.edited) == [("attn1", site, step), ("attn2", site, step)]
    else:
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


def test_position_edit_swaps_the_position_component_for_the_targets(tiny_model, banks):
    """At strength 1 the token-mean's component in the plane of the three thirds' means becomes the
    target third's; what lies outside that plane, and each token's offset from the mean, stay."""
    site, step = "up_blocks.3.attentions.0", 1
    m = banks[POSITION_MEANS].weights[(site, step)].double()
    centre = m.mean(0)
    target = np.zeros(tiny_model.image_size, bool)
    target[:, -4:] = True  # the right third
    editor = PositionEditor(banks[POSITION_MEANS], target, [site], [step])
    assert editor.bin == 2
    gen = torch.Generator().manual_seed(3)
    offsets = torch.randn(1, 64, m.shape[1], generator=gen, dtype=torch.float64)
    offsets -= offsets.mean(1, keepdim=True)
    # A token mean at the left third's mean plus a part orthogonal to the plane.
    basis = torch.linalg.qr((m[:2] - centre).T).Q.T  # orthonormal rows spanning the plane
    other = torch.randn(m.shape[1], generator=gen, dtype=torch.float64)
    other -= basis.T @ (basis @ other)
    act = m[0] + other + offsets
    out = editor.edit(site, step, act.float()).double()
    assert torch.allclose(out.mean(1)[0], m[2] + other, atol=1e-4)
    assert torch.allclose(out - out.mean(1, keepdim=True), offsets, atol=1e-4)
    assert editor.edited == [(site, step)]
    # half strength goes half way; a target in the third the activation is already in changes nothing
    half = PositionEditor(banks[POSITION_MEANS], target, [site], [step], strength=0.5).edit(site, step, act.float())
    assert torch.allclose(half.double().mean(1)[0], (m[0] + m[2]) / 2 + other, atol=1e-4)
    left = np.zeros_like(target)
    left[:, :4] = True
    same = PositionEditor(banks[POSITION_MEANS], left, [site], [step]).edit(site, step, act.float())
    assert torch.allclose(same.double(), act, atol=1e-4)


def test_position_edit_is_hooked_on_the_cross_attention_only(tiny_model, banks, config):
    """While the run streams, the position part's hook sits on the site's attn2 and nothing on its attn1;
    afterwards no hook is left."""
    from ldm_scene.sites import module_path

    site = "mid_block.attentions.0"
    editor = ComposedEditor((PositionEditor(banks[POSITION_MEANS], _target(tiny_model), [site], [0, 1]),))
    stream = sample(tiny_model, config, editors=[editor])
    next(stream)
    assert len(tiny_model.unet.get_submodule(module_path(site, "attn2"))._forward_hooks) == 1
    assert len(tiny_model.unet.get_submodule(module_path(site, "attn1"))._forward_hooks) == 0
    stream.close()
    assert editor.edited == [("attn2", site, 0)] and attached_hooks(tiny_model.unet) == 0


def test_position_bin_is_the_third_of_the_centroid():
    m = np.zeros((30, 30), bool)
    m[5:9, 0:4] = True
    assert position_bin(m) == 0
    m[:, 25:] = True  # the centroid moves right of the middle third's start
    assert position_bin(m) == 2
    c = np.zeros((30, 30), bool)
    c[10:20, 12:18] = True
    assert position_bin(c) == 1
    with pytest.raises(InterventionError, match="empty"):
        position_bin(np.zeros((30, 30), bool))
    # measured at pixel centres: columns 9..10 of 30 centre on 10.5 / 30 of the width, the middle third
    edge = np.zeros((30, 30), bool)
    edge[:, 9:11] = True
    assert position_bin(edge) == 1
    from ldm_scene.toy.quality import mask_position

    assert mask_position(edge) == "middle" and mask_position(m) == "right"  # the toy report's rule is the same


def test_fit_position_means_averages_cross_attention_by_third(tiny_model, tmp_path):
    """Each third's mean is the average of its runs' token-mean cross-attention outputs (checked
    against a separate capture); runs without an object are left out; too few per third is refused."""
    h, w = tiny_model.image_size
    thirds = {11: 0, 12: 1, 13: 2, 14: 2, 15: None}

    def where(seed):
        m = np.zeros((h, w), bool)
        if thirds[seed] is not None:
            c = thirds[seed] * w // 3 + w // 6
            m[h // 2 :, c : c + 2] = True
        return m

    configs = [GenerationConfig("a red cube on the left", seed=s, steps=STEPS) for s in thirds]
    bank = fit_position_means(tiny_model, configs, lambda image, config: where(config.seed), min_per_third=1, progress=False)
    assert bank.meta.task == POSITION and bank.meta.training["images_per_third"] == [1, 1, 2]
    assert len(bank) == len(tiny_model.sites()) * STEPS and attached_hooks(tiny_model.unet) == 0
    site, step = "mid_block.attentions.0", 1
    means = []
    for seed in (11, 13, 14):
        with capture(tiny_model.unet, [site], [step], layer="attn2") as cap:
            list(sample(tiny_model, GenerationConfig("a red cube on the left", seed=seed, steps=STEPS)))
        means.append(cap.values[(site, step)].double().mean(1)[0])
    got = bank.weights[(site, step)].double()
    assert torch.allclose(got[0], means[0], atol=1e-5) and torch.allclose(got[2], (means[1] + means[2]) / 2, atol=1e-5)
    # the file round-trips through the probe folder loader under its own name and task
    bank.save(tmp_path / f"{POSITION_MEANS}.safetensors")
    loaded = load_probe_dir(tmp_path, expect_sites=tiny_model.sites(), tasks=(POSITION_MEANS,))[POSITION_MEANS]
    assert torch.equal(loaded.weights[(site, step)], bank.weights[(site, step)])
    with pytest.raises(InterventionError, match="at least 2 images .* 1 left, 1 middle, 2 right"):
        fit_position_means(tiny_model, configs, lambda image, config: where(config.seed), min_per_third=2, progress=False)
    assert attached_hooks(tiny_model.unet) == 0


def test_method_defaults_choose_sites_and_steps(tiny_model, banks):
    """probe-gradient keeps the paper's 9 up-block sites and first third; steer edits the same 9 sites
    through the first two-thirds; position-steer and its control also edit all 16 cross-attention
    sites, every step; an explicit choice overrides either."""
    target = _target(tiny_model)
    assert make_editor("probe-gradient", banks, target).sites == UP_SITE_KEYS
    assert make_editor("probe-gradient", banks, target).iterations == 128
    assert make_editor("steer", banks, target).sites == UP_SITE_KEYS
    assert make_editor("random-control", banks, target).parts[1].sites == UP_SITE_KEYS
    assert make_editor("random-control", banks, target).parts[0].sites == tuple(SITE_KEYS)
    assert make_editor("steer", banks, target, sites=SITE_KEYS).sites == tuple(SITE_KEYS)
    assert make_editor("steer", banks, target, sites=["mid_block.attentions.0"]).sites == ("mid_block.attentions.0",)
    assert default_edit_steps(15, "probe-gradient") == (0, 1, 2, 3, 4)
    assert default_edit_steps(15, "steer") == tuple(range(10))
    assert default_edit_steps(2, "probe-gradient") == (0,)  # never empty
    # position-steer: every step, all 16 cross-attention sites and the 9 up-block self-attention sites
    both = make_editor("position-steer", banks, target, steps=default_edit_steps(15, "position-steer"))
    assert isinstance(both, ComposedEditor) and default_edit_steps(15, "position-steer") == tuple(range(15))
    cross, steer = both.parts
    assert (cross.layer, cross.sites, cross.strength) == ("attn2", tuple(SITE_KEYS), 1.0)
    assert steer.sites == UP_SITE_KEYS and steer.strength == METHOD_DEFAULTS["position-steer"].gain
    # without position means, only the methods that do not need them are offered
    assert available_methods(banks) == METHODS
    assert available_methods({k: v for k, v in banks.items() if k != POSITION_MEANS}) == ("steer", "probe-gradient")
    with pytest.raises(InterventionError, match="needs the position_means probes"):
        make_editor("position-steer", {k: v for k, v in banks.items() if k != POSITION_MEANS}, target)


def test_random_control_has_the_same_norm_and_another_direction(tiny_model, banks):
    """Both parts of the control mirror position-steer's: the same sites, steps and norms, random directions."""
    site, step = "up_blocks.3.attentions.0", 1
    target = _target(tiny_model)
    method = make_editor("position-steer", banks, target, sites=[site], steps=[step])
    control = make_editor("random-control", banks, target, sites=[site], steps=[step])
    act = torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(2))
    for part, ctrl in zip(method.parts, control.parts):
        assert (part.layer if hasattr(part, "layer") else "attn1") == (ctrl.layer if hasattr(ctrl, "layer") else "attn1")
        d_method = part.edit(site, step, act) - act
        d_ctrl = ctrl.edit(site, step, act) - act
        if isinstance(part, PositionEditor):  # one vector added to every token: exactly the same norm
            assert torch.allclose(d_method.norm(), d_ctrl.norm(), rtol=1e-4)
        else:  # same per-token scale along another direction
            assert torch.allclose(d_method.norm(), d_ctrl.norm(), rtol=0.3)
        cos = torch.nn.functional.cosine_similarity(d_method.flatten(), d_ctrl.flatten(), dim=0)
        assert abs(cos) < 0.9


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
