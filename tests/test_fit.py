"""Ridge probes from streamed statistics, penalty selection, and the paper's Adam trainer."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from safetensors.torch import load_file, save_file

from ldm_scene.training.adam import train_adam
from ldm_scene.training.fit import (
    RidgeStats,
    choose_penalty,
    pack_stats,
    ridge_targets,
    to_normalised,
    unpack_stats,
)


def _chunks(x, y, sizes):
    start = 0
    for size in sizes:
        yield x[start : start + size], y[start : start + size]
        start += size
    assert start == len(x)


def _data(n=300, c=6, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g) * torch.linspace(0.5, 3, c) + 1.5  # uneven scales, offset
    w = torch.randn(k, c, generator=g)
    y = x @ w.T + 0.3 * torch.randn(n, k, generator=g) - 2.0
    return x, y


@pytest.mark.parametrize("penalty", [0.0, 0.1])
def test_streamed_ridge_equals_lstsq(penalty):
    x, y = _data()
    stats = RidgeStats(6, 2)
    for xc, yc in _chunks(x, y, [1, 50, 99, 150]):
        stats.update(xc, yc)
    w, b = stats.solve(penalty, dtype=torch.float64)

    # Reference: the same ridge problem written as one least-squares system on the concatenated
    # data, rows [x, 1] plus sqrt(lam) * I rows that penalise w and leave the intercept free.
    xn, yn = x.double().numpy(), y.double().numpy()
    lam = penalty * ((xn - xn.mean(0)) ** 2).sum() / xn.shape[1]
    design = np.vstack([
        np.hstack([xn, np.ones((len(xn), 1))]),
        np.hstack([np.sqrt(lam) * np.eye(6), np.zeros((6, 1))]),
    ])
    target = np.vstack([yn, np.zeros((6, 2))])
    theta = np.linalg.lstsq(design, target, rcond=None)[0]
    # Both are float64 solutions of the same well-conditioned problem (cond ~ 1e2): they differ
    # only by rounding, ~1e-14, so 1e-10 is tight yet safe. float32 inputs convert exactly.
    np.testing.assert_allclose(w.numpy(), theta[:6].T, rtol=0, atol=1e-10)
    np.testing.assert_allclose(b.numpy(), theta[6], rtol=0, atol=1e-10)
    w32, b32 = stats.solve(penalty)
    assert w32.dtype == torch.float32 and w32.shape == (2, 6) and b32.shape == (2,)


def test_merge_of_halves_equals_one_pass():
    x, y = _data(seed=1)
    whole, a, b = RidgeStats(6, 2), RidgeStats(6, 2), RidgeStats(6, 2)
    whole.update(x, y)
    a.update(x[:120], y[:120])
    b.update(x[120:], y[120:])
    a.merge(b)
    assert a.n == whole.n == 300
    for name in ("xtx", "xty", "yty"):
        torch.testing.assert_close(getattr(a, name), getattr(whole, name), rtol=1e-12, atol=1e-9)
    for got, want in zip(a.solve(0.01, torch.float64), whole.solve(0.01, torch.float64)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(RidgeStats(5, 2))


def test_mse_from_stats_equals_direct():
    x, y = _data(seed=2)
    stats = RidgeStats(6, 2)
    stats.update(x, y)
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(2, 6, generator=g), torch.randn(2, generator=g)
    direct = ((x.double() @ w.double().T + b.double() - y.double()) ** 2).mean().item()
    assert stats.mse(w, b) == pytest.approx(direct, rel=1e-10)
    assert stats.mse(w) == pytest.approx(((x.double() @ w.double().T - y.double()) ** 2).mean().item(), rel=1e-10)
    w_fit, b_fit = stats.solve(0.0)
    assert stats.mse(w_fit, b_fit) < stats.mse(w, b)
    assert stats.target_mean() == pytest.approx(y.double().mean(0))
    assert stats.target_std() == pytest.approx(y.double().std(0, unbiased=False))


def test_choose_penalty_large_for_noise_small_for_signal():
    g = torch.Generator().manual_seed(4)
    c = 32
    w_true = torch.randn(1, c, generator=g)

    def stats_for(n, informative):
        x = torch.randn(n, c, generator=g) * 3 + 1
        y = x @ w_true.T + 0.1 * torch.randn(n, 1, generator=g) if informative else torch.randn(n, 1, generator=g)
        s = RidgeStats(c, 1)
        s.update(x, y)
        return s

    best, w, b, scores = choose_penalty(stats_for(60, False), stats_for(400, False))
    assert best == 1.0 and set(scores) == {1e-4, 1e-3, 1e-2, 1e-1, 1.0}
    best, w, b, scores = choose_penalty(stats_for(400, True), stats_for(400, True))
    assert best <= 1e-3 and w.shape == (1, c) and scores[best] < 0.02
    best2, w2, _, _ = choose_penalty(stats_for(400, True), stats_for(400, True), refit=True)
    assert w2.shape == (1, c)


def test_state_dict_roundtrip_through_safetensors(tmp_path):
    x, y = _data(seed=5)
    s = RidgeStats(6, 2)
    s.update(x, y)
    path = tmp_path / "stats.safetensors"
    save_file(pack_stats({("up_blocks.1.attentions.0", 3): s}), str(path))
    back = unpack_stats(load_file(str(path)))
    r = back[("up_blocks.1.attentions.0", 3)]
    assert r.n == s.n and torch.equal(r.xtx, s.xtx) and torch.equal(r.xty, s.xty) and torch.equal(r.yty, s.yty)
    r2 = RidgeStats.from_state_dict(s.state_dict())
    assert torch.equal(r2.solve(0.1)[0], s.solve(0.1)[0])


def test_foreground_ridge_one_hot_and_normalisation():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2000, 8, generator=g)
    w_true = torch.randn(8, generator=g)
    label = (x @ w_true > 0.3).long()
    s = RidgeStats(8, 2)
    s.update(x, ridge_targets("foreground", label))
    w, b = s.solve(1e-3)
    assert w.shape == (2, 8)
    acc = ((x @ w.T + b).argmax(1) == label).float().mean()
    assert acc > 0.9  # least squares on one-hot targets: a linear classifier, not a perfect one

    depth = x @ w_true + 5.0
    s = RidgeStats(8, 1)
    s.update(x, ridge_targets("depth", depth))
    w, b = s.solve(0.0)
    wn, bn = to_normalised(w, b, mean=5.0, std=2.0)
    torch.testing.assert_close((x @ wn.T + bn)[:, 0] * 2.0 + 5.0, depth, rtol=0, atol=1e-4)


def test_update_validates_shapes():
    s = RidgeStats(4, 1)
    s.update(torch.randn(3, 4), torch.randn(3))  # [N] accepted for K = 1
    with pytest.raises(ValueError, match=r"x must be \[N, 4\]"):
        s.update(torch.randn(3, 5), torch.randn(3, 1))
    with pytest.raises(ValueError, match="y must be"):
        s.update(torch.randn(3, 4), torch.randn(2, 1))
    with pytest.raises(ValueError, match="no data"):
        RidgeStats(4, 1).solve(0.1)


def _planted(seed, n=32, t=64, c=8):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, t, c, generator=g)
    w_true = torch.randn(c, generator=g)
    return acts, w_true


def test_adam_recovers_planted_separator():
    acts, w_true = _planted(7)
    labels = (acts @ w_true > 0).long()
    w, b = train_adam(acts, labels, "foreground", epochs=30, lr=1e-2, batch_size=4, seed=0)
    assert b is None and w.shape == (2, 8)
    acc = ((acts @ w.T).argmax(-1) == labels).float().mean().item()
    assert acc > 0.95
    # the same seed gives the same probe: shuffling and init come from the generator only
    w_again, _ = train_adam(acts, labels, "foreground", epochs=2, lr=1e-2, seed=0)
    w_same, _ = train_adam(acts, labels, "foreground", epochs=2, lr=1e-2, seed=0)
    assert torch.equal(w_again, w_same)
    # soft (fractional) targets are accepted too
    w_soft, _ = train_adam(acts, labels.float(), "foreground", epochs=10, lr=1e-2)
    assert ((acts @ w_soft.T).argmax(-1) == labels).float().mean().item() > 0.9


def test_adam_recovers_planted_depth():
    acts, w_true = _planted(8)
    depth = acts @ w_true * 0.5 + 0.05 * torch.randn(acts.shape[:2], generator=torch.Generator().manual_seed(9))
    w, _ = train_adam(acts, depth, "depth", epochs=30, lr=1e-2, batch_size=4, seed=1)
    assert w.shape == (1, 8)
    pred = (acts @ w.T)[..., 0]
    assert scipy.stats.spearmanr(pred.numpy(), depth.numpy(), axis=None)[0] > 0.95
    with pytest.raises(ValueError, match="targets"):
        train_adam(acts, depth[:, :3], "depth")
