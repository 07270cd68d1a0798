"""The fused readout: one matmul per site over all tasks' probes, equal to the one-probe path.

Unit tier on the tiny random model from ``ldm_scene.testing``: every task's map from
:class:`StackedProbes` and from :class:`ProbeReader` during sampling is compared with
:meth:`ProbeBank.readout` (the per-probe path the paper's code takes) to 1e-5.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from ldm_scene.capture import capture
from ldm_scene.probes import TASKS, ProbeBank, ProbeError, ProbeMeta
from ldm_scene.readout import ProbeReader, StackedProbes, to_numpy
from ldm_scene.sampler import GenerationConfig, sample
from ldm_scene.sites import SITE_KEYS

STEPS = 3
PROMPT = "a photo of a red cat"
#: Depth and shading with a target normalisation, so undoing it is part of what is compared.
NORM = {"foreground": (0.0, 1.0), "depth": (12.0, 6.0), "shading": (0.6, 0.2)}


def _banks(model, steps: int = STEPS, seed: int = 0, biases: bool = True) -> dict[str, ProbeBank]:
    sites = {s.key: (s.channels, s.height, s.width) for s in model.sites()}
    gen = torch.Generator().manual_seed(seed)
    banks = {}
    for task in TASKS:
        k = 2 if task == "foreground" else 1
        meta = ProbeMeta(task, model.model_id, model.image_size, model.scheduler_name, steps, sites, *NORM[task])
        weights = {(s, t): torch.randn(k, c, generator=gen) for s, (c, _, _) in sites.items() for t in range(steps)}
        bias = {key: torch.randn(k, generator=gen) for key in weights} if biases else None
        banks[task] = ProbeBank(meta, weights, bias)
    return banks


@pytest.fixture(scope="module")
def banks(tiny_model):
    return _banks(tiny_model)


@pytest.fixture(scope="module")
def activations(tiny_model):
    """The conditional half of every site at every step of a guided run: ``{(site, step): [1, T, C]}``."""
    config = GenerationConfig(PROMPT, seed=4, steps=STEPS)
    with capture(tiny_model.unet, SITE_KEYS) as cap:
        for _ in sample(tiny_model, config, decode_final=False):
            pass
    return cap.values


def _per_probe(banks, site, step, act, size):
    return {task: bank.readout(site, step, act, size) for task, bank in banks.items() if (site, step) in bank}


@pytest.mark.parametrize("upsample", [False, True])
def test_stacked_probes_equal_the_per_probe_readout_at_every_site_and_step(tiny_model, banks, activations, upsample):
    probes = StackedProbes(banks)
    for (site, step), act in activations.items():
        grid = tiny_model.site(site)
        size = tiny_model.image_size if upsample else (grid.height, grid.width)
        fused = to_numpy(probes.apply(site, step, act, out_size=size if upsample else None))
        want = _per_probe(banks, site, step, act, size)
        assert set(fused) == set(TASKS) == set(want)
        for task in TASKS:
            assert fused[task].shape == want[task].shape == (1, *size) and fused[task].dtype == np.float32
            np.testing.assert_allclose(fused[task], want[task], rtol=1e-5, atol=1e-5, err_msg=f"{task} {site} {step}")


def test_a_batch_of_activations_without_biases_and_in_half_precision(tiny_model):
    banks = _banks(tiny_model, seed=1, biases=False)
    site = tiny_model.sites()[2]
    act = torch.randn(3, site.tokens, site.channels, generator=torch.Generator().manual_seed(0)) * 3
    for x in (act, act.half()):
        fused = to_numpy(StackedProbes(banks).apply(site.key, 1, x))
        for task, want in _per_probe(banks, site.key, 1, x, (site.height, site.width)).items():
            assert fused[task].shape == (3, site.height, site.width)
            np.testing.assert_allclose(fused[task], want, rtol=1e-5, atol=1e-5)


_MATMULS = {torch.nn.functional.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm,
            torch.Tensor.matmul, torch.Tensor.__matmul__, torch.einsum}


class _CountMatmuls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func in _MATMULS
        return func(*args, **(kwargs or {}))


def test_one_matmul_per_site_for_all_tasks(tiny_model, banks, activations):
    probes = StackedProbes(banks)
    site = tiny_model.sites()[0].key
    probes.apply(site, 0, activations[(site, 0)])  # builds and caches the stacked weights
    with _CountMatmuls() as mode:
        maps = probes.apply(site, 0, activations[(site, 0)])
    assert mode.calls == 1 and set(maps) == set(TASKS)


def test_reader_during_sampling_equals_the_per_probe_readout(tiny_model, banks, activations):
    sites = tiny_model.sites()
    # One task on one site throughout, one on a site per step (step 1 unread), two on a shared site.
    choices = {"foreground": sites[13].key, "depth": {0: sites[6].key, 2: sites[13].key}, "shading": sites[3].key}
    reader = ProbeReader(banks, choices)
    config = GenerationConfig(PROMPT, seed=4, steps=STEPS)
    states = list(sample(tiny_model, config, readers=[reader], decode_final=False))
    for state in states:
        got = state.readouts["probes"]
        expected = {"foreground": sites[13].key, "shading": sites[3].key}
        if state.step in choices["depth"]:
            expected["depth"] = choices["depth"][state.step]
        assert set(got) == set(expected)
        for task, site in expected.items():
            grid = tiny_model.site(site)
            want = banks[task].readout(site, state.step, activations[(site, state.step)][:1], (grid.height, grid.width))[0]
            assert got[task].shape == (grid.height, grid.width) and got[task].flags.c_contiguous
            np.testing.assert_allclose(got[task], want, rtol=1e-5, atol=1e-5)


def test_reader_out_size_upsamples_every_map(tiny_model, banks, activations):
    site = tiny_model.sites()[6].key
    reader = ProbeReader(banks, {t: site for t in TASKS}, out_size=tiny_model.image_size)
    reader.read(site, 1, activations[(site, 1)])
    got = reader.collect(1)
    assert reader.collect(2) == {}  # nothing carried over to the next step
    for task in TASKS:
        want = banks[task].readout(site, 1, activations[(site, 1)], tiny_model.image_size)[0]
        np.testing.assert_allclose(got[task], want, rtol=1e-5, atol=1e-5)


def test_banks_on_different_grids_at_one_site_are_read_apart(tiny_model):
    # Same channels and token count, another grid shape: each bank is reshaped to its own grid.
    banks = _banks(tiny_model, steps=1)
    site = tiny_model.sites()[0]
    c, h, w = site.channels, site.height, site.width
    meta = banks["depth"].meta
    sites = dict(meta.sites)
    sites[site.key] = (c, h * 2, w // 2)
    odd = ProbeMeta("depth", meta.model_id, meta.image_size, meta.scheduler, 1, sites, *NORM["depth"])
    banks["depth"] = ProbeBank(odd, banks["depth"].weights, banks["depth"].biases)
    act = torch.randn(1, h * w, c)
    fused = to_numpy(StackedProbes(banks).apply(site.key, 0, act))
    assert fused["depth"].shape == (1, h * 2, w // 2) and fused["foreground"].shape == (1, h, w)
    np.testing.assert_allclose(fused["depth"], banks["depth"].readout(site.key, 0, act, (h * 2, w // 2)), atol=1e-5)
    np.testing.assert_allclose(fused["shading"], banks["shading"].readout(site.key, 0, act, (h, w)), atol=1e-5)


def test_bad_activations_and_missing_probes_are_refused(tiny_model, banks):
    probes = StackedProbes(banks)
    site = tiny_model.sites()[0]
    c, t = site.channels, site.tokens
    with pytest.raises(ProbeError, match=rf"expects {c} channels, the activation has {c + 1}"):
        probes.apply(site.key, 0, torch.zeros(1, t, c + 1))
    with pytest.raises(ProbeError, match=r"grid .* the activation has 3 tokens"):
        probes.apply(site.key, 0, torch.zeros(1, 3, c))
    with pytest.raises(ProbeError, match=r"must be \[B, T, C\]"):
        probes.apply(site.key, 0, torch.zeros(t, c))
    with pytest.raises(ProbeError, match="no depth probe for .* at step 7"):
        probes.apply(site.key, 7, torch.zeros(1, t, c), tasks=["depth"])
    assert probes.apply(site.key, 7, torch.zeros(1, t, c)) == {}  # no task has a probe there
    with pytest.raises(ProbeError, match="no probe bank for task 'normals'"):
        probes.apply(site.key, 0, torch.zeros(1, t, c), tasks=["normals"])


def test_to_numpy_keeps_keys_shapes_and_float32():
    maps = {"a": torch.arange(6.0).reshape(2, 3).t(), ("b", 1): torch.ones(2, 2, dtype=torch.float16)}
    out = to_numpy(maps)
    assert list(out) == ["a", ("b", 1)] and to_numpy({}) == {}
    np.testing.assert_array_equal(out["a"], np.arange(6.0).reshape(2, 3).T)
    assert out["a"].flags.c_contiguous and out[("b", 1)].dtype == np.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_to_numpy_fetches_maps_from_a_gpu_in_one_piece():
    maps = {"a": torch.arange(6.0, device="cuda").reshape(2, 3), "b": torch.full((4,), 2.0, device="cuda")}
    out = to_numpy(maps)
    np.testing.assert_array_equal(out["a"], np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(out["b"], np.full(4, 2.0, np.float32))
