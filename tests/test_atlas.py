"""The decodability-versus-causality atlas: its per-trial score, its targets and its table."""
import numpy as np
import pytest

from ldm_scene.toy.atlas import closed_share, rank_correlation, render_atlas, shift_target
from ldm_scene.toy.quality import mask_centroid


def test_closed_share_scores_arrival_one_no_move_zero_and_a_vanished_object_zero():
    assert closed_share(0.3, 0.0) == 1.0
    assert closed_share(0.3, 0.3) == 0.0
    assert closed_share(0.3, 0.45) == pytest.approx(-0.5)  # moved away
    assert closed_share(0.3, None) == 0.0  # no object left: not moved closer
    assert closed_share(0.0, 0.1) == 0.0


def test_shift_target_moves_the_mask_toward_the_side_with_room():
    mask = np.zeros((64, 64), bool)
    mask[20:40, 5:20] = True  # on the left: goes right
    right = shift_target(mask)
    assert right.sum() == mask.sum()
    assert mask_centroid(right)[0] - mask_centroid(mask)[0] == pytest.approx(19 / 64, abs=1e-6)
    flipped = mask[:, ::-1]  # on the right: goes left
    assert mask_centroid(shift_target(flipped))[0] < mask_centroid(flipped)[0]


def test_rank_correlation_and_table():
    a = np.array([[0.5, 0.6], [0.7, 0.8]])
    assert rank_correlation(a, a) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert rank_correlation(a, np.zeros_like(a)) is None
    r = {"n_trials": 2, "seed0": 45_000_000, "shift_share": 0.3, "method": "steer", "control": "random-control",
         "sites": ["down_blocks.0.attentions.0", "mid_block.attentions.0"], "windows": [[0, 5], [5, 10]],
         "decodability_dice": a.tolist(), "closed_share": [[0.1, 0.0], [0.6, 0.2]],
         "closed_share_control": [[0.0, 0.05], [0.1, 0.0]], "rank_correlation": 0.4}
    text = render_atlas(r)
    assert "`mid` in steps 1-5, closing +0.60 (its control +0.10)" in text
    assert "| `down0.0` | 0.500 | 0.600 | +0.10 | +0.00 | +0.00 | +0.05 |" in text
